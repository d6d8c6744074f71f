package lspm

// The shim is the fix for the two traps of an agent that must be able to die
// without taking its game servers along:
//
//   - a game server writing to a pipe whose reader died gets SIGPIPE, and
//   - only a process's parent can learn its exit status.
//
// So the LSPM never parents a game server itself. It runs "dedi shim DIR" in
// a session of its own; the shim starts the game server in a process group
// of its own, copies its stdout and stderr into a size-capped log file, waits
// for it, kills whatever the game left behind in its group, writes the exit
// status to DIR/exit.json and exits. The shim outlives any LSPM, so a
// restarted LSPM finds the exit status on disk, and a live shim is watched
// through a pidfd: it becomes readable when the shim exits, which works for
// processes that are not our children.
//
// A shim is a Go process, and starting one costs a few milliseconds, more
// than the fork/exec of the game itself. So the LSPM keeps a small pool of
// shims started ahead, each blocked reading its spec from stdin: a spawn
// hands its spec to a waiting shim and only the game's own fork/exec is on
// the request's path.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"dedi.dev/dedi/internal/procstat"
)

// shimSpec is what the LSPM asks a shim to run, one JSON line on its stdin.
type shimSpec struct {
	ProcDir     string   `json:"procDir"` // the process's dir: logs, exit record
	Argv        []string `json:"argv"`
	Env         []string `json:"env"`
	Dir         string   `json:"dir"`
	LogMaxBytes int64    `json:"logMaxBytes"`
	UID         int      `json:"uid,omitempty"`        // the game's own user and group (--game-uids); 0: the shim's
	SweeperUID  int      `json:"sweeperUid,omitempty"` // with UID: the user sweepUsers takes as its real one
	// Record is the process's record; the shim adds the pids and writes it
	// before it answers.
	Record json.RawMessage `json:"record,omitempty"`
}

// exitRecord is what a shim leaves in DIR/exit.json when its game server ended.
type exitRecord struct {
	PID    int       `json:"pid"`
	Code   *int      `json:"code"`
	Signal string    `json:"signal,omitempty"`
	At     time.Time `json:"at"`
}

// killProcessOf kills every process group whose leader carries
// DEDI_PROCESS_ID=id in its environment, and the shims that parent them. It
// finds a game server whose record is missing or unreadable; it reports
// whether it found one.
func killProcessOf(id string) bool {
	needle := []byte("\x00" + "DEDI_PROCESS_ID=" + id + "\x00")
	ents, _ := os.ReadDir("/proc")
	killed := false
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		env, err := os.ReadFile("/proc/" + e.Name() + "/environ")
		if err != nil || !bytes.Contains(append([]byte{0}, env...), needle) {
			continue
		}
		if ppid := parentOf(pid); ppid > 1 && strings.Contains(cmdlineOf(ppid), "shim") {
			_ = syscall.Kill(ppid, syscall.SIGKILL)
		}
		_ = syscall.Kill(-pid, syscall.SIGKILL)
		_ = syscall.Kill(pid, syscall.SIGKILL)
		killed = true
	}
	return killed
}

func parentOf(pid int) int {
	raw, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	s := string(raw)
	i := strings.LastIndexByte(s, ')')
	f := strings.Fields(s[i+1:])
	if i < 0 || len(f) < 2 {
		return 0
	}
	ppid, _ := strconv.Atoi(f[1])
	return ppid
}

// closeOnExecFrom marks every descriptor from fd up close-on-exec.
func closeOnExecFrom(fd int) {
	if unix.CloseRange(uint(fd), ^uint(0), unix.CLOSE_RANGE_CLOEXEC) == nil {
		return
	}
	ents, _ := os.ReadDir("/proc/self/fd") // kernels before 5.11
	for _, e := range ents {
		if n, err := strconv.Atoi(e.Name()); err == nil && n >= fd {
			_, _ = unix.FcntlInt(uintptr(n), unix.F_SETFD, unix.FD_CLOEXEC)
		}
	}
}

func cmdlineOf(pid int) string {
	raw, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	return string(raw)
}

const (
	exitFile = "exit.json"
	logFile  = "output.log"
	shimLog  = "shim.log"
)

