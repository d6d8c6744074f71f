package lspm

import (
	"bytes"
	"errors"
	"fmt"
	"maps"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// sweepWait bounds how long sweepUsers waits for one user's processes to
// die once they have been sent SIGKILL.
const sweepWait = 2 * time.Second

// sweepUsers kills every process that runs as each of uids (--game-uids)
// and returns the users it could not confirm empty. It must run as root;
// sweeper is a user no process runs as (the first of --game-uids).
//
// A scan of /proc that kills what it finds can be outrun: a process that
// forks and exits without pause always has a child the scan has not seen
// yet. So the sweep asks the kernel instead. A thread of this process takes
// the game's user as its effective user, sweeper as its real one and root
// as its saved one (so it holds no capability meanwhile), and calls
// kill(-1, SIGKILL): the kernel signals every process whose real or saved
// user is the thread's effective one, which is every process of the game's
// user, under the lock fork takes too. A process forked after that call
// fails to start (its parent has a fatal signal pending), so one call dooms
// them all; the sweep then reads /proc, as root and once for all the
// users, until none of them runs (and kills again meanwhile).
//
// The game's user must not be able to signal that thread meanwhile (a
// SIGSTOP would freeze the LSPM): the kernel lets a process signal another
// when its real or effective user is the other's real or saved one, and
// the thread's are sweeper and root, which no game runs as. What a game can
// still do to the thread while it holds the game's user as effective one
// (renice it, pin it) dies with it: credentials are per thread in the
// kernel, so each round runs on a thread locked to a goroutine of its own,
// changed with raw syscalls, and never given back to the runtime (it ends
// with its goroutine; the runtime starts new threads from a clean one).
func sweepUsers(sweeper int, uids ...int) []int {
	want := make(map[int]bool, len(uids))
	for _, uid := range uids {
		if uid > 0 && uid != sweeper { // never root: kill(-1) as root is every process
			want[uid] = true
		}
	}
	if len(want) == 0 {
		return nil
	}
	if sweeper <= 0 {
		fmt.Fprintf(os.Stderr, "sweep: no sweeper user\n")
		return slices.Sorted(maps.Keys(want))
	}
	var dirty []int
	deadline := time.Now().Add(sweepWait)
	pause := 500 * time.Microsecond
	for {
		for _, uid := range killRound(sweeper, slices.Sorted(maps.Keys(want))) {
			dirty = append(dirty, uid)
			delete(want, uid)
		}
		// One kill(-1) dooms every process of the user; the loop only
		// waits for them to be gone.
		want = liveUsers(want)
		if len(want) == 0 {
			break
		}
		if time.Now().After(deadline) {
			for uid := range want {
				fmt.Fprintf(os.Stderr, "sweep: processes of user %d still run %v after SIGKILL\n", uid, sweepWait)
				dirty = append(dirty, uid)
			}
			break
		}
		time.Sleep(pause)
		pause = min(2*pause, 50*time.Millisecond)
	}
	slices.Sort(dirty)
	return dirty
}

// killRound calls kill(-1, SIGKILL) as each of uids from a thread of its
// own, which then ends, and returns the users it could not take.
func killRound(sweeper int, uids []int) (failed []int) {
	onSpareThread(func() {
		for i, uid := range uids {
			if err := killAllAs(sweeper, uid); err != nil {
				fmt.Fprintf(os.Stderr, "sweep: %v\n", err)
				if errors.Is(err, errStuck) {
					failed = append(failed, uids[i:]...)
					return
				}
				failed = append(failed, uid)
			}
		}
	})
	return failed
}

// onSpareThread runs f on a thread locked to it that is not the process's
// main thread and that ends with f (it is never given back to the Go
// runtime): f may change the thread's credentials. Not the main thread,
// as the kernel judges a signal to a process by its main thread's
// credentials: while a sweep holds the sweeper's there, another process's
// sweep (another shim, another LSPM) would kill this one.
func onSpareThread(f func()) {
	done := make(chan struct{})
	go func() {
		runtime.LockOSThread()
		if unix.Gettid() == unix.Getpid() {
			// Hold the main thread, so that the nested goroutine gets
			// another one, and give it back afterwards: nothing changed it.
			onSpareThread(f)
			runtime.UnlockOSThread()
			close(done)
			return
		}
		defer close(done) // the goroutine ends locked: so does its thread
		f()
	}()
	<-done
}

// errStuck is killAllAs failing to take root back.
var errStuck = errors.New("cannot take root back after a sweep")

// killAllAs calls kill(-1, SIGKILL) as uid (its effective user, with
// sweeper as the real one) from the calling thread, which must be locked
// to its goroutine. (kill(-1) answers ESRCH only when there is no other
// process at all, so its answer tells nothing about uid.)
func killAllAs(sweeper, uid int) error {
	if err := setThreadUsers(sweeper, uid); err != nil {
		return err
	}
	_, _, kerr := unix.RawSyscall(unix.SYS_KILL, ^uintptr(0), uintptr(unix.SIGKILL), 0)
	if err := backToRoot(); err != nil {
		return err
	}
	if kerr != 0 && kerr != unix.ESRCH {
		return fmt.Errorf("kill(-1) as user %d: %w", uid, kerr)
	}
	return nil
}

// setThreadUsers sets the calling thread's users (only its: a raw
// syscall) to real, effective, and root as the saved one, which
// backToRoot takes back.
func setThreadUsers(real, effective int) error {
	if _, _, e := unix.RawSyscall(unix.SYS_SETRESUID, uintptr(real), uintptr(effective), 0); e != 0 {
		return fmt.Errorf("setresuid %d %d 0: %w", real, effective, e)
	}
	return nil
}

// backToRoot gives the calling thread root back (its saved user).
func backToRoot() error {
	if _, _, e := unix.RawSyscall(unix.SYS_SETRESUID, 0, 0, 0); e != 0 {
		return fmt.Errorf("%w: %v", errStuck, e)
	}
	return nil
}

// liveUsers returns the users of want that a process other than this one
// runs as, and is not a zombie: a zombie runs nothing and forks nothing,
// and waits only for its parent to reap it.
func liveUsers(want map[int]bool) map[int]bool {
	live := map[int]bool{}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return want // cannot tell: assume the worst
	}
	self := os.Getpid()
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		for _, uid := range usersOf(pid) {
			if want[uid] {
				live[uid] = true
			}
		}
	}
	return live
}

