package lspm

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// A process that forks and exits without pause, each generation in a
// session of its own, outruns any scan of /proc: the sweep must still end
// it, and leave nothing of the user running.
func TestSweepUsersKillsForkHopper(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skipf("sweeping a user needs root; these tests run as user %d", os.Geteuid())
	}
	const sweeper, uid = 2000000389, 2000000390
	// A scan of /proc rarely catches a hopper between two forks, so each
	// generation adds a byte to a file: its growth shows they run.
	count := filepath.Join(os.TempDir(), fmt.Sprintf("dedi-test-hops-%d", uid))
	if err := os.WriteFile(count, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(count, uid, uid); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.Remove(count) })
	hops := func() int64 {
		st, err := os.Stat(count)
		if err != nil {
			t.Fatal(err)
		}
		return st.Size()
	}
	// Each generation starts the next one, detached, and exits at once.
	hop := `echo >>"$COUNT"; setsid -f sh -c "$HOP" </dev/null >/dev/null 2>&1; exit 0`
	for range 3 { // three chains of hoppers at once
		cmd := exec.Command("/bin/sh", "-c", hop)
		cmd.Env = []string{"HOP=" + hop, "COUNT=" + count, "PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
		cmd.Dir = "/"
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true,
			Credential: &syscall.Credential{Uid: uid, Gid: uid, Groups: []uint32{}}}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		go func() { _ = cmd.Wait() }()
	}
	t.Cleanup(func() { sweepUsers(sweeper, uid) }) // whatever the outcome, nothing of the test outlives it
	deadline := time.Now().Add(5 * time.Second)
	for hops() < 30 {
		if time.Now().After(deadline) {
			t.Fatal("the hoppers never ran")
		}
		time.Sleep(10 * time.Millisecond)
	}

	if dirty := sweepUsers(sweeper, uid); len(dirty) != 0 {
		t.Fatalf("the sweep could not empty user %d", uid)
	}
	// Nothing may come back: a survivor would start its next generation,
	// which would add to the file.
	n := hops()
	time.Sleep(300 * time.Millisecond)
	if anyRunsAs(uid) || hops() > n {
		t.Fatalf("a process of user %d survived the sweep (%d hops, then %d)", uid, n, hops())
	}
	if dirty := sweepUsers(sweeper, uid); len(dirty) != 0 {
		t.Fatal("a second sweep of an empty user failed")
	}
	// No thread of this process is left with another user than root.
	threadsAllRoot(t)
}

// threadsAllRoot fails unless every thread of this process has root as
// its real, effective, saved and file system user.
func threadsAllRoot(t *testing.T) {
	t.Helper()
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		t.Fatal(err)
	}
	for _, task := range tasks {
		raw, err := os.ReadFile("/proc/self/task/" + task.Name() + "/status")
		if err != nil {
			continue // ended meanwhile
		}
		_, rest, _ := bytes.Cut(raw, []byte("\nUid:"))
		line, _, _ := bytes.Cut(rest, []byte("\n"))
		if f := strings.Fields(string(line)); strings.Join(f, " ") != "0 0 0 0" {
			t.Errorf("thread %s runs as users %v", task.Name(), f)
		}
	}
}

// While a thread sweeps a game's user, that user cannot signal it (a
// SIGSTOP would freeze the LSPM): the thread's real user is the sweeper
// and its saved one root, and the kernel lets a process signal another
// only when its real or effective user is the other's real or saved one.
// Checked with kill -0 by a process of the game's user against the thread,
// both with the sweep's users and (to show the check can fail) with the
// game's user as real one too.
func TestSweepThreadUnreachableByTheGame(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skipf("sweeping a user needs root; these tests run as user %d", os.Geteuid())
	}
	const sweeper, uid = 2000000392, 2000000393
	for _, c := range []struct {
		real      int
		reachable bool
	}{{sweeper, false}, {uid, true}} {
		tid := make(chan int)
		release := make(chan struct{})
		done := make(chan error, 1)
		go onSpareThread(func() {
			err := setThreadUsers(c.real, uid)
			tid <- unix.Gettid()
			if err != nil {
				done <- err
				return
			}
			<-release
			done <- backToRoot()
		})
		probe := exec.Command("/bin/sh", "-c", "kill -0 "+strconv.Itoa(<-tid))
		probe.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid, Groups: []uint32{}}}
		out, perr := probe.CombinedOutput()
		close(release)
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		if reached := perr == nil; reached != c.reachable {
			t.Errorf("thread with real user %d, effective %d: the game's user reached it: %v, want %v (%v %s)",
				c.real, uid, reached, c.reachable, perr, out)
		}
	}
	threadsAllRoot(t)
}