// RunShim is the body of "dedi shim": it reads its spec from stdin, starts
// the game server and stays its parent. It returns the shim's exit code.
func RunShim() int {
	// A descriptor the LSPM inherited without close-on-exec (from whatever
	// started it) would reach the game: none does.
	closeOnExecFrom(3)
	// Handled (not ignored) signals are reset to their defaults by exec, so
	// the game server still gets default SIGTERM and SIGPIPE behaviour.
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP, syscall.SIGPIPE)
	go func() {
		for range sigs { // the shim is stopped only by its game's end
		}
	}()

	// The spec holds the game's token: keep other processes of this user
	// out of this one's memory (exec makes the game dumpable again).
	_ = unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0)
	report := os.Stdout
	fail := func(err error) int {
		fmt.Fprintf(report, "error %s\n", strings.ReplaceAll(err.Error(), "\n", " "))
		report.Close()
		return 1
	}
	line, err := bufio.NewReader(os.Stdin).ReadBytes('\n')
	if err != nil {
		return 0 // a pooled shim whose LSPM went away before using it
	}
	os.Stdin.Close()
	var spec shimSpec
	if err := json.Unmarshal(line, &spec); err != nil {
		return fail(fmt.Errorf("spec: %w", err))
	}
	if len(spec.Argv) == 0 || spec.ProcDir == "" {
		return fail(errors.New("spec: empty argv or process dir"))
	}
	dir := spec.ProcDir
	if f, err := os.OpenFile(filepath.Join(dir, shimLog), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600); err == nil {
		_ = unix.Dup3(int(f.Fd()), 2, 0) // the shim's own complaints
		f.Close()
	}
	logw, err := openCappedLog(filepath.Join(dir, logFile), spec.LogMaxBytes)
	if err != nil {
		return fail(err)
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		return fail(err)
	}
	cmd := exec.Command(spec.Argv[0], spec.Argv[1:]...)
	cmd.Env = spec.Env
	cmd.Dir = spec.Dir
	cmd.Stdout = pw
	cmd.Stderr = pw
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if spec.UID != 0 {
		// No supplementary groups: the game is its user and nothing else.
		cmd.SysProcAttr.Credential = &syscall.Credential{Uid: uint32(spec.UID), Gid: uint32(spec.UID), Groups: []uint32{}}
	}
	// No game gains privileges by exec: a setuid file (one a game left for
	// the next game of its user, or a system one) runs with the game's. The
	// flag is the thread's, and the fork inherits it: the main goroutine
	// stays on this thread from here on.
	runtime.LockOSThread()
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fail(fmt.Errorf("no_new_privs: %w", err))
	}
	// A session keyring of the game's own (anonymous: a NULL name), not
	// the LSPM's, which every game would share (a service manager or a
	// login gives the LSPM one). Where the kernel has no keyrings, or a
	// seccomp filter refuses keyctl (Docker's default profile does, for
	// the game as well), there is none to share.
	if _, _, e := unix.Syscall(unix.SYS_KEYCTL, unix.KEYCTL_JOIN_SESSION_KEYRING, 0, 0); e != 0 && e != unix.ENOSYS && e != unix.EPERM {
		return fail(fmt.Errorf("join a session keyring of its own: %w", e))
	}
	if spec.UID != 0 {
		// A game of its own user can fill the machine's process ids with
		// its tasks no more (the limit counts the user's tasks; root, the
		// shim, is not bound by it).
		if err := unix.Setrlimit(unix.RLIMIT_NPROC, &unix.Rlimit{Cur: gameMaxTasks, Max: gameMaxTasks}); err != nil {
			return fail(fmt.Errorf("limit the game's tasks: %w", err))
		}
	}
	if err := cmd.Start(); err != nil {
		return fail(err)
	}
	pw.Close()
	pid := cmd.Process.Pid
	start, _ := procstat.StartTime(pid)
	// The process's first record is written here, before the reply:
	// whatever happens to the LSPM from now on (the 201 may already be on
	// its way), the next LSPM finds and adopts this game server.
	if len(spec.Record) > 0 {
		var rec record
		if json.Unmarshal(spec.Record, &rec) == nil {
			rec.Process.PID, rec.Start = pid, start
			rec.ShimPID = os.Getpid()
			rec.ShimStart, _ = procstat.StartTime(os.Getpid())
			if err := writeFileAtomic(filepath.Join(dir, recordFile), mustJSON(rec)); err != nil {
				fmt.Fprintf(os.Stderr, "shim: write record: %v\n", err)
			}
		}
	}
	fmt.Fprintf(report, "ok %d %d\n", pid, start)
	report.Close() // never written again: the LSPM may be gone

	copied := make(chan struct{})
	go func() {
		defer close(copied)
		_, _ = io.Copy(logw, pr)
	}()

	// Wait without reaping, so the process group cannot be reused while we
	// kill what the game server left in it.
	var info unix.Siginfo
	for {
		err := unix.Waitid(unix.P_PID, pid, &info, unix.WEXITED|unix.WNOWAIT, nil)
		if err != unix.EINTR {
			break
		}
	}
	_ = syscall.Kill(-pid, syscall.SIGKILL)
	_ = cmd.Wait()
	if spec.UID != 0 {
		// What the game left outside its group (a daemon of its own
		// session) dies now; the LSPM sweeps again before the user is
		// given to another game, in case this shim is killed first.
		sweepUsers(spec.SweeperUID, spec.UID)
	}
	rec := exitRecord{PID: pid, At: time.Now().UTC()}
	if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		rec.Signal = signalName(ws.Signal())
	} else {
		code := cmd.ProcessState.ExitCode()
		rec.Code = &code
	}
	select {
	case <-copied:
	case <-time.After(500 * time.Millisecond):
		pr.Close()
		<-copied
	}
	logw.Close()
	if err := writeFileAtomic(filepath.Join(dir, exitFile), mustJSON(rec)); err != nil {
		fmt.Fprintf(os.Stderr, "shim: write exit record: %v\n", err)
		return 1
	}
	return 0
}