// anyRunsAs tells whether a process other than this one, and not a
// zombie, runs as uid.
func anyRunsAs(uid int) bool { return len(liveUsers(map[int]bool{uid: true})) > 0 }

// usersOf returns the process's user ids (real, effective, saved, file
// system), or none for a zombie or a process that is gone.
func usersOf(pid int) []int {
	raw, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil || bytes.Contains(raw, []byte("\nState:\tZ")) {
		return nil
	}
	_, rest, ok := bytes.Cut(raw, []byte("\nUid:"))
	if !ok {
		return nil
	}
	line, _, _ := bytes.Cut(rest, []byte("\n"))
	var out []int
	for _, f := range bytes.Fields(line) {
		if n, err := strconv.Atoi(string(f)); err == nil {
			out = append(out, n)
		}
	}
	return out
}

// sharedDirs are where every user may write, besides $TMPDIR: a game's
// user may leave files there, POSIX shared memory (/dev/shm) and POSIX
// message queues (/dev/mqueue, see mountMqueue).
var sharedDirs = []string{"/tmp", "/var/tmp", "/run/lock", "/dev/shm", mqueueDir}

// mqueueDir is where the POSIX message queues are listed.
const mqueueDir = "/dev/mqueue"

// mountMqueue makes sure the POSIX message queues are listed in
// mqueueDir, mounting the file system there if nothing is (systemd does on
// most hosts; a VM's init or a bare container may not): a game can create
// queues without it, and they could not be found to be removed.
func mountMqueue() error {
	const mqueueMagic = 0x19800202
	var fs unix.Statfs_t
	if unix.Statfs(mqueueDir, &fs) == nil && fs.Type == mqueueMagic {
		return nil
	}
	if err := os.MkdirAll(mqueueDir, 0o755); err != nil {
		return err
	}
	if err := unix.Mount("mqueue", mqueueDir, "mqueue", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return fmt.Errorf("mount mqueue on %s: %w", mqueueDir, err)
	}
	return nil
}

// removeUserLeftovers removes what games' users left where every user can
// write, so that the next game given a user finds nothing of the last
// one: files and directories a user owns at the top of $TMPDIR and
// sharedDirs (and one level down in root's sticky directories there),
// System V shared memory, semaphores and message queues the user owns or
// created, and the keys in its keyrings. It runs only for users
// sweepUsers emptied, so nothing of theirs can race the removal. Root is
// never one of them.
func removeUserLeftovers(uids map[int]bool) {
	if len(uids) == 0 || uids[0] {
		return
	}
	dirs := []string{os.TempDir()}
	for _, d := range sharedDirs {
		if !slices.Contains(dirs, d) {
			dirs = append(dirs, d)
		}
	}
	for _, dir := range dirs {
		removeOwned(dir, uids, 1)
	}
	clearKeyrings(uids)
	for _, k := range []struct {
		table string
		rmid  func(id int) error
	}{
		{"shm", func(id int) error { _, err := unix.SysvShmCtl(id, unix.IPC_RMID, nil); return err }},
		{"sem", func(id int) error { return ipcRmid(unix.SYS_SEMCTL, id, 0, unix.IPC_RMID) }},
		{"msg", func(id int) error { return ipcRmid(unix.SYS_MSGCTL, id, unix.IPC_RMID, 0) }},
	} {
		for _, id := range sysvIPCOf(k.table, uids) {
			if err := k.rmid(id); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.EIDRM) {
				fmt.Fprintf(os.Stderr, "remove a game user's System V %s %d: %v\n", k.table, id, err)
			}
		}
	}
}

