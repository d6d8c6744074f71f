package lspm

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

func writeExe(t *testing.T, p string, content []byte) string {
	t.Helper()
	if err := os.WriteFile(p, content, 0o755); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(content)
	return hex.EncodeToString(sum[:])
}

// TestAllowPrewarm: the LSPM's start hashes the pinned executables, so a
// first spawn finds the hash made; concurrent checks agree; a changed file
// is hashed again and refused.
func TestAllowPrewarm(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	game := filepath.Join(dir, "game")
	sum := writeExe(t, game, []byte("#!/bin/sh\nexit 0\n"))
	other := filepath.Join(dir, "other")
	writeExe(t, other, []byte("#!/bin/sh\nexit 1\n"))
	a, err := newAllowList([]string{other}, []Allowed{{Path: game, SHA256: sum}})
	if err != nil {
		t.Fatal(err)
	}
	a.prewarm(t.Context())
	a.mu.Lock()
	e, ok := a.cache[game]
	_, unpinned := a.cache[other]
	a.mu.Unlock()
	if !ok || e.sum != sum || unpinned {
		t.Fatalf("after prewarm the cache holds %+v (%v) and the unpinned one: %v; want the pinned game's hash only", e, ok, unpinned)
	}

	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := a.check(game); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}

	time.Sleep(10 * time.Millisecond) // a new mtime
	writeExe(t, game, []byte("#!/bin/sh\nexit 3\n"))
	if _, err := a.check(game); err == nil {
		t.Fatal("a changed pinned executable passed the check")
	}
}

// TestAllowHashConcurrent: checks racing the prewarm of a large file
// wait for its hash and get the right one (run with -race).
func TestAllowHashConcurrent(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	game := filepath.Join(dir, "game")
	big := make([]byte, 4<<20)
	sum := writeExe(t, game, big)
	a, err := newAllowList(nil, []Allowed{{Path: game, SHA256: sum}})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); a.prewarm(t.Context()) }()
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if got, err := a.hash(game); err != nil || got != sum {
				t.Errorf("hash = %s, %v; want %s", got, err, sum)
			}
		}()
	}
	wg.Wait()
}

// TestAllowSeed: a verified hash is taken for a file with the identity it
// was verified as, without reading it; a changed file is hashed again; a
// verified hash that is not the pin is not taken.
func TestAllowSeed(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	game := filepath.Join(dir, "game")
	pin := writeExe(t, game, []byte("#!/bin/sh\nexit 0\n"))
	// The file now differs from the pin: only a seed makes it pass.
	writeExe(t, game, []byte("#!/bin/sh\nexit 9\n"))
	v, err := VerifiedFile(game, pin)
	if err != nil {
		t.Fatal(err)
	}
	if back, err := ParseVerified(v.String()); err != nil || back != v {
		t.Fatalf("ParseVerified(%q) = %+v, %v; want %+v", v.String(), back, err, v)
	}
	a, err := newAllowList(nil, []Allowed{{Path: game, SHA256: pin}})
	if err != nil {
		t.Fatal(err)
	}
	other := v
	other.SHA256 = strings.Repeat("0", 64)
	if n := a.seed([]Verified{other}); n != 0 {
		t.Fatal("a verified hash other than the pin was taken")
	}
	if _, err := a.check(game); err == nil {
		t.Fatal("check passed a file that does not match its pin")
	}
	if n := a.seed([]Verified{v}); n != 1 {
		t.Fatalf("seed took %d, want 1", n)
	}
	if _, err := a.check(game); err != nil {
		t.Fatalf("check of a verified file: %v", err)
	}
	time.Sleep(10 * time.Millisecond)
	writeExe(t, game, []byte("#!/bin/sh\nexit 8\n"))
	if _, err := a.check(game); err == nil {
		t.Fatal("a file changed after its verification passed the check")
	}
}

func TestParseVerifiedErrors(t *testing.T) {
	sum := strings.Repeat("ab", 32)
	for _, s := range []string{"", "/x=" + sum, "/x@1:2:3:4:5", "x=" + sum + "@1:2:3:4:5", "/x=" + sum + "@1:2:3:4",
		"/x=" + sum + "@1:2:3:4:-5", "/x=zz@1:2:3:4:5", "/x=" + sum + "@a:2:3:4:5"} {
		if v, err := ParseVerified(s); err == nil {
			t.Errorf("ParseVerified(%q) = %+v", s, v)
		}
	}
}

func FuzzParseVerified(f *testing.F) {
	f.Add("/opt/game/echo=" + strings.Repeat("0f", 32) + "@1:2:3:4:5")
	f.Fuzz(func(t *testing.T, s string) {
		v, err := ParseVerified(s)
		if err != nil {
			return
		}
		if back, err := ParseVerified(v.String()); err != nil || back != v {
			t.Fatalf("%q: round trip %+v, %v; want %+v", s, back, err, v)
		}
	})
}