// gameMaxTasks bounds the processes and threads of a game of its own user
// (--game-uids), RLIMIT_NPROC.
const gameMaxTasks = 1024

// launched is what startShim learned about a new game server.
type launched struct {
	shimPID   int
	shimStart uint64
	pid       int
	start     uint64
	cmd       *exec.Cmd // the shim, our child until we die
	uid       int       // the game's own user (--game-uids), or 0
	home      string    // with uid: the game's own HOME
}

// shimProc is a started shim waiting for its spec.
type shimProc struct {
	cmd    *exec.Cmd
	stdin  *os.File // the spec goes here
	stdout *os.File // "ok PID START" or "error MSG" comes back here
	start  uint64
}

// newShim starts a shim that waits for its spec.
func newShim(shimPath string) (*shimProc, error) {
	inR, inW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		inR.Close()
		inW.Close()
		return nil, err
	}
	cmd := exec.Command(shimPath, "shim")
	cmd.Stdin, cmd.Stdout = inR, outW
	// One thread is plenty for a shim, and keeps its footprint small.
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "GOMAXPROCS=1"}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	err = cmd.Start()
	inR.Close()
	outW.Close()
	if err != nil {
		inW.Close()
		outR.Close()
		return nil, fmt.Errorf("start shim: %w", err)
	}
	start, _ := procstat.StartTime(cmd.Process.Pid)
	return &shimProc{cmd: cmd, stdin: inW, stdout: outR, start: start}, nil
}

// discard stops a shim that was never used.
func (s *shimProc) discard() {
	s.stdin.Close()
	s.stdout.Close()
	_ = s.cmd.Wait()
}

// run hands the spec to the shim and returns once the game server was
// started (or failed to start).
func (s *shimProc) run(spec shimSpec) (launched, error) {
	defer s.stdout.Close()
	line := append(mustJSON(spec), '\n')
	_, err := s.stdin.Write(line)
	s.stdin.Close()
	if err != nil {
		_ = s.cmd.Process.Kill()
		_ = s.cmd.Wait()
		return launched{}, fmt.Errorf("hand spec to shim: %w", err)
	}
	_ = s.stdout.SetReadDeadline(time.Now().Add(15 * time.Second))
	reply, err := bufio.NewReader(s.stdout).ReadString('\n')
	if err != nil {
		_ = s.cmd.Process.Kill()
		_ = s.cmd.Wait()
		killProcessOf(filepath.Base(spec.ProcDir)) // a game it may have started in the meantime
		return launched{}, fmt.Errorf("shim did not report: %w", err)
	}
	reply = strings.TrimSpace(reply)
	if msg, ok := strings.CutPrefix(reply, "error "); ok {
		_ = s.cmd.Wait()
		return launched{}, errors.New(msg)
	}
	f := strings.Fields(reply)
	if len(f) != 3 || f[0] != "ok" {
		_ = s.cmd.Process.Kill()
		_ = s.cmd.Wait()
		return launched{}, fmt.Errorf("shim said %q", reply)
	}
	pid, _ := strconv.Atoi(f[1])
	start, _ := strconv.ParseUint(f[2], 10, 64)
	return launched{shimPID: s.cmd.Process.Pid, shimStart: s.start, pid: pid, start: start, cmd: s.cmd}, nil
}

