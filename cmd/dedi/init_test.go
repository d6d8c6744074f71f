package main

import (
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"dedi.dev/dedi/internal/image"
	"dedi.dev/dedi/internal/lspm"
)

// TestLSPMArgs: the guest's LSPM waits for an idle moment before it fills
// its shim pool, and gets the boot-time identity of every executable the
// host verified, before the default command.
func TestLSPMArgs(t *testing.T) {
	dir := t.TempDir()
	exe := filepath.Join(dir, "server")
	if err := os.WriteFile(exe, []byte("game"), 0o755); err != nil {
		t.Fatal(err)
	}
	sum := strings.Repeat("ab", 32)
	m := image.Manifest{Command: []string{exe}, Executables: []image.Executable{{Path: exe, SHA256: sum}}}
	cfg := image.GuestConfig{MachineID: "m1", LSPMPort: 7701, PortMin: 100, PortMax: 109, Address: "127.0.0.5"}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))

	if v := verifiedAtBoot(log, cfg, m); v != nil {
		t.Fatalf("verified %+v for an initramfs the host did not check", v)
	}
	cfg.Verified = true
	v := verifiedAtBoot(log, cfg, m)
	if len(v) != 1 || v[0].Path != exe || v[0].SHA256 != sum || v[0].Size != 4 {
		t.Fatalf("verified %+v, want %s with its identity", v, exe)
	}
	args := lspmArgs(cfg, m, v)
	dash := slices.Index(args, "--")
	if i := slices.Index(args, "--verified"); i < 0 || i > dash || args[i+1] != v[0].String() {
		t.Errorf("args %q: want --verified %s before --", args, v[0])
	}
	if back, err := lspm.ParseVerified(v[0].String()); err != nil || back != v[0] {
		t.Errorf("the LSPM reads %q as %+v, %v", v[0].String(), back, err)
	}
	if i := slices.Index(args, "--shim-pool-idle"); i < 0 || i > dash || args[i+1] != "2s" {
		t.Errorf("args %q: want --shim-pool-idle 2s", args)
	}
	if i := slices.Index(args, "--game-uids"); i < 0 || i > dash || args[i+1] != guestGameUIDs {
		t.Errorf("args %q: want --game-uids %s", args, guestGameUIDs)
	}
	if got := args[dash+1:]; !slices.Equal(got, []string{exe}) {
		t.Errorf("command %q, want the manifest's", got)
	}
}
