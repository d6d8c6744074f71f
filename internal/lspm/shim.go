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

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// shimSpec is what the LSPM asks a shim to run; it is written to DIR/spec.json.
type shimSpec struct {
	Argv        []string `json:"argv"`
	Env         []string `json:"env"`
	Dir         string   `json:"dir"`
	LogMaxBytes int64    `json:"logMaxBytes"`
}

// exitRecord is what a shim leaves in DIR/exit.json when its game server ended.
type exitRecord struct {
	PID    int       `json:"pid"`
	Code   *int      `json:"code"`
	Signal string    `json:"signal,omitempty"`
	At     time.Time `json:"at"`
}

const (
	specFile = "spec.json"
	exitFile = "exit.json"
	logFile  = "output.log"
	shimLog  = "shim.log"
)

// RunShim is the body of "dedi shim DIR". It returns the shim's exit code.
func RunShim(dir string) int {
	// Handled (not ignored) signals are reset to their defaults by exec, so
	// the game server still gets default SIGTERM and SIGPIPE behaviour.
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP, syscall.SIGPIPE)
	go func() {
		for range sigs { // the shim is stopped only by its game's end
		}
	}()

	report := os.Stdout
	fail := func(err error) int {
		fmt.Fprintf(report, "error %s\n", strings.ReplaceAll(err.Error(), "\n", " "))
		report.Close()
		return 1
	}
	raw, err := os.ReadFile(filepath.Join(dir, specFile))
	if err != nil {
		return fail(err)
	}
	var spec shimSpec
	if err := json.Unmarshal(raw, &spec); err != nil {
		return fail(fmt.Errorf("spec: %w", err))
	}
	if len(spec.Argv) == 0 {
		return fail(errors.New("spec: empty argv"))
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
	if err := cmd.Start(); err != nil {
		return fail(err)
	}
	pw.Close()
	pid := cmd.Process.Pid
	start, _ := procStartTime(pid)
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

// launched is what startShim learned about a new game server.
type launched struct {
	shimPID   int
	shimStart uint64
	pid       int
	start     uint64
	cmd       *exec.Cmd // the shim, our child until we die
}

// startShim writes the spec into dir and starts a shim for it; it returns
// once the game server was started (or failed to start).
func startShim(shimPath, dir string, spec shimSpec) (launched, error) {
	if err := writeFileAtomic(filepath.Join(dir, specFile), mustJSON(spec)); err != nil {
		return launched{}, err
	}
	errf, err := os.OpenFile(filepath.Join(dir, shimLog), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return launched{}, err
	}
	defer errf.Close()
	pr, pw, err := os.Pipe()
	if err != nil {
		return launched{}, err
	}
	defer pr.Close()
	cmd := exec.Command(shimPath, "shim", dir)
	cmd.Stdout = pw
	cmd.Stderr = errf
	cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		pw.Close()
		return launched{}, fmt.Errorf("start shim: %w", err)
	}
	pw.Close()
	_ = pr.SetReadDeadline(time.Now().Add(15 * time.Second))
	line, err := bufio.NewReader(pr).ReadString('\n')
	if err != nil {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		return launched{}, fmt.Errorf("shim did not report: %w", err)
	}
	line = strings.TrimSpace(line)
	if msg, ok := strings.CutPrefix(line, "error "); ok {
		_ = cmd.Wait()
		return launched{}, errors.New(msg)
	}
	f := strings.Fields(line)
	if len(f) != 3 || f[0] != "ok" {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		return launched{}, fmt.Errorf("shim said %q", line)
	}
	pid, _ := strconv.Atoi(f[1])
	start, _ := strconv.ParseUint(f[2], 10, 64)
	shimStart, _ := procStartTime(cmd.Process.Pid)
	return launched{shimPID: cmd.Process.Pid, shimStart: shimStart, pid: pid, start: start, cmd: cmd}, nil
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
	if s, err := procStartTime(pid); err != nil || s != start {
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

// procStartTime reads a process's start time (clock ticks after boot) from
// /proc, which tells a live pid from a reused one.
func procStartTime(pid int) (uint64, error) {
	raw, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	s := string(raw)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, errors.New("bad stat")
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 20 {
		return 0, errors.New("bad stat")
	}
	if f[0] == "Z" || f[0] == "X" {
		return 0, errors.New("zombie")
	}
	return strconv.ParseUint(f[19], 10, 64)
}

// pidAlive reports whether pid is still the process that started at start.
func pidAlive(pid int, start uint64) bool {
	if pid <= 0 {
		return false
	}
	s, err := procStartTime(pid)
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
