package qemu

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
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
	"dedi.dev/dedi/internal/image"
	"dedi.dev/dedi/internal/provider"
	"dedi.dev/dedi/internal/provider/providertest"
)

// The tests boot real VMs from an image of dedi's echo example, built
// once in TestMain. They use the loopback addresses 127.0.0.170-179 and
// game ports 42000-42099 (10 per machine); test/e2e's qemu tests use
// 127.0.0.180-189 and 42100-42199.

var (
	imageRef string // qemu:/... built in TestMain
	skipWhy  string // why VMs cannot run on this machine at all
)

func TestMain(m *testing.M) {
	os.Exit(testMain(m))
}

func testMain(m *testing.M) int {
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		skipWhy = "qemu-system-x86_64 is not installed (scripts/ci-deps.sh installs it)"
		return m.Run()
	}
	if ks, _ := filepath.Glob(image.KernelGlob); len(ks) == 0 {
		skipWhy = "no kernel matches " + image.KernelGlob + " (scripts/ci-deps.sh installs linux-image-cloud-amd64)"
		return m.Run()
	}
	dir, err := os.MkdirTemp("", "dedi-qemu-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	build := filepath.Join(dir, "build")
	for _, b := range []struct{ out, pkg string }{
		{filepath.Join(dir, "dedi"), "dedi.dev/dedi/cmd/dedi"},
		{filepath.Join(build, "echo"), "dedi.dev/dedi/examples/echo"},
	} {
		cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", b.out, b.pkg)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "build %s: %v\n%s", b.pkg, err, out)
			return 1
		}
	}
	imageRef, err = image.Build(context.Background(), image.Options{Format: "qemu", Name: "echo", BuildDir: build,
		Command: []string{"echo"}, OutDir: filepath.Join(dir, "images"), DediBinary: filepath.Join(dir, "dedi"), DediVersion: "test"})
	if err != nil {
		fmt.Fprintln(os.Stderr, "build image:", err)
		return 1
	}
	return m.Run()
}

func needVMs(t *testing.T) {
	t.Helper()
	if skipWhy != "" {
		t.Skip(skipWhy)
	}
}

func testConfig(t *testing.T, dir string) Config {
	return Config{Dir: dir, Accel: "tcg", MemoryMiB: 256, FirstHost: 170, LastHost: 179, LSPMPort: 7701,
		PortBase: 42000, PortsPerMachine: 10, Logger: testLogger(t)}
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func newQEMU(t *testing.T, dir string) *QEMU {
	t.Helper()
	q, err := New(testConfig(t, dir))
	if err != nil {
		t.Fatal(err)
	}
	return q
}

// cleanupDir kills, when t ends, every qemu whose command line names a
// file under dir, and shows the console logs of a failed test.
func cleanupDir(t *testing.T, dir string) {
	t.Cleanup(func() {
		if t.Failed() {
			logs, _ := filepath.Glob(filepath.Join(dir, "machines", "*", consoleFile))
			for _, l := range logs {
				raw, _ := os.ReadFile(l)
				t.Logf("%s:\n%s", l, raw)
			}
		}
		for _, pid := range qemuPIDsUnder(dir) {
			t.Errorf("qemu (pid %d) left running; killing it", pid)
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	})
}

// qemuPIDsUnder lists the processes whose command line names a path
// under dir.
func qemuPIDsUnder(dir string) []int {
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		raw, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err == nil && bytes.Contains(raw, []byte(dir+"/")) && bytes.Contains(raw, []byte("qemu")) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// fakeVMM answers LSPM status reports and counts them per machine.
type fakeVMM struct {
	*httptest.Server
	mu      sync.Mutex
	tokens  map[string]string
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
	// httptest listens on 127.0.0.1, which the guests reach as 10.0.2.2.
	v.Server = httptest.NewServer(mux)
	t.Cleanup(v.Close)
	return v
}

func (v *fakeVMM) reportsOf(id string) int {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.reports[id]
}

// spec returns a Spec for a machine of the echo image reporting to v.
func (v *fakeVMM) spec(t *testing.T, machineID, fleet string) provider.Spec {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	token := hex.EncodeToString(b)
	v.mu.Lock()
	v.tokens[machineID] = token
	v.mu.Unlock()
	return provider.Spec{MachineID: machineID, Fleet: fleet, Token: token, VMMURL: v.URL, Image: imageRef,
		MaxProcesses: 2, ReportInterval: 200 * time.Millisecond}
}

func TestProviderContract(t *testing.T) {
	needVMs(t)
	dir := t.TempDir()
	cleanupDir(t, dir)
	vmm := newFakeVMM(t)
	providertest.Run(t, func(t *testing.T) provider.Provider { return newQEMU(t, dir) }, vmm.spec)
}

