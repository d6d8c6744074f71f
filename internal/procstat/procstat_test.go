package procstat

import (
	"os"
	"os/exec"
	"testing"

	"golang.org/x/sys/unix"
)

func TestStat(t *testing.T) {
	state, start, err := Stat(os.Getpid())
	if err != nil || state != 'R' && state != 'S' || start == 0 {
		t.Fatalf("own stat: %c %d %v", state, start, err)
	}
	if s, err := StartTime(os.Getpid()); err != nil || s != start {
		t.Fatalf("own start time %d %v, want %d", s, err, start)
	}
	// A zombie has a start time but is no live process.
	cmd := exec.Command("/bin/true")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Wait()
	var info unix.Siginfo // wait for the exit without reaping: a zombie
	if err := unix.Waitid(unix.P_PID, cmd.Process.Pid, &info, unix.WEXITED|unix.WNOWAIT, nil); err != nil {
		t.Fatal(err)
	}
	state, _, err = Stat(cmd.Process.Pid)
	if err != nil || state != 'Z' {
		t.Fatalf("zombie: %c %v", state, err)
	}
	if _, err := StartTime(cmd.Process.Pid); err == nil {
		t.Fatal("StartTime of a zombie")
	}
	if _, _, err := Stat(1 << 30); err == nil {
		t.Fatal("Stat of no process")
	}
}
