package qemu

import (
	"bytes"
	"errors"
	"os"
	"strconv"
	"time"

	"golang.org/x/sys/unix"

	"dedi.dev/dedi/internal/procstat"
)

// cmdlineHas reports whether pid's command line has arg as one argument.
func cmdlineHas(pid int, arg string) bool {
	raw, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return false
	}
	for _, a := range bytes.Split(raw, []byte{0}) {
		if string(a) == arg {
			return true
		}
	}
	return false
}

// proc is a process held by a pidfd, so that neither a signal nor a wait
// can reach another process that reused its pid.
type proc struct{ fd int }

// openProc returns pid's process if it still runs, started at start (0:
// any time) and has pidfile, the machine's own, on its command line.
func openProc(pid int, start uint64, pidfile string) (proc, bool) {
	if pid <= 0 {
		return proc{}, false
	}
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return proc{}, false
	}
	// Checked after the open: if the pid was reused before it, the start
	// time or the command line differs now.
	state, s, err := procstat.Stat(pid)
	if err != nil || state == 'Z' || state == 'X' || (start != 0 && s != start) || !cmdlineHas(pid, pidfile) {
		unix.Close(fd)
		return proc{}, false
	}
	return proc{fd: fd}, true
}

func (p proc) signal(sig unix.Signal) error { return unix.PidfdSendSignal(p.fd, sig, nil, 0) }

func (p proc) close() { unix.Close(p.fd) }

// wait reports whether the process exited within d. qemu is not our
// child (it daemonized), so the pidfd's readability is all there is.
func (p proc) wait(d time.Duration) bool {
	fds := []unix.PollFd{{Fd: int32(p.fd), Events: unix.POLLIN}}
	deadline := time.Now().Add(d)
	for {
		left := time.Until(deadline)
		if left <= 0 {
			return false
		}
		n, err := unix.Poll(fds, int(left/time.Millisecond)+1)
		if err == nil && n > 0 {
			return true
		}
		if err != nil && !errors.Is(err, unix.EINTR) {
			return false
		}
	}
}