// A sweep kills the swept user's processes and none of root (kill(-1) as
// root is every process) nor of another user, all running beside it.
func TestSweepUsersSparesOthers(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skipf("sweeping a user needs root; these tests run as user %d", os.Geteuid())
	}
	const sweeper, swept, other = 2000000394, 2000000395, 2000000391
	start := func(uid int) <-chan error {
		cmd := exec.Command("/bin/sleep", "30")
		if uid != 0 {
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(uid), Groups: []uint32{}}}
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		exited, reaped := make(chan error, 1), make(chan struct{})
		go func() { exited <- cmd.Wait(); close(reaped) }()
		t.Cleanup(func() { _ = cmd.Process.Kill(); <-reaped })
		return exited
	}
	victim, others, root := start(swept), start(other), start(0)

	if dirty := sweepUsers(sweeper, 0, swept); len(dirty) != 0 {
		t.Fatalf("dirty %v", dirty)
	}
	select {
	case err := <-victim:
		if ws, ok := err.(*exec.ExitError); !ok || ws.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
			t.Errorf("the swept user's process ended with %v, want SIGKILL", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the swept user's process still runs")
	}
	select {
	case err := <-others:
		t.Fatalf("another user's process was killed: %v", err)
	case err := <-root:
		t.Fatalf("a root process was killed: %v", err)
	case <-time.After(200 * time.Millisecond):
	}
}

// BenchmarkSweepUsers: what a game's end costs the LSPM with --game-uids
// (one user, nothing left running: one kill(-1) and one read of /proc),
// and the sweep of a whole 1,000-user range at start.
//
//	go test ./internal/lspm -run '^$' -bench SweepUsers -count 5
func BenchmarkSweepUsers(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("sweeping a user needs root")
	}
	b.Run("one", func(b *testing.B) {
		for b.Loop() {
			if len(sweepUsers(2000000499, 2000000500)) != 0 {
				b.Fatal("dirty")
			}
		}
	})
	b.Run("range1000", func(b *testing.B) {
		uids := make([]int, 1000)
		for i := range uids {
			uids[i] = 700001000 + i
		}
		for b.Loop() {
			if len(sweepUsers(2000000999, uids...)) != 0 {
				b.Fatal("dirty")
			}
		}
	})
}

// What a game's user leaves where every user can write is removed: files
// and directories in $TMPDIR, /var/tmp and /dev/shm, POSIX message queues
// (created here without /dev/mqueue being looked at: mq_open needs no
// mount), System V IPC. What another user owns there stays.
func TestRemoveUserLeftovers(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skipf("removing a user's files needs root; these tests run as user %d", os.Geteuid())
	}
	const uid, other = 2000000396, 2000000397
	if err := mountMqueue(); err != nil {
		t.Fatal(err)
	}
	var paths []string
	for _, dir := range []string{os.TempDir(), "/var/tmp", "/dev/shm"} {
		if _, err := os.Stat(dir); err != nil {
			continue
		}
		for _, owner := range []int{uid, other} {
			p := filepath.Join(dir, fmt.Sprintf("dedi-leftover-%d", owner))
			if err := os.WriteFile(p, []byte("secret of the previous game"), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Chown(p, owner, owner); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = os.Remove(p) })
			paths = append(paths, p)
		}
	}
	// Inside a root-owned sticky directory (as /tmp/.X11-unix) too.
	x11 := filepath.Join(os.TempDir(), fmt.Sprintf(".dedi-test-X11-unix-%d", uid))
	if err := os.Mkdir(x11, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(x11, 0o777|os.ModeSticky); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(x11) })
	for _, owner := range []int{uid, other} {
		p := filepath.Join(x11, fmt.Sprintf("X%d", owner))
		if err := os.WriteFile(p, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(p, owner, owner); err != nil {
			t.Fatal(err)
		}
		paths = append(paths, p)
	}
	queue := fmt.Sprintf("dedi-leftover-%d", uid)
	mqOpenAs(t, uid, queue, unix.O_CREAT|unix.O_RDWR)
	t.Cleanup(func() { _ = unix.Unlink(filepath.Join(mqueueDir, queue)) })

	removeUserLeftovers(map[int]bool{uid: true})
	for _, p := range paths {
		_, err := os.Lstat(p)
		if strings.HasSuffix(p, strconv.Itoa(uid)) && !os.IsNotExist(err) {
			t.Errorf("%s is left (%v)", p, err)
		}
		if strings.HasSuffix(p, strconv.Itoa(other)) && err != nil {
			t.Errorf("another user's %s was removed: %v", p, err)
		}
	}
	if _, err := os.Lstat(filepath.Join(mqueueDir, queue)); !os.IsNotExist(err) {
		t.Errorf("the message queue %s is left (%v)", queue, err)
	}
}

