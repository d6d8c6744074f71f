// Package e2e holds black-box tests: they build the real dedi binary and
// the example game server and drive them only over REST and UDP, as a
// studio would. The test binary doubles as a misbehaving game server
// (test/fakegame) when run with DEDI_FAKEGAME=1.
package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"dedi.dev/dedi/api"
	"dedi.dev/dedi/test/fakegame"
	"golang.org/x/sys/unix"
)

var (
	dediBin  string // built dedi
	echoBin  string // built examples/echo
	probeBin string // built test/guestprobe (static), for qemu images
	selfBin  string // this test binary, the fake game server
)

func TestMain(m *testing.M) {
	if os.Getenv(fakegame.Env) == "1" {
		os.Exit(fakegame.Main(os.Args[1:]))
	}
	os.Exit(buildAndRun(m))
}

func buildAndRun(m *testing.M) int {
	dir, err := os.MkdirTemp("", "dedi-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	dediBin = filepath.Join(dir, "dedi")
	echoBin = filepath.Join(dir, "echo")
	probeBin = filepath.Join(dir, "guestprobe")
	for _, b := range []struct{ out, pkg string }{{dediBin, "dedi.dev/dedi/cmd/dedi"}, {echoBin, "dedi.dev/dedi/examples/echo"},
		{probeBin, "dedi.dev/dedi/test/guestprobe"}} {
		cmd := exec.Command("go", "build", "-o", b.out, b.pkg)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "build %s: %v\n%s", b.pkg, err, out)
			return 1
		}
	}
	if selfBin, err = os.Executable(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return m.Run()
}

// portBase hands each LSPM of the run a range of ports of its own.
var portBase atomic.Int32

const machineToken = "machine-token-for-tests-0123456789"

// lspm is one running dedi lspm.
type lspm struct {
	t       testing.TB
	url     string
	token   string
	dataDir string
	args    []string
	cmd     *exec.Cmd
	logs    *bytes.Buffer
	exited  chan struct{}
	inherit []*os.File // descriptors the LSPM inherits (3 up)
	keyring string     // a session keyring the LSPM starts in, as a service manager gives one
}

// startCmd starts l.cmd, in the session keyring l.keyring if set: from a
// thread that joined it (the fork inherits the thread's keyrings), which
// ends with its goroutine.
func (l *lspm) startCmd() error {
	if l.keyring == "" {
		return l.cmd.Start()
	}
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
		if _, err := unix.KeyctlJoinSessionKeyring(l.keyring); err != nil {
			done <- fmt.Errorf("join session keyring %q: %w", l.keyring, err)
			return
		}
		done <- l.cmd.Start()
	}()
	return <-done
}

type lspmOpts struct {
	maxProcesses int
	ports        int // size of the port range (default 40)
	extra        []string
	dataDir      string
	noDefault    bool
	inherit      []*os.File // descriptors the LSPM inherits (3 up), not close-on-exec
	keyring      string     // a named session keyring the LSPM starts in
}

// startLSPM starts an LSPM whose default command is the echo example and
// which also allows the fake game server.
func startLSPM(t testing.TB, o lspmOpts) *lspm {
	t.Helper()
	if o.maxProcesses == 0 {
		o.maxProcesses = 8
	}
	if o.ports == 0 {
		o.ports = 40
	}
	if o.dataDir == "" {
		o.dataDir = t.TempDir()
	}
	// Ranges are handed out one after another from 27000, below the
	// kernel's ephemeral ports (32768 up): a port the LSPM means to give a
	// game must not be one an outgoing connection happens to hold.
	lo := 27000 + int(portBase.Add(int32(o.ports))) - o.ports
	if lo+o.ports > 32768 {
		t.Fatal("out of LSPM port ranges below the ephemeral ports")
	}
	args := []string{"lspm", "--listen", "127.0.0.1:0", "--data-dir", o.dataDir, "--machine-id", "m-test",
		"--max-processes", strconv.Itoa(o.maxProcesses),
		"--port-range", fmt.Sprintf("%d-%d", lo, lo+o.ports-1),
		"--allow", selfBin, "--allow", echoBin}
	args = append(args, o.extra...)
	if !o.noDefault {
		args = append(args, "--", echoBin)
	}
	l := &lspm{t: t, token: machineToken, dataDir: o.dataDir, args: args, inherit: o.inherit, keyring: o.keyring}
	t.Cleanup(func() { l.cleanup() }) // first: a start that fails still gets cleaned up
	l.start()
	return l
}

