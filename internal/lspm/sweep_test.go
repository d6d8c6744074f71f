package lspm

import (
	"bytes"
	"os"
	"os/exec"
	"strconv"
	"syscall"
	"testing"
	"time"
)

// A process that forks and exits without pause, each generation in a
// session of its own, outruns any scan of /proc: the sweep must still end
// it, and leave nothing of the user running.
func TestSweepUsersKillsForkHopper(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skipf("sweeping a user needs root; these tests run as user %d", os.Geteuid())
	}
	const uid = 700000390
	// Each generation starts the next one, detached, and exits at once.
	hop := `setsid -f sh -c "$HOP" </dev/null >/dev/null 2>&1; exit 0`
	for range 3 { // three chains of hoppers at once
		cmd := exec.Command("/bin/sh", "-c", hop)
		cmd.Env = []string{"HOP=" + hop, "PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
		cmd.Dir = "/"
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true,
			Credential: &syscall.Credential{Uid: uid, Gid: uid, Groups: []uint32{}}}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		go func() { _ = cmd.Wait() }()
	}
	t.Cleanup(func() {
		// Whatever the outcome, nothing of the test may outlive it.
		deadline := time.Now().Add(5 * time.Second)
		for anyRunsAs(uid) && time.Now().Before(deadline) {
			sweepUsers(uid)
		}
	})
	// A scan of /proc rarely catches a hopper between two forks, so the
	// proof that they run is the zombies they leave (nothing here reaps
	// what they orphan) piling up.
	deadline := time.Now().Add(5 * time.Second)
	for len(zombiesOf(t, uid)) < 30 {
		if time.Now().After(deadline) {
			t.Fatal("the hoppers never ran")
		}
		time.Sleep(10 * time.Millisecond)
	}

	if dirty := sweepUsers(uid); len(dirty) != 0 {
		t.Fatalf("the sweep could not empty user %d", uid)
	}
	// Nothing may come back: a survivor would fork its next generation,
	// and leave one more zombie.
	n := len(zombiesOf(t, uid))
	time.Sleep(300 * time.Millisecond)
	if anyRunsAs(uid) || len(zombiesOf(t, uid)) > n {
		t.Fatalf("a process of user %d survived the sweep", uid)
	}
	// The goroutine's thread took root back: the LSPM's own powers are
	// intact (a root-only call still works from this process).
	if dirty := sweepUsers(uid); len(dirty) != 0 {
		t.Fatal("a second sweep of an empty user failed")
	}
	if err := syscall.Setpriority(syscall.PRIO_PROCESS, 0, 0); err != nil {
		t.Fatalf("root-only call after the sweep: %v", err)
	}
}

// The sweep never touches root (kill(-1) as root is every process) nor
// processes of other users.
func TestSweepUsersSparesOthers(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skipf("sweeping a user needs root; these tests run as user %d", os.Geteuid())
	}
	other := exec.Command("/bin/sleep", "30")
	other.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 700000391, Gid: 700000391, Groups: []uint32{}}}
	if err := other.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = other.Process.Kill(); _ = other.Wait() })
	mine := exec.Command("/bin/sleep", "30")
	if err := mine.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = mine.Process.Kill(); _ = mine.Wait() })

	if dirty := sweepUsers(0, 700000392); len(dirty) != 0 {
		t.Fatalf("dirty %v", dirty)
	}
	time.Sleep(50 * time.Millisecond)
	for _, c := range []*exec.Cmd{other, mine} {
		if err := c.Process.Signal(syscall.Signal(0)); err != nil {
			t.Fatalf("pid %d was killed by a sweep of another user: %v", c.Process.Pid, err)
		}
	}
}

// zombiesOf lists the processes of uid that ended and wait to be reaped
// (the sandbox's PID 1 may never reap them; a subreaper may).
func zombiesOf(t *testing.T, uid int) []int {
	t.Helper()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		raw, err := os.ReadFile("/proc/" + e.Name() + "/status")
		if err != nil || !bytes.Contains(raw, []byte("\nState:\tZ")) {
			continue
		}
		_, rest, _ := bytes.Cut(raw, []byte("\nUid:"))
		if f := bytes.Fields(rest); len(f) > 0 && string(f[0]) == strconv.Itoa(uid) {
			out = append(out, pid)
		}
	}
	return out
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
			if len(sweepUsers(700000500)) != 0 {
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
			if len(sweepUsers(uids...)) != 0 {
				b.Fatal("dirty")
			}
		}
	})
}
