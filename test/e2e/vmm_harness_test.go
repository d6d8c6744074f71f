package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"dedi.dev/dedi/api"
)

// vmmProc is one running dedi vmm with the local provider.
type vmmProc struct {
	t       testing.TB
	url     string
	token   string
	dataDir string
	args    []string
	cmd     *exec.Cmd
	logs    *syncBuffer
	exited  chan struct{}
}

// syncBuffer is a bytes.Buffer that a process writes while a test reads.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// hostBase hands each VMM of the run its own block of loopback addresses
// and game ports for its local machines.
var hostBase atomic.Int32

const adminToken = "admin-token-for-tests-0123456789"

// startVMM starts a VMM whose local machines get their own addresses and
// ports, with a short report interval so tests are quick.
func startVMM(t testing.TB, extra ...string) *vmmProc {
	t.Helper()
	n := int(hostBase.Add(1) - 1)
	// 127.0.0.20-159 in blocks of 5 machines, each with 100 game ports
	// from 51000 on: room for 28 VMMs in one run.
	first := 20 + n*5
	if first+4 > 159 {
		t.Fatal("out of loopback blocks")
	}
	dir := t.TempDir()
	args := []string{"vmm", "--listen", "127.0.0.1:0", "--data-dir", dir, "--report-interval", "200ms",
		"--local-first-host", fmt.Sprint(first), "--local-last-host", fmt.Sprint(first + 4), "--local-port-base", fmt.Sprint(51000 + n*500), "--log-level", "info"}
	args = append(args, extra...)
	v := &vmmProc{t: t, token: adminToken, dataDir: dir, args: args}
	t.Cleanup(v.cleanup) // first: a start that fails still gets cleaned up
	v.start()
	return v
}

func (v *vmmProc) start() {
	v.t.Helper()
	v.logs = &syncBuffer{}
	args := v.args
	if v.url != "" { // a restart listens where the machines report
		for i, a := range args {
			if a == "--listen" {
				args[i+1] = strings.TrimPrefix(v.url, "http://")
			}
		}
	}
	v.cmd = exec.Command(dediBin, args...)
	v.cmd.Env = append(os.Environ(), api.EnvAdminToken+"="+v.token)
	v.cmd.Stdout, v.cmd.Stderr = v.logs, v.logs
	if err := v.cmd.Start(); err != nil {
		v.t.Fatal(err)
	}
	v.exited = make(chan struct{})
	go func(c *exec.Cmd, done chan struct{}) { _ = c.Wait(); close(done) }(v.cmd, v.exited)
	deadline := time.Now().Add(15 * time.Second)
	for {
		if v.url != "" {
			if resp, err := http.Get(v.url + "/healthz"); err == nil {
				resp.Body.Close()
				if resp.StatusCode == 200 {
					return
				}
			}
		} else if i := strings.Index(v.logs.String(), `"vmm listening" addr=`); i >= 0 {
			rest := v.logs.String()[i+len(`"vmm listening" addr=`):]
			v.url = "http://" + strings.Fields(rest)[0]
			return
		}
		select {
		case <-v.exited:
			v.t.Fatalf("vmm exited at start:\n%s", v.logs)
		default:
		}
		if time.Now().After(deadline) {
			v.t.Fatalf("vmm did not start:\n%s", v.logs)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (v *vmmProc) kill9() {
	_ = v.cmd.Process.Signal(syscall.SIGKILL)
	<-v.exited
}

// cleanup kills the VMM and every machine and game it left.
func (v *vmmProc) cleanup() {
	if v.exited == nil { // never started
		return
	}
	select {
	case <-v.exited:
	default:
		v.kill9()
	}
	machines, _ := filepath.Glob(filepath.Join(v.dataDir, "machines", "machines", "*"))
	for _, m := range machines {
		killUnder(filepath.Join(m, "lspm"))
		if raw, err := os.ReadFile(filepath.Join(m, "machine.json")); err == nil {
			var mj struct {
				PID int `json:"pid"`
			}
			if jsonUnmarshal(raw, &mj) == nil && mj.PID > 0 {
				_ = syscall.Kill(mj.PID, syscall.SIGKILL)
			}
		}
	}
	if v.t.Failed() {
		v.t.Logf("vmm log:\n%s", v.logs)
	}
}

// fleet creates a fleet of the echo example (or of the fake game server
// with fake's flags when given).
func (v *vmmProc) fleet(t testing.TB, f api.Fleet) api.Fleet {
	t.Helper()
	if f.Provider == "" {
		f.Provider = "local"
	}
	if f.Command == nil {
		f.Command = []string{echoBin}
	}
	var out api.Fleet
	code, raw := call(t, "POST", v.url+"/v1/fleets", v.token, f, &out)
	if code != 201 {
		t.Fatalf("create fleet: %d %s", code, raw)
	}
	return out
}

func (v *vmmProc) start1(t testing.TB, fleet string, wait bool) api.Process {
	t.Helper()
	url := v.url + "/v1/processes"
	if wait {
		url += "?wait=ready&timeout=30s"
	}
	var p api.Process
	code, raw := call(t, "POST", url, v.token, api.StartRequest{Fleet: fleet}, &p)
	if code != 201 {
		t.Fatalf("start: %d %s", code, raw)
	}
	return p
}

func (v *vmmProc) machines(t testing.TB, fleet string) []api.Machine {
	t.Helper()
	var l api.List[api.Machine]
	code, raw := call(t, "GET", v.url+"/v1/machines?fleet="+fleet, v.token, nil, &l)
	if code != 200 {
		t.Fatalf("machines: %d %s", code, raw)
	}
	return l.Items
}

func (v *vmmProc) process(t testing.TB, id string) api.Process {
	t.Helper()
	var p api.Process
	code, raw := call(t, "GET", v.url+"/v1/processes/"+id, v.token, nil, &p)
	if code != 200 {
		t.Fatalf("process %s: %d %s", id, code, raw)
	}
	return p
}

// eventually polls cond until it holds.
func eventually(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within %s: %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func jsonUnmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }
