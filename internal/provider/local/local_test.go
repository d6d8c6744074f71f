package local

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"dedi.dev/dedi/api"
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
	cmd := exec.Command("go", "build", "-o", dediBin, "dedi.dev/dedi/cmd/dedi")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build dedi: %v\n%s", err, out)
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
	return Config{Dir: dir, Binary: dediBin, FirstHost: 200, LastHost: 250, LSPMPort: 7701,
		PortBase: 45000, PortsPerMachine: 100, Logger: testLogger(t)}
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// tWriter sends log lines to t.Log.
type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
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
	t.Cleanup(func() {
		l, err := New(testConfig(t, dir))
		if err != nil {
			t.Error(err)
			return
		}
		defer l.Close()
		ms, _ := l.List(context.Background(), "")
		for _, m := range ms {
			t.Errorf("machine %s left behind; deleting it", m.ProviderID)
			_ = l.Delete(context.Background(), m.ProviderID)
		}
	})
}

// fakeVMM answers LSPM status reports and counts them per machine.
type fakeVMM struct {
	*httptest.Server
	mu      sync.Mutex
	tokens  map[string]string // machine id -> token
	reports map[string]int
}

func newFakeVMM(t *testing.T) *fakeVMM {
	v := &fakeVMM{tokens: map[string]string{}, reports: map[string]int{}}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/machines/{id}/status", func(w http.ResponseWriter, r *http.Request) {
		id := r.PathValue("id")
		var st api.Status
		if err := json.NewDecoder(r.Body).Decode(&st); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		v.mu.Lock()
		ok := v.tokens[id] != "" && r.Header.Get("Authorization") == "Bearer "+v.tokens[id] && st.MachineID == id
		if ok {
			v.reports[id]++
		}
		v.mu.Unlock()
		if !ok {
			w.Header().Set("WWW-Authenticate", "Bearer")
			http.Error(w, "unauthorized", http.StatusUnauthorized)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"applied":true}`)
	})
	v.Server = httptest.NewServer(mux)
	t.Cleanup(v.Close)
	return v
}

func (v *fakeVMM) reportsOf(id string) int {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.reports[id]
}

// spec returns a Spec for a machine that hosts dedi's echo example and
// reports to v.
func (v *fakeVMM) spec(t *testing.T, machineID, fleet string) provider.Spec {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	token := hex.EncodeToString(b)
	v.mu.Lock()
	v.tokens[machineID] = token
	v.mu.Unlock()
	return provider.Spec{MachineID: machineID, Fleet: fleet, Token: token, VMMURL: v.URL,
		Command: []string{dediBin, "example", "echo"}, MaxProcesses: 2, ReportInterval: 200 * time.Millisecond}
}

func TestProviderContract(t *testing.T) {
	dir := t.TempDir()
	cleanupDir(t, dir)
	vmm := newFakeVMM(t)
	providertest.Run(t, func(t *testing.T) provider.Provider { return newLocal(t, dir) }, vmm.spec)
}

// TestDeleteLeavesNoProcess: a machine running a game server, deleted,
// leaves neither its LSPM nor the game behind; its reports reached the
// VMM; the token never shows on a command line.
func TestDeleteLeavesNoProcess(t *testing.T) {
	dir := t.TempDir()
	cleanupDir(t, dir)
	vmm := newFakeVMM(t)
	l := newLocal(t, dir)
	sp := vmm.spec(t, "m-noleak", "f")
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
	waitFor(t, "a status report at the VMM", func() bool { return vmm.reportsOf(sp.MachineID) > 0 })

	if err := l.Delete(t.Context(), m.ProviderID); err != nil {
		t.Fatal(err)
	}
	for what, pid := range map[string]int{"LSPM": rec.PID, "game server": game.PID} {
		if _, err := startTime(pid); err == nil {
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
	vmm := newFakeVMM(t)
	l := newLocal(t, dir)
	sp := vmm.spec(t, "m-died", "f")
	m, err := l.Create(t.Context(), sp)
	if err != nil {
		t.Fatal(err)
	}
	rec, _ := readRecord(l.machineDir(m.ProviderID))
	game := spawnReady(t, m, sp.Token)
	if err := syscall.Kill(rec.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the LSPM to die", func() bool { _, err := startTime(rec.PID); return err != nil })
	if _, err := startTime(game.PID); err != nil {
		t.Fatalf("game server gone with its LSPM: %v", err)
	}
	ms, err := l.List(t.Context(), "f")
	if err != nil || len(ms) != 1 || ms[0].ProviderID != m.ProviderID {
		t.Errorf("List after the LSPM died = %+v, %v; want the machine", ms, err)
	}
	if err := l.Delete(t.Context(), m.ProviderID); err != nil {
		t.Fatal(err)
	}
	if _, err := startTime(game.PID); err == nil {
		t.Errorf("game server (pid %d) still runs after Delete", game.PID)
	}
}

// TestCloseLeavesMachinesRunning: closing the provider (a VMM stopping)
// does not stop its machines; a new provider on the dir deletes them.
func TestCloseLeavesMachinesRunning(t *testing.T) {
	dir := t.TempDir()
	cleanupDir(t, dir)
	vmm := newFakeVMM(t)
	l, err := New(testConfig(t, dir))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() }) // Close is idempotent
	sp := vmm.spec(t, "m-close", "f")
	m, err := l.Create(t.Context(), sp)
	if err != nil {
		t.Fatal(err)
	}
	waitHealthy(t, m)
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Create(t.Context(), vmm.spec(t, "m-closed", "f")); err == nil {
		t.Error("Create on a closed provider succeeded")
	}
	waitHealthy(t, m)
	rec, _ := readRecord(l.machineDir(m.ProviderID))
	l2 := newLocal(t, dir)
	if err := l2.Delete(t.Context(), m.ProviderID); err != nil {
		t.Fatal(err)
	}
	// The LSPM was this process's child, no longer watched: Delete
	// collected it, no zombie is left.
	if _, err := os.Stat("/proc/" + strconv.Itoa(rec.PID)); err == nil {
		if _, s, _ := procStat(rec.PID); s == rec.PIDStart {
			t.Errorf("LSPM (pid %d) left as a zombie", rec.PID)
		}
	}
	if code, err := httpGet(m.LSPMURL+"/healthz", ""); err == nil {
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
	vmm := newFakeVMM(t)
	for name, sp := range map[string]provider.Spec{
		"bad id":   vmm.spec(t, "../x", "f"),
		"no token": {MachineID: "m-x", Fleet: "f"},
		"image":    {MachineID: "m-x", Fleet: "f", Token: "t", Image: "img"},
	} {
		if _, err := l.Create(t.Context(), sp); err == nil {
			t.Errorf("%s: Create succeeded", name)
		}
	}
	m, err := l.Create(t.Context(), vmm.spec(t, "m-one", "f"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Delete(context.Background(), m.ProviderID) })
	if _, err := l.Create(t.Context(), vmm.spec(t, "m-one", "f")); err == nil {
		t.Error("Create of an existing machine id succeeded")
	}
	if _, err := l.Create(t.Context(), vmm.spec(t, "m-two", "f")); !errors.Is(err, provider.ErrNoCapacity) {
		t.Errorf("Create past the last host: %v, want ErrNoCapacity", err)
	}
}

func TestConfig(t *testing.T) {
	c := Config{Dir: "x"}.withDefaults()
	if err := c.Validate(); err != nil {
		t.Fatalf("defaults: %v", err)
	}
	for n, want := range map[int][2]int{10: {30000, 30099}, 11: {30100, 30199}, 250: {54000, 54099}} {
		if lo, hi := c.ports(n); lo != want[0] || hi != want[1] {
			t.Errorf("ports(%d) = %d-%d, want %d-%d", n, lo, hi, want[0], want[1])
		}
	}
	for name, bad := range map[string]Config{
		"no dir":         {},
		"hosts":          {Dir: "x", FirstHost: 20, LastHost: 10},
		"host 255":       {Dir: "x", LastHost: 255},
		"ports past 64K": {Dir: "x", PortBase: 60000},
		"lspm in range":  {Dir: "x", LSPMPort: 30050},
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
	waitHealthy(t, m)
	var p api.Process
	if code, body := httpDo(t, http.MethodPost, m.LSPMURL+"/v1/processes", token, `{}`, &p); code != http.StatusCreated {
		t.Fatalf("spawn: %d %s", code, body)
	}
	waitFor(t, "the game server to be ready", func() bool {
		httpDo(t, http.MethodGet, m.LSPMURL+"/v1/processes/"+p.ID, token, "", &p)
		return p.State == api.StateReady
	})
	if p.PID <= 0 {
		t.Fatalf("ready process without pid: %+v", p)
	}
	return p
}

func waitHealthy(t *testing.T, m provider.Machine) {
	t.Helper()
	waitFor(t, "the LSPM to answer", func() bool {
		code, err := httpGet(m.LSPMURL+"/healthz", "")
		return err == nil && code == http.StatusOK
	})
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

var client = &http.Client{Timeout: 5 * time.Second}

func httpGet(url, token string) (int, error) {
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	return resp.StatusCode, nil
}

// httpDo makes a request and decodes a 2xx JSON answer into out.
func httpDo(t *testing.T, method, url, token, body string, out any) (int, []byte) {
	t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	if resp.StatusCode/100 == 2 && out != nil {
		if err := json.Unmarshal(raw, out); err != nil {
			t.Fatalf("%s %s: %v in %s", method, url, err, raw)
		}
	}
	return resp.StatusCode, raw
}