func (l *lspm) start() {
	l.t.Helper()
	if l.url != "" {
		// A restart listens where the game servers' SDKs expect it.
		for i, a := range l.args {
			if a == "--listen" {
				l.args[i+1] = strings.TrimPrefix(l.url, "http://")
			}
		}
	}
	_ = os.Remove(filepath.Join(l.dataDir, "lspm.addr"))
	l.logs = &bytes.Buffer{}
	l.cmd = exec.Command(dediBin, l.args...)
	l.cmd.Env = append(os.Environ(), api.EnvMachineToken+"="+l.token)
	l.cmd.Stdout, l.cmd.Stderr = l.logs, l.logs
	l.cmd.ExtraFiles = l.inherit
	if err := l.startCmd(); err != nil {
		l.t.Fatal(err)
	}
	l.exited = make(chan struct{})
	go func(c *exec.Cmd, done chan struct{}) { _ = c.Wait(); close(done) }(l.cmd, l.exited)
	deadline := time.Now().Add(10 * time.Second)
	for {
		if b, err := os.ReadFile(filepath.Join(l.dataDir, "lspm.addr")); err == nil && len(b) > 0 {
			l.url = "http://" + string(b)
			return
		}
		select {
		case <-l.exited:
			l.t.Fatalf("lspm exited at start:\n%s", l.logs)
		default:
		}
		if time.Now().After(deadline) {
			l.t.Fatalf("lspm did not start:\n%s", l.logs)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// kill9 kills the LSPM process alone, as an OOM killer or a crash would.
func (l *lspm) kill9() {
	_ = l.cmd.Process.Signal(syscall.SIGKILL)
	<-l.exited
}

// stop sends SIGTERM and waits.
func (l *lspm) stop() {
	_ = l.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-l.exited:
	case <-time.After(30 * time.Second):
		l.t.Error("lspm did not exit on SIGTERM")
		l.kill9()
	}
}

// cleanup kills the LSPM and every process it left (shims and game groups).
func (l *lspm) cleanup() {
	if l.exited == nil { // never started
		return
	}
	select {
	case <-l.exited:
	default:
		l.kill9()
	}
	killUnder(l.dataDir)
	if l.t.Failed() {
		l.t.Logf("lspm log:\n%s", l.logs)
	}
}

// killUnder kills every shim of dataDir and its game's process group, and
// waits for them to be gone so the directory can be removed.
func killUnder(dataDir string) {
	var pids []int
	recs, _ := filepath.Glob(filepath.Join(dataDir, "processes", "*", "record.json"))
	for _, r := range recs {
		var rec struct {
			Process api.Process `json:"process"`
			ShimPID int         `json:"shimPid"`
		}
		b, err := os.ReadFile(r)
		if err != nil || json.Unmarshal(b, &rec) != nil || rec.Process.EndedAt != nil {
			continue
		}
		if rec.ShimPID > 0 && strings.Contains(procCmdline(rec.ShimPID), "shim") {
			_ = syscall.Kill(rec.ShimPID, syscall.SIGKILL)
			pids = append(pids, rec.ShimPID)
		}
		if rec.Process.PID > 0 {
			_ = syscall.Kill(-rec.Process.PID, syscall.SIGKILL)
			pids = append(pids, rec.Process.PID)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for _, pid := range pids {
		for alive(pid) && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
	}
}

func procCmdline(pid int) string {
	b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	return string(b)
}

var client = &http.Client{Timeout: 10 * time.Second}

// call makes a request with token and decodes a JSON answer into out (when
// not nil); it returns the status and the raw body.
func call(t testing.TB, method, url, token string, body any, out any) (int, []byte) {
	t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case []byte:
		rd = bytes.NewReader(b)
	case string:
		rd = strings.NewReader(b)
	default:
		j, err := json.Marshal(b)
		if err != nil {
			t.Fatal(err)
		}
		rd = bytes.NewReader(j)
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		t.Fatal(err)
	}
	if rd != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	if out != nil && resp.StatusCode < 300 {
		if err := json.Unmarshal(raw, out); err != nil {
			t.Fatalf("%s %s: decode %q: %v", method, url, raw, err)
		}
	}
	return resp.StatusCode, raw
}

// problemOf decodes a problem answer and checks its content type.
func problemOf(t testing.TB, raw []byte) api.Problem {
	t.Helper()
	var p api.Problem
	if err := json.Unmarshal(raw, &p); err != nil || p.Code == "" {
		t.Fatalf("not a problem document: %q", raw)
	}
	return p
}

func (l *lspm) spawn(t testing.TB, req api.SpawnRequest) api.Process {
	t.Helper()
	var p api.Process
	code, raw := call(t, "POST", l.url+"/v1/processes", l.token, req, &p)
	if code != http.StatusCreated {
		t.Fatalf("spawn: %d %s", code, raw)
	}
	return p
}

// fake is a spawn request for the fake game server with its flags.
func fake(flags ...string) api.SpawnRequest {
	return api.SpawnRequest{
		Command: append([]string{selfBin}, flags...),
		// A -race test binary sleeps 1 s at exit unless told not to.
		Env: map[string]string{fakegame.Env: "1", "GORACE": "atexit_sleep_ms=0"},
	}
}

func (l *lspm) get(t testing.TB, id string) api.Process {
	t.Helper()
	var p api.Process
	code, raw := call(t, "GET", l.url+"/v1/processes/"+id, l.token, nil, &p)
	if code != http.StatusOK {
		t.Fatalf("get %s: %d %s", id, code, raw)
	}
	return p
}

func (l *lspm) status(t testing.TB) api.Status {
	t.Helper()
	var st api.Status
	code, raw := call(t, "GET", l.url+"/v1/status", l.token, nil, &st)
	if code != http.StatusOK {
		t.Fatalf("status: %d %s", code, raw)
	}
	return st
}

// waitState polls until the process is in one of states.
func (l *lspm) waitState(t testing.TB, id string, timeout time.Duration, states ...string) api.Process {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var p api.Process
	for time.Now().Before(deadline) {
		p = l.get(t, id)
		for _, s := range states {
			if p.State == s {
				return p
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
	_, logs := call(t, "GET", l.url+"/v1/processes/"+id+"/logs?tail=30", l.token, nil, nil)
	t.Fatalf("process %s is %s after %s, want %v (exit %+v); its log:\n%s", id, p.State, timeout, states, p.Exit, logs)
	return p
}

// alive reports whether pid runs (and is not a zombie).
func alive(pid int) bool {
	raw, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	s := string(raw)
	i := strings.LastIndexByte(s, ')')
	return i > 0 && len(s) > i+2 && s[i+2] != 'Z' && s[i+2] != 'X'
}

func waitDead(t testing.TB, pid int, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for alive(pid) {
		if time.Now().After(deadline) {
			t.Fatalf("pid %d still alive after %s", pid, timeout)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func ctxTimeout(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}