// mqOpenAs calls mq_open(2) from a thread whose effective user is uid, so
// that a queue it creates is uid's.
func mqOpenAs(t *testing.T, uid int, name string, flags int) {
	t.Helper()
	done := make(chan error, 1)
	go onSpareThread(func() {
		if err := setThreadUsers(0, uid); err != nil {
			done <- err
			return
		}
		p, err := unix.BytePtrFromString(name)
		if err == nil {
			fd, _, e := unix.Syscall6(unix.SYS_MQ_OPEN, uintptr(unsafe.Pointer(p)), uintptr(flags), 0o600, 0, 0, 0)
			if e != 0 {
				err = e
			} else {
				unix.Close(int(fd))
			}
		}
		if e := backToRoot(); e != nil && err == nil {
			err = e
		}
		done <- err
	})
	if err := <-done; err != nil {
		t.Fatalf("mq_open %s as user %d: %v", name, uid, err)
	}
}

// sweeperChildEnv makes this test binary a process that sweeps 300 users
// of its own from its main goroutine, as a shim or a starting LSPM does,
// then exits 0.
const sweeperChildEnv = "DEDI_TEST_SWEEPER_CHILD"

// TestMain runs the sweeper child from the main goroutine, as a shim
// sweeps (package init would lock it to the main thread).
func TestMain(m *testing.M) {
	if first, err := strconv.Atoi(os.Getenv(sweeperChildEnv)); err == nil {
		// One sweep of many users, as an LSPM's start does: a process's
		// first sweep is the one whose goroutine may get the main thread.
		runtime.GOMAXPROCS(1) // as the shim runs
		uids := make([]int, 300)
		for i := range uids {
			uids[i] = first + i
		}
		sweepUsers(2000000398, uids...)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// Sweeps running at once in several processes (shims whose games end
// together, an LSPM starting) must not kill each other: a sweep never
// changes the credentials of its process's main thread, by which the
// kernel judges a signal to the process.
func TestConcurrentSweepsSpareEachOther(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skipf("sweeping a user needs root; these tests run as user %d", os.Geteuid())
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	for range 5 {
		var cmds []*exec.Cmd
		for i := range 8 {
			cmd := exec.Command(self, "-test.run", "^$")
			cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%d", sweeperChildEnv, 2000002000+i*300))
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			cmds = append(cmds, cmd)
		}
		for _, cmd := range cmds {
			if err := cmd.Wait(); err != nil {
				t.Errorf("sweeper pid %d: %v", cmd.Process.Pid, err)
			}
		}
	}
}

// A key a game stores in its user keyring is gone for the next game of
// its user.
func TestRemoveUserLeftoversClearsKeyrings(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skipf("reaching another user's keyrings needs root; these tests run as user %d", os.Geteuid())
	}
	const uid = 2000000399
	asUser := func(f func() error) error {
		done := make(chan error, 1)
		onSpareThread(func() {
			if err := setThreadUsers(uid, uid); err != nil {
				done <- err
				return
			}
			err := f()
			if e := backToRoot(); e != nil && err == nil {
				err = e
			}
			done <- err
		})
		return <-done
	}
	// In the user keyring, and in the persistent one where the kernel has
	// it (it outlives the user's processes for days).
	persistent := func() (int, error) {
		return unix.KeyctlInt(unix.KEYCTL_GET_PERSISTENT, -1, unix.KEY_SPEC_THREAD_KEYRING, 0, 0)
	}
	hasPersistent := asUser(func() error { _, err := persistent(); return err }) == nil
	if err := asUser(func() error {
		if _, err := unix.AddKey("user", "dedi-leftover", []byte("secret of the previous game"), unix.KEY_SPEC_USER_KEYRING); err != nil {
			return err
		}
		if hasPersistent {
			ring, err := persistent()
			if err != nil {
				return err
			}
			_, err = unix.AddKey("user", "dedi-leftover-persistent", []byte("secret"), ring)
			return err
		}
		return nil
	}); err != nil {
		t.Fatalf("add keys as user %d: %v", uid, err)
	}
	find := func(desc string, ring func() (int, error)) func() error {
		return func() error {
			id, err := ring()
			if err != nil {
				return err
			}
			_, err = unix.KeyctlSearch(id, "user", desc, 0)
			return err
		}
	}
	userRing := func() (int, error) { return unix.KEY_SPEC_USER_KEYRING, nil }
	if err := asUser(find("dedi-leftover", userRing)); err != nil {
		t.Fatalf("the key is not there to begin with: %v", err)
	}
	removeUserLeftovers(map[int]bool{uid: true})
	if err := asUser(find("dedi-leftover", userRing)); !errors.Is(err, unix.ENOKEY) {
		t.Errorf("the next game of user %d finds the key: %v, want ENOKEY", uid, err)
	}
	if !hasPersistent {
		t.Log("this kernel has no persistent keyrings")
		return
	}
	if err := asUser(find("dedi-leftover-persistent", persistent)); !errors.Is(err, unix.ENOKEY) {
		t.Errorf("the next game of user %d finds the key in its persistent keyring: %v, want ENOKEY", uid, err)
	}
}
