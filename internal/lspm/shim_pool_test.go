package lspm

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeShim is a shim executable that notes each start in a file and
// waits for its spec, as a real one does.
func fakeShim(t *testing.T) (path string, starts func() int) {
	dir := t.TempDir()
	log := filepath.Join(dir, "starts")
	path = filepath.Join(dir, "shim")
	script := fmt.Sprintf("#!/bin/sh\necho started >> %s\nexec cat >/dev/null\n", log)
	if err := os.WriteFile(path, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return path, func() int {
		raw, _ := os.ReadFile(log)
		return strings.Count(string(raw), "started")
	}
}

type testWarn struct{ t *testing.T }

func (w testWarn) Warn(msg string, args ...any) { w.t.Log(append([]any{msg}, args...)...) }

func runPool(t *testing.T, p *shimPool) {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); p.fill(ctx) }()
	t.Cleanup(func() { cancel(); wg.Wait() })
}

func waitStarts(t *testing.T, starts func() int, want int) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); starts() < want; {
		if time.Now().After(deadline) {
			t.Fatalf("%d shim starts, want %d", starts(), want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestShimPoolFillsAtOnce: without an idle time, the pool starts its
// shims when the LSPM starts (and one more, waiting for a free slot).
func TestShimPoolFillsAtOnce(t *testing.T) {
	t.Parallel()
	path, starts := fakeShim(t)
	runPool(t, newShimPool(path, 2, 0, testWarn{t}))
	waitStarts(t, starts, 3)
}

// TestShimPoolIdle: with an idle time, no shim starts beside the LSPM's
// start or a spawn: only once nothing used the pool for that long.
func TestShimPoolIdle(t *testing.T) {
	t.Parallel()
	path, starts := fakeShim(t)
	const idle = time.Second
	p := newShimPool(path, 2, idle, testWarn{t})
	runPool(t, p)
	time.Sleep(idle / 2)
	if n := starts(); n != 0 {
		t.Fatalf("%d shims started within %v of the LSPM's start, want none before %v", n, idle/2, idle)
	}
	s, err := p.get() // a spawn: the pool is empty, so it starts its own
	if err != nil {
		t.Fatal(err)
	}
	defer s.discard()
	waitStarts(t, starts, 1)
	time.Sleep(idle * 3 / 4) // past the LSPM's start + idle, within the spawn's
	if n := starts(); n != 1 {
		t.Fatalf("%d shims started within %v of a spawn, want only the spawn's", n, idle*3/4)
	}
	waitStarts(t, starts, 1+3) // then the pool fills
	if s, err := p.get(); err != nil {
		t.Fatal(err)
	} else {
		s.discard()
	}
	if n := starts(); n != 4 {
		t.Errorf("a spawn took a pooled shim, yet %d shims were started, want 4", n)
	}
}
