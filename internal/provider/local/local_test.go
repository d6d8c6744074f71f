package local

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"dedi.dev/dedi/api"
	"dedi.dev/dedi/internal/procstat"
	"dedi.dev/dedi/internal/provider"
	"dedi.dev/dedi/internal/provider/providertest"
)

var dediBin string // built in TestMain

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "dedi-local-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	dediBin = filepath.Join(dir, "dedi")
	if err := providertest.GoBuild(dediBin, "dedi.dev/dedi/cmd/dedi"); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// testConfig keeps clear of the defaults (and of dedi up) so that tests
// run beside a real dedi.
func testConfig(t *testing.T, dir string) Config {
	return Config{Dir: dir, Binary: dediBin, Hosts: provider.Hosts{FirstHost: 200, LastHost: 250, LSPMPort: 7701,
		PortBase: 45000, PortsPerMachine: 100}, Logger: providertest.Logger(t)}
}

// newLocal opens a Local on dir, closed when t ends.
func newLocal(t *testing.T, dir string) *Local {
	t.Helper()
	l, err := New(testConfig(t, dir))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// cleanupDir deletes every machine left in dir when t ends.
func cleanupDir(t *testing.T, dir string) {
	providertest.CheckNoneLeft(t, func() (provider.Provider, error) { return New(testConfig(t, dir)) })
}

// newVMM starts a stand-in VMM whose machines host dedi's echo example.
func newVMM(t *testing.T) *providertest.VMM {
	return providertest.NewVMM(t, provider.Spec{Command: []string{dediBin, "example", "echo"},
		MaxProcesses: 2, ReportInterval: 200 * time.Millisecond})
}

func TestProviderContract(t *testing.T) {
	dir := t.TempDir()
	cleanupDir(t, dir)
	vmm := newVMM(t)
	providertest.Run(t, func(t *testing.T) provider.Provider { return newLocal(t, dir) }, vmm.Spec)
}

// TestDeleteLeavesNoProcess: a machine running a game server, deleted,
// leaves neither its LSPM nor the game behind; its reports reached the
// VMM; the token never shows on a command line.
func TestDeleteLeavesNoProcess(t *testing.T) {
	dir := t.TempDir()
	cleanupDir(t, dir)
	vmm := newVMM(t)
	l := newLocal(t, dir)
	sp := vmm.Spec(t, "m-noleak", "f")
	m, err := l.Create(t.Context(), sp)
	if err != nil {
		t.Fatal(err)
	}
	rec, err := readRecord(l.machineDir(m.ProviderID))
	if err != nil {
		t.Fatal(err)
	}
	if cmdline, _ := os.ReadFile("/proc/" + strconv.Itoa(rec.PID) + "/cmdline"); bytes.Contains(cmdline, []byte(sp.Token)) {
		t.Error("the machine token is on the LSPM's command line")
	}
	game := spawnReady(t, m, sp.Token)
	providertest.WaitFor(t, "a status report at the VMM", func() bool { return vmm.Reports(sp.MachineID) > 0 })

	if err := l.Delete(t.Context(), m.ProviderID); err != nil {
		t.Fatal(err)
	}
	for what, pid := range map[string]int{"LSPM": rec.PID, "game server": game.PID} {
		if _, err := procstat.StartTime(pid); err == nil {
			t.Errorf("%s (pid %d) still runs after Delete", what, pid)
		}
	}
	if _, err := os.Stat(l.machineDir(m.ProviderID)); !os.IsNotExist(err) {
		t.Errorf("machine dir still there after Delete: %v", err)
	}
}

// TestDeleteAfterLSPMDied: a machine whose LSPM was killed (its game
// server runs on) is still listed, and Delete kills the game server.
func TestDeleteAfterLSPMDied(t *testing.T) {
	dir := t.TempDir()
	cleanupDir(t, dir)
	vmm := newVMM(t)
	l := newLocal(t, dir)
	sp := vmm.Spec(t, "m-died", "f")
	m, err := l.Create(t.Context(), sp)
	if err != nil {
		t.Fatal(err)
	}
	rec, _ := readRecord(l.machineDir(m.ProviderID))
	game := spawnReady(t, m, sp.Token)
	if err := syscall.Kill(rec.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	providertest.WaitFor(t, "the LSPM to die", func() bool { _, err := procstat.StartTime(rec.PID); return err != nil })
	if _, err := procstat.StartTime(game.PID); err != nil {
		t.Fatalf("game server gone with its LSPM: %v", err)
	}
	ms, err := l.List(t.Context(), "f")
	if err != nil || len(ms) != 1 || ms[0].ProviderID != m.ProviderID {
		t.Errorf("List after the LSPM died = %+v, %v; want the machine", ms, err)
	}
	if err := l.Delete(t.Context(), m.ProviderID); err != nil {
		t.Fatal(err)
	}
	if _, err := procstat.StartTime(game.PID); err == nil {
		t.Errorf("game server (pid %d) still runs after Delete", game.PID)
	}
}

// TestCloseLeavesMachinesRunning: closing the provider (a VMM stopping)
// does not stop its machines; a new provider on the dir deletes them.
func TestCloseLeavesMachinesRunning(t *testing.T) {
	dir := t.TempDir()
	cleanupDir(t, dir)
	vmm := newVMM(t)
	l, err := New(testConfig(t, dir))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() }) // Close is idempotent
	sp := vmm.Spec(t, "m-close", "f")
	m, err := l.Create(t.Context(), sp)
	if err != nil {
		t.Fatal(err)
	}
	providertest.WaitHealthy(t, m)
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Create(t.Context(), vmm.Spec(t, "m-closed", "f")); err == nil {
		t.Error("Create on a closed provider succeeded")
	}
	providertest.WaitHealthy(t, m)
	rec, _ := readRecord(l.machineDir(m.ProviderID))
	l2 := newLocal(t, dir)
	if err := l2.Delete(t.Context(), m.ProviderID); err != nil {
		t.Fatal(err)
	}
	// The LSPM was this process's child, no longer watched: Delete
	// collected it, no zombie is left.
	if _, err := os.Stat("/proc/" + strconv.Itoa(rec.PID)); err == nil {
		if _, s, _ := procstat.Stat(rec.PID); s == rec.PIDStart {
			t.Errorf("LSPM (pid %d) left as a zombie", rec.PID)
		}
	}
	if code, _, _ := providertest.Send(http.MethodGet, m.LSPMURL+"/healthz", "", ""); code != 0 {
		t.Errorf("LSPM answers %d after Delete", code)
	}
}

