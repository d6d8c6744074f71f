//go:build !linux

package fakegame

import (
	"os"
	"syscall"
	"time"
)

// dieBySignal ends the process by sig where the platform lets it; the Go
// runtime may turn SIGSEGV and SIGABRT into an ordinary exit.
func dieBySignal(sig syscall.Signal) {
	if p, err := os.FindProcess(os.Getpid()); err == nil {
		_ = p.Signal(sig)
	}
	time.Sleep(5 * time.Second)
	os.Exit(128 + int(sig))
}
