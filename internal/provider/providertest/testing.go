package providertest

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"dedi.dev/dedi/internal/provider"
)

// GoBuild builds package pkg into the file out with CGO_ENABLED=0 (a
// static binary, to run on a machine), passing flags to go build first:
// a backend's TestMain builds dedi and its game with it.
func GoBuild(out, pkg string, flags ...string) error {
	args := append(append([]string{"build"}, flags...), "-o", out, pkg)
	cmd := exec.Command("go", args...)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("build %s: %v\n%s", pkg, err, b)
	}
	return nil
}

// Logger returns a logger, at debug level, whose lines go to t.Log.
func Logger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// tWriter sends log lines to t.Log.
type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// WaitFor polls cond until it holds, and fails the test when it does not
// within BootTimeout, the time a backend may take for anything.
func WaitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(BootTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// CheckNoneLeft fails t if, when it ends, the provider that open returns
// still lists a machine, and deletes every machine it lists: a test that
// failed half-way leaves nothing running. The provider is closed after
// if it is an io.Closer.
func CheckNoneLeft(t *testing.T, open func() (provider.Provider, error)) {
	t.Cleanup(func() {
		p, err := open()
		if err != nil {
			t.Error(err)
			return
		}
		if c, ok := p.(io.Closer); ok {
			defer c.Close()
		}
		ms, err := p.List(context.Background(), "")
		if err != nil {
			t.Error(err)
		}
		for _, m := range ms {
			t.Errorf("machine %s (%s) left behind; deleting it", m.MachineID, m.ProviderID)
			_ = p.Delete(context.Background(), m.ProviderID)
		}
	})
}
