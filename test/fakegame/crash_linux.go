//go:build linux

package fakegame

import (
	"os"
	"syscall"
	"time"
	"unsafe"
)

// dieBySignal ends the process by sig, as the kernel would end a C game
// server: the exit status says "killed by signal", not an exit code. The Go
// runtime catches SIGSEGV and SIGABRT itself (it ignores a SIGSEGV sent by
// kill, and turns SIGABRT into exit code 2), so the signal's default action
// is put back first. No core file is written.
func dieBySignal(sig syscall.Signal) {
	_ = syscall.Setrlimit(syscall.RLIMIT_CORE, &syscall.Rlimit{})
	if sig != syscall.SIGKILL {
		// A zeroed kernel struct sigaction: SIG_DFL, no flags, empty mask.
		var act [4]uint64
		_, _, _ = syscall.RawSyscall6(syscall.SYS_RT_SIGACTION, uintptr(sig),
			uintptr(unsafe.Pointer(&act)), 0, 8, 0, 0)
	}
	_ = syscall.Kill(os.Getpid(), sig)
	time.Sleep(5 * time.Second) // the signal arrives meanwhile
	os.Exit(128 + int(sig))
}