// shimPool keeps up to size shims started ahead of need.
type shimPool struct {
	path  string
	ready chan *shimProc
	log   interface{ Warn(string, ...any) }
	// idle, when set, is how long no spawn must have taken a shim before
	// the pool starts one: on a machine with one slow CPU (an emulated VM)
	// a shim starting beside a spawn, or beside the LSPM's start, delays
	// it by the shim's whole start.
	idle time.Duration
	used chan struct{} // a spawn took a shim, or started its own
}

func newShimPool(path string, size int, idle time.Duration, log interface{ Warn(string, ...any) }) *shimPool {
	return &shimPool{path: path, ready: make(chan *shimProc, size), log: log, idle: idle, used: make(chan struct{}, 1)}
}

// waitIdle returns once no spawn has used the pool for p.idle, or false
// when ctx is done.
func (p *shimPool) waitIdle(ctx context.Context) bool {
	if p.idle <= 0 {
		return true
	}
	t := time.NewTimer(p.idle)
	defer t.Stop()
	for {
		select {
		case <-p.used:
			t.Reset(p.idle)
		case <-t.C:
			return true
		case <-ctx.Done():
			return false
		}
	}
}

// fill keeps the pool full until ctx is done, then stops the idle shims.
func (p *shimPool) fill(ctx context.Context) {
	defer func() {
		for {
			select {
			case s := <-p.ready:
				s.discard()
			default:
				return
			}
		}
	}()
	if cap(p.ready) == 0 {
		return
	}
	for first := true; ; first = false {
		// With an idle time, the LSPM's start counts as a use.
		if p.idle > 0 && (first || len(p.used) > 0) && !p.waitIdle(ctx) {
			return
		}
		s, err := newShim(p.path)
		if err != nil {
			p.log.Warn("shim pool: cannot start a shim", "err", err)
			select {
			case <-ctx.Done():
				return
			case <-time.After(time.Second):
				continue
			}
		}
		select {
		case p.ready <- s:
		case <-ctx.Done():
			s.discard()
			return
		}
		// A slot was taken by a spawn. Starting its replacement at once
		// would compete for the CPU with the game server starting now.
		{
			select {
			case <-ctx.Done():
				return
			case <-time.After(refillDelay):
			}
		}
	}
}

// refillDelay is how long the pool waits before replacing a shim.
const refillDelay = 20 * time.Millisecond

// get returns a waiting shim, from the pool when one is there.
func (p *shimPool) get() (*shimProc, error) {
	select {
	case p.used <- struct{}{}:
	default:
	}
	select {
	case s := <-p.ready:
		if pidAlive(s.cmd.Process.Pid, s.start) {
			return s, nil
		}
		s.discard() // killed while it waited
	default:
	}
	return newShim(p.path)
}

// waitShim blocks until the shim pid (started at start, in clock ticks
// since boot) has exited or ctx is done. It works for shims that are not
// our children: a pidfd becomes readable when its process exits. It
// returns true when the shim is gone.
func waitShim(ctx context.Context, pid int, start uint64) bool {
	fd, err := unix.PidfdOpen(pid, unix.PIDFD_NONBLOCK)
	if err != nil {
		return true // no such process
	}
	if s, err := procstat.StartTime(pid); err != nil || s != start {
		unix.Close(fd)
		return true // the pid was reused: our shim is long gone
	}
	f := os.NewFile(uintptr(fd), "pidfd")
	defer f.Close()
	rc, err := f.SyscallConn()
	if err != nil {
		return !pidAlive(pid, start)
	}
	stop := context.AfterFunc(ctx, func() { _ = f.SetReadDeadline(time.Now()) })
	defer stop()
	exited := false
	err = rc.Read(func(fd uintptr) bool {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, _ := unix.Poll(fds, 0)
		exited = n > 0
		return exited
	})
	if err != nil && !exited {
		return false // ctx done
	}
	return true
}

// pidAlive reports whether pid is still the process that started at start.
func pidAlive(pid int, start uint64) bool {
	if pid <= 0 {
		return false
	}
	s, err := procstat.StartTime(pid)
	return err == nil && s == start
}

// signalName names a signal as API.md shows it ("SIGSEGV").
func signalName(s syscall.Signal) string {
	if n := unix.SignalName(s); n != "" {
		return n
	}
	return "SIG" + strconv.Itoa(int(s))
}

// writeFileAtomic replaces path with data through a rename, so a reader
// (or an LSPM killed half-way) never sees a torn file.
func writeFileAtomic(path string, data []byte) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err) // only our own plain structs are marshalled here
	}
	return b
}