func TestCreateErrors(t *testing.T) {
	dir := t.TempDir()
	cleanupDir(t, dir)
	cfg := testConfig(t, dir)
	cfg.FirstHost, cfg.LastHost = 240, 240
	l, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	vmm := newVMM(t)
	for name, sp := range map[string]provider.Spec{
		"bad id":   vmm.Spec(t, "../x", "f"),
		"no token": {MachineID: "m-x", Fleet: "f"},
		"image":    {MachineID: "m-x", Fleet: "f", Token: "t", Image: "img"},
	} {
		if _, err := l.Create(t.Context(), sp); err == nil {
			t.Errorf("%s: Create succeeded", name)
		}
	}
	m, err := l.Create(t.Context(), vmm.Spec(t, "m-one", "f"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Delete(context.Background(), m.ProviderID) })
	if _, err := l.Create(t.Context(), vmm.Spec(t, "m-one", "f")); err == nil {
		t.Error("Create of an existing machine id succeeded")
	}
	if _, err := l.Create(t.Context(), vmm.Spec(t, "m-two", "f")); !errors.Is(err, provider.ErrNoCapacity) {
		t.Errorf("Create past the last host: %v, want ErrNoCapacity", err)
	}
}

func TestConfig(t *testing.T) {
	c := Config{Dir: "x"}.withDefaults()
	if err := c.Validate(); err != nil {
		t.Fatalf("defaults: %v", err)
	}
	for n, want := range map[int][2]int{10: {30000, 30099}, 11: {30100, 30199}, 250: {54000, 54099}} {
		if lo, hi := c.Ports(n); lo != want[0] || hi != want[1] {
			t.Errorf("ports(%d) = %d-%d, want %d-%d", n, lo, hi, want[0], want[1])
		}
	}
	for name, bad := range map[string]Config{
		"no dir":         {},
		"hosts":          {Dir: "x", Hosts: provider.Hosts{FirstHost: 20, LastHost: 10}},
		"host 255":       {Dir: "x", Hosts: provider.Hosts{LastHost: 255}},
		"ports past 64K": {Dir: "x", Hosts: provider.Hosts{PortBase: 60000}},
		"lspm in range":  {Dir: "x", Hosts: provider.Hosts{LSPMPort: 30050}},
	} {
		if err := bad.withDefaults().Validate(); err == nil {
			t.Errorf("%s: Validate accepted %+v", name, bad)
		}
	}
}

// spawnReady starts the default game server on the machine through its
// LSPM and waits until it is ready.
func spawnReady(t *testing.T, m provider.Machine, token string) api.Process {
	t.Helper()
	p := providertest.SpawnReady(t, m, token, `{}`)
	if p.PID <= 0 {
		t.Fatalf("ready process without pid: %+v", p)
	}
	return p
}