// clearKeyrings empties the user keyrings (@u, @us) and drops the
// persistent keyring of those of uids that hold keys (/proc/key-users):
// the kernel keeps them for a user across its processes, so a key one game
// stored would wait there for the next game of its user. The user's
// keyrings are reached only as the user (its real uid), which is safe
// here: none of its processes runs any more.
func clearKeyrings(uids map[int]bool) {
	raw, err := os.ReadFile("/proc/key-users")
	if err != nil {
		return
	}
	var holders []int
	for _, line := range strings.Split(string(raw), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		if uid, err := strconv.Atoi(strings.TrimSuffix(f[0], ":")); err == nil && uids[uid] {
			holders = append(holders, uid)
		}
	}
	if len(holders) == 0 {
		return
	}
	onSpareThread(func() {
		for _, uid := range holders {
			if err := setThreadUsers(uid, uid); err != nil {
				fmt.Fprintf(os.Stderr, "clear the keyrings of user %d: %v\n", uid, err)
				continue
			}
			for _, ring := range []int{unix.KEY_SPEC_USER_KEYRING, unix.KEY_SPEC_USER_SESSION_KEYRING} {
				if _, err := unix.KeyctlInt(unix.KEYCTL_CLEAR, ring, 0, 0, 0); err != nil {
					fmt.Fprintf(os.Stderr, "clear keyring %d of user %d: %v\n", ring, uid, err)
				}
			}
			// The user's persistent keyring too (linked for the moment into
			// this thread's keyring, which ends with the thread), where the
			// kernel supports one.
			if id, err := unix.KeyctlInt(unix.KEYCTL_GET_PERSISTENT, -1, unix.KEY_SPEC_THREAD_KEYRING, 0, 0); err == nil {
				if _, err := unix.KeyctlInt(unix.KEYCTL_INVALIDATE, id, 0, 0, 0); err != nil {
					fmt.Fprintf(os.Stderr, "invalidate the persistent keyring of user %d: %v\n", uid, err)
				}
			}
			if backToRoot() != nil {
				return // the thread ends with onSpareThread's goroutine
			}
		}
	})
}

// removeOwned removes the entries of dir that one of uids owns. It goes
// down (depth more levels) only into directories root owns with the
// sticky bit (as /tmp/.X11-unix): no game can swap such a directory, or
// one above it, for a link while its entries are removed by path.
func removeOwned(dir string, uids map[int]bool, depth int) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range ents {
		path := dir + "/" + e.Name()
		var st unix.Stat_t
		if unix.Lstat(path, &st) != nil {
			continue
		}
		if uids[int(st.Uid)] {
			if err := os.RemoveAll(path); err != nil { // never follows a link
				fmt.Fprintf(os.Stderr, "remove game user %d's %s: %v\n", st.Uid, path, err)
			}
			continue
		}
		if depth > 0 && st.Uid == 0 && st.Mode&unix.S_IFMT == unix.S_IFDIR && st.Mode&unix.S_ISVTX != 0 {
			removeOwned(path, uids, depth-1)
		}
	}
}

func ipcRmid(trap uintptr, id int, a, b int) error {
	if _, _, e := unix.Syscall(trap, uintptr(id), uintptr(a), uintptr(b)); e != 0 {
		return e
	}
	return nil
}

// sysvIPCOf lists the ids in /proc/sysvipc/<table> (shm, sem or msg) that
// one of uids owns or created. The columns are found by the header's names.
func sysvIPCOf(table string, uids map[int]bool) []int {
	raw, err := os.ReadFile("/proc/sysvipc/" + table)
	if err != nil {
		return nil
	}
	lines := strings.Split(string(raw), "\n")
	head := strings.Fields(lines[0])
	col := func(name string) int { return slices.Index(head, name) }
	idCol, uidCol, cuidCol := 1, col("uid"), col("cuid")
	if uidCol < 0 || cuidCol < 0 {
		return nil
	}
	var ids []int
	for _, line := range lines[1:] {
		f := strings.Fields(line)
		if len(f) <= max(uidCol, cuidCol) {
			continue
		}
		id, err := strconv.Atoi(f[idCol])
		owner, err1 := strconv.Atoi(f[uidCol])
		creator, err2 := strconv.Atoi(f[cuidCol])
		if err == nil && (err1 == nil && uids[owner] || err2 == nil && uids[creator]) {
			ids = append(ids, id)
		}
	}
	return ids
}
