package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"dedi.dev/dedi/api"
)

const cliToken = "fake-admin-token-0123456789"

// cliNow is the clock of the CLI under test.
var cliNow = time.Date(2025, 6, 1, 12, 0, 0, 0, time.UTC)

var (
	cliFleet = api.Fleet{
		Name: "demo", Provider: "local", Command: []string{"/opt/game/server", "--map", "arena"},
		ProcessesPerMachine: 4, Ports: []string{"game"},
		Scaling:   api.Scaling{MinMachines: 1, MaxMachines: 10, IdleShutdownSeconds: 60},
		Placement: "packed", SDK: "dedi", State: "active", CreatedAt: cliNow.Add(-time.Hour),
	}
	cliMachine = api.Machine{
		ID: "m-1", Fleet: "demo", Provider: "local", ProviderID: "local-1", State: "ready", Load: "partial",
		Address: "127.0.0.3", ProcessCount: 2, MaxProcesses: 4, LastReportAt: cliPtr(cliNow.Add(-3 * time.Second)),
		Seq: 42, Hardware: &api.Hardware{Hostname: "box", CPUs: 8, CPUModel: "cpu", MemoryBytes: 16 << 30, Kernel: "6.1"},
		CreatedAt: cliNow.Add(-10 * time.Minute),
	}
	cliProcess = api.Process{
		ID: "p-1", Fleet: "demo", MachineID: "m-1", State: "ready", PID: 4242,
		Command: []string{"/opt/game/server"}, Params: map[string]any{"mode": "ranked"},
		Labels: map[string]string{"region": "eu"}, Address: "127.0.0.3",
		Ports: map[string]int{"game": 30001, "query": 30002}, Players: 3,
		CreatedAt: cliNow.Add(-90 * time.Second), ReadyAt: cliPtr(cliNow.Add(-80 * time.Second)),
	}
	cliCrashed = api.Process{
		ID: "p-2", Fleet: "demo", MachineID: "m-1", State: "crashed", Address: "127.0.0.3",
		CreatedAt: cliNow.Add(-3 * time.Hour), EndedAt: cliPtr(cliNow.Add(-2 * time.Hour)),
		Exit: &api.Exit{Code: cliPtr(139), Signal: "SIGSEGV", Reason: "crashed", LogTail: []string{"segfault at 0"}},
	}
)

func cliPtr[T any](v T) *T { return &v }

// cliRequest is what the fake VMM saw.
type cliRequest struct {
	Method, Path, RawQuery, Body string
}

// cliFakeVMM speaks enough of the VMM API for the CLI.
type cliFakeVMM struct {
	srv *httptest.Server
	// events are the SSE frames of GET /v1/events; after them the stream
	// stays open when holdEvents is set.
	events     []string
	holdEvents bool

	mu   sync.Mutex
	reqs []cliRequest
}

func newCLIFakeVMM(t *testing.T) *cliFakeVMM {
	t.Helper()
	f := &cliFakeVMM{}
	f.srv = httptest.NewServer(http.HandlerFunc(f.serve))
	t.Cleanup(f.srv.Close)
	return f
}

func cliProblem(w http.ResponseWriter, status int, code, detail string) {
	w.Header().Set("Content-Type", "application/problem+json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(api.Problem{Type: "https://dedi.dev/problems/" + code, Title: http.StatusText(status),
		Status: status, Code: code, Detail: detail})
}

func cliAnswer(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

func (f *cliFakeVMM) serve(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	f.mu.Lock()
	f.reqs = append(f.reqs, cliRequest{Method: r.Method, Path: r.URL.EscapedPath(), RawQuery: r.URL.RawQuery, Body: string(body)})
	f.mu.Unlock()
	if r.Header.Get("Authorization") != "Bearer "+cliToken {
		w.Header().Set("WWW-Authenticate", "Bearer")
		cliProblem(w, 401, "unauthorized", "a valid bearer token is required")
		return
	}
	switch r.Method + " " + r.URL.EscapedPath() {
	case "GET /v1/fleets":
		cliAnswer(w, 200, api.List[api.Fleet]{Items: []api.Fleet{cliFleet}})
	case "GET /v1/fleets/demo":
		cliAnswer(w, 200, cliFleet)
	case "POST /v1/fleets":
		var fl api.Fleet
		if err := json.Unmarshal(body, &fl); err != nil {
			cliProblem(w, 400, "invalid", err.Error())
			return
		}
		if fl.Name == "demo" {
			cliProblem(w, 409, "exists", "fleet demo exists")
			return
		}
		fl.State, fl.CreatedAt = "active", cliNow
		cliAnswer(w, 201, fl)
	case "DELETE /v1/fleets/demo", "DELETE /v1/machines/m-1", "DELETE /v1/processes/p-1":
		w.WriteHeader(202)
	case "POST /v1/machines":
		cliAnswer(w, 202, api.Machine{ID: "m-9", Fleet: "demo", State: "provisioning", MaxProcesses: 4})
	case "GET /v1/machines":
		cliAnswer(w, 200, api.List[api.Machine]{Items: []api.Machine{cliMachine}})
	case "GET /v1/machines/m-1":
		cliAnswer(w, 200, cliMachine)
	case "POST /v1/processes":
		var req api.StartRequest
		if err := json.Unmarshal(body, &req); err != nil {
			cliProblem(w, 400, "invalid", err.Error())
			return
		}
		if req.Fleet == "full" {
			cliProblem(w, 503, "no_capacity", "fleet full is at maxMachines")
			return
		}
		cliAnswer(w, 201, cliProcess)
	case "GET /v1/processes":
		cliAnswer(w, 200, api.List[api.Process]{Items: []api.Process{cliProcess, cliCrashed}})
	case "GET /v1/processes/p-1":
		cliAnswer(w, 200, cliProcess)
	case "GET /v1/processes/p-2":
		cliAnswer(w, 200, cliCrashed)
	case "GET /v1/processes/p-1/logs":
		w.Header().Set("Content-Type", "text/plain")
		io.WriteString(w, "listening on :30001\nplayer joined\n")
	case "GET /v1/events":
		w.Header().Set("Content-Type", "text/event-stream")
		w.WriteHeader(200)
		for _, e := range f.events {
			io.WriteString(w, e)
			w.(http.Flusher).Flush()
		}
		if f.holdEvents {
			<-r.Context().Done()
		}
	default:
		cliProblem(w, 404, "not_found", fmt.Sprintf("no %s %s", r.Method, r.URL.Path))
	}
}

func (f *cliFakeVMM) requests() []cliRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]cliRequest(nil), f.reqs...)
}

func (f *cliFakeVMM) lastRequest(t *testing.T) cliRequest {
	t.Helper()
	reqs := f.requests()
	if len(reqs) == 0 {
		t.Fatal("the fake VMM got no request")
	}
	return reqs[len(reqs)-1]
}

// env is the environment of the CLI under test: the fake's address and
// token unless a test changes them.
func (f *cliFakeVMM) env() map[string]string {
	return map[string]string{api.EnvAddr: f.srv.URL, api.EnvAdminToken: cliToken, "HOME": "/nonexistent"}
}

// cliBuffer is a bytes.Buffer safe for one writer and one reader.
type cliBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *cliBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *cliBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

func runCLI(ctx context.Context, t *testing.T, env map[string]string, hc *http.Client, args ...string) (int, string, string) {
	t.Helper()
	var stdout, stderr cliBuffer
	c := &cli{
		stdout: &stdout, stderr: &stderr, now: func() time.Time { return cliNow }, hc: hc,
		getenv: func(k string) string { return env[k] },
	}
	code := c.run(ctx, args[0], args[1:])
	return code, stdout.String(), stderr.String()
}

// run runs the CLI against the fake VMM with its environment.
func (f *cliFakeVMM) run(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	return runCLI(context.Background(), t, f.env(), f.srv.Client(), args...)
}

// cliRows splits table output into rows of fields.
func cliRows(out string) [][]string {
	var rows [][]string
	for _, l := range strings.Split(strings.TrimRight(out, "\n"), "\n") {
		rows = append(rows, strings.Fields(l))
	}
	return rows
}

func TestClientTables(t *testing.T) {
	tests := []struct {
		args []string
		want [][]string
	}{
		{
			args: []string{"process", "list"},
			want: [][]string{
				{"ID", "FLEET", "MACHINE", "STATE", "ADDRESS", "PORTS", "PLAYERS", "AGE"},
				{"p-1", "demo", "m-1", "ready", "127.0.0.3", "game=30001,query=30002", "3", "1m"},
				{"p-2", "demo", "m-1", "crashed", "127.0.0.3", "-", "0", "3h"},
			},
		},
		{
			args: []string{"machine", "list"},
			want: [][]string{
				{"ID", "FLEET", "STATE", "LOAD", "ADDRESS", "PROCS", "SEEN"},
				{"m-1", "demo", "ready", "partial", "127.0.0.3", "2/4", "3s"},
			},
		},
		{
			args: []string{"fleet", "list"},
			want: [][]string{
				{"NAME", "PROVIDER", "PLACEMENT", "PER-MACHINE", "MIN", "MAX", "STATE"},
				{"demo", "local", "packed", "4", "1", "10", "active"},
			},
		},
		{
			args: []string{"process", "start", "--fleet", "demo"},
			want: [][]string{
				{"ID", "FLEET", "MACHINE", "STATE", "ADDRESS", "PORTS", "PLAYERS", "AGE"},
				{"p-1", "demo", "m-1", "ready", "127.0.0.3", "game=30001,query=30002", "3", "1m"},
			},
		},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			f := newCLIFakeVMM(t)
			code, stdout, stderr := f.run(t, tt.args...)
			if code != 0 {
				t.Fatalf("exit %d, stderr %s", code, stderr)
			}
			if got := cliRows(stdout); !reflect.DeepEqual(got, tt.want) {
				t.Errorf("table\n%s\n got %q\nwant %q", stdout, got, tt.want)
			}
		})
	}
}

func TestClientJSON(t *testing.T) {
	f := newCLIFakeVMM(t)
	t.Run("list", func(t *testing.T) {
		for _, o := range []string{"-o", "--output", "-output"} {
			code, stdout, stderr := f.run(t, "process", "list", o, "json")
			if code != 0 {
				t.Fatalf("exit %d, stderr %s", code, stderr)
			}
			var got api.List[api.Process]
			if err := json.Unmarshal([]byte(stdout), &got); err != nil {
				t.Fatalf("%s json: %v\n%s", o, err, stdout)
			}
			if len(got.Items) != 2 || got.Items[0].ID != "p-1" || got.Items[1].Exit.Reason != "crashed" {
				t.Errorf("%s json: %+v", o, got)
			}
		}
	})
	t.Run("get", func(t *testing.T) {
		code, stdout, stderr := f.run(t, "machine", "get", "m-1", "-o", "json")
		if code != 0 {
			t.Fatalf("exit %d, stderr %s", code, stderr)
		}
		var got api.Machine
		if err := json.Unmarshal([]byte(stdout), &got); err != nil {
			t.Fatalf("json: %v\n%s", err, stdout)
		}
		if !reflect.DeepEqual(got, cliMachine) {
			t.Errorf("machine\n got %+v\nwant %+v", got, cliMachine)
		}
	})
	t.Run("fleet get", func(t *testing.T) {
		code, stdout, _ := f.run(t, "fleet", "get", "-o", "json", "demo")
		var got api.Fleet
		if err := json.Unmarshal([]byte(stdout), &got); code != 0 || err != nil || !reflect.DeepEqual(got, cliFleet) {
			t.Errorf("exit %d, err %v, fleet %+v", code, err, got)
		}
	})
	t.Run("delete prints nothing", func(t *testing.T) {
		code, stdout, _ := f.run(t, "process", "stop", "p-1", "-o", "json")
		if code != 0 || stdout != "" {
			t.Errorf("exit %d, stdout %q", code, stdout)
		}
	})
}

func TestClientGetTable(t *testing.T) {
	f := newCLIFakeVMM(t)
	tests := []struct {
		args []string
		want []string // substrings of the output
	}{
		{[]string{"process", "get", "p-1"}, []string{"ID:", "p-1", "ready", "game=30001,query=30002", `{"mode":"ranked"}`, "region=eu", "1m ago"}},
		{[]string{"process", "get", "p-2"}, []string{"crashed (code 139, SIGSEGV)", "Log tail:", "  segfault at 0"}},
		{[]string{"machine", "get", "m-1"}, []string{"m-1", "local local-1", "2/4", "3s ago (seq 42)", "8 CPUs", "16.0 GiB"}},
		{[]string{"fleet", "get", "demo"}, []string{"demo", "/opt/game/server --map arena", "min 1, max 10, idle shutdown 1m0s", "packed"}},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			code, stdout, stderr := f.run(t, tt.args...)
			if code != 0 {
				t.Fatalf("exit %d, stderr %s", code, stderr)
			}
			for _, w := range tt.want {
				if !strings.Contains(stdout, w) {
					t.Errorf("output lacks %q:\n%s", w, stdout)
				}
			}
		})
	}
}

func TestClientRequests(t *testing.T) {
	tests := []struct {
		args []string
		want cliRequest
	}{
		{
			args: []string{"fleet", "create", "arena", "--per-machine", "8", "--max", "3", "--idle", "90s",
				"--placement", "distributed", "--ports", "game,query", "--image", "img:1", "--", "./server", "--map", "x"},
			want: cliRequest{Method: "POST", Path: "/v1/fleets",
				Body: `{"name":"arena","provider":"local","image":"img:1","command":["./server","--map","x"],"processesPerMachine":8,` +
					`"ports":["game","query"],"health":{},"scaling":{"minMachines":0,"maxMachines":3,"idleShutdownSeconds":90},` +
					`"placement":"distributed","sdk":"dedi","createdAt":"0001-01-01T00:00:00Z"}` + "\n"},
		},
		{
			args: []string{"fleet", "create", "--ports", "", "arena"},
			want: cliRequest{Method: "POST", Path: "/v1/fleets",
				Body: `{"name":"arena","provider":"local","image":"","command":null,"processesPerMachine":4,` +
					`"ports":[],"health":{},"scaling":{"minMachines":0,"maxMachines":10,"idleShutdownSeconds":60},` +
					`"placement":"packed","sdk":"dedi","createdAt":"0001-01-01T00:00:00Z"}` + "\n"},
		},
		{
			args: []string{"process", "start", "--fleet", "demo", "--param", "mode=ranked", "--param", "map=a=b",
				"--params", `{"n":2}`, "--label", "region=eu", "--wait", "--timeout", "45s"},
			want: cliRequest{Method: "POST", Path: "/v1/processes", RawQuery: "timeout=45s&wait=ready",
				Body: `{"fleet":"demo","params":{"map":"a=b","mode":"ranked","n":2},"labels":{"region":"eu"}}` + "\n"},
		},
		{
			args: []string{"process", "list", "--fleet", "de mo", "--machine", "m-1", "--state", "ready"},
			want: cliRequest{Method: "GET", Path: "/v1/processes", RawQuery: "fleet=de+mo&machine=m-1&state=ready"},
		},
		{
			args: []string{"machine", "list", "--state", "ready"},
			want: cliRequest{Method: "GET", Path: "/v1/machines", RawQuery: "state=ready"},
		},
		{
			args: []string{"machine", "create", "--fleet", "demo"},
			want: cliRequest{Method: "POST", Path: "/v1/machines", Body: `{"fleet":"demo"}` + "\n"},
		},
		{
			args: []string{"machine", "delete", "m-1"},
			want: cliRequest{Method: "DELETE", Path: "/v1/machines/m-1"},
		},
		{
			args: []string{"fleet", "delete", "demo"},
			want: cliRequest{Method: "DELETE", Path: "/v1/fleets/demo"},
		},
		{
			args: []string{"process", "stop", "p-1"},
			want: cliRequest{Method: "DELETE", Path: "/v1/processes/p-1"},
		},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			f := newCLIFakeVMM(t)
			code, _, stderr := f.run(t, tt.args...)
			if code != 0 {
				t.Fatalf("exit %d, stderr %s", code, stderr)
			}
			got := f.lastRequest(t)
			// The client marshals without a trailing newline; compare the JSON.
			if tt.want.Body != "" {
				var a, b any
				json.Unmarshal([]byte(got.Body), &a)
				json.Unmarshal([]byte(tt.want.Body), &b)
				if !reflect.DeepEqual(a, b) {
					t.Errorf("body\n got %s\nwant %s", got.Body, tt.want.Body)
				}
				got.Body, tt.want.Body = "", ""
			}
			if got != tt.want {
				t.Errorf("request\n got %+v\nwant %+v", got, tt.want)
			}
		})
	}
}

func TestClientLogs(t *testing.T) {
	f := newCLIFakeVMM(t)
	code, stdout, stderr := f.run(t, "process", "logs", "p-1", "--tail", "5")
	if code != 0 {
		t.Fatalf("exit %d, stderr %s", code, stderr)
	}
	if stdout != "listening on :30001\nplayer joined\n" {
		t.Errorf("stdout %q", stdout)
	}
	if r := f.lastRequest(t); r.Path != "/v1/processes/p-1/logs" || r.RawQuery != "tail=5" {
		t.Errorf("request %+v", r)
	}
}

func TestClientProblems(t *testing.T) {
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"fleet", "get", "nope"}, "dedi: not_found: no GET /v1/fleets/nope\n"},
		{[]string{"fleet", "create", "demo"}, "dedi: exists: fleet demo exists\n"},
		{[]string{"process", "start", "--fleet", "full"}, "dedi: no_capacity: fleet full is at maxMachines\n"},
		{[]string{"process", "logs", "p-404"}, "dedi: not_found: no GET /v1/processes/p-404/logs\n"},
		{[]string{"machine", "delete", "m-404", "-o", "json"}, "dedi: not_found: no DELETE /v1/machines/m-404\n"},
	}
	f := newCLIFakeVMM(t)
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			code, stdout, stderr := f.run(t, tt.args...)
			if code != 1 || stderr != tt.want || stdout != "" {
				t.Errorf("exit %d, stdout %q, stderr %q; want 1 and %q", code, stdout, stderr, tt.want)
			}
		})
	}
	t.Run("wrong token", func(t *testing.T) {
		env := f.env()
		env[api.EnvAdminToken] = "wrong"
		code, _, stderr := runCLI(context.Background(), t, env, nil, "fleet", "list")
		if code != 1 || !strings.HasPrefix(stderr, "dedi: unauthorized: ") || !strings.Contains(stderr, "DEDI_TOKEN") {
			t.Errorf("exit %d, stderr %q", code, stderr)
		}
	})
	t.Run("unreachable", func(t *testing.T) {
		srv := httptest.NewServer(http.NotFoundHandler())
		srv.Close()
		env := f.env()
		env[api.EnvAddr] = srv.URL
		code, _, stderr := runCLI(context.Background(), t, env, nil, "fleet", "list")
		if code != 1 || !strings.HasPrefix(stderr, "dedi: unreachable: ") {
			t.Errorf("exit %d, stderr %q", code, stderr)
		}
	})
}

func TestClientUsageErrors(t *testing.T) {
	tests := [][]string{
		{"fleet"},
		{"fleet", "bogus"},
		{"fleet", "get"},
		{"fleet", "get", "a", "b"},
		{"fleet", "list", "extra"},
		{"fleet", "create"},
		{"fleet", "create", "a", "b"},
		{"fleet", "create", "a", "--per-machine", "many"},
		{"fleet", "create", "a", "--idle", "60"},
		{"process", "list", "-o", "yaml"},
		{"process", "list", "--bogus"},
		{"process", "start"},
		{"process", "start", "--fleet", "demo", "--param", "novalue"},
		{"process", "start", "--fleet", "demo", "--label", "=v"},
		{"process", "start", "--fleet", "demo", "--params", "[1]"},
		{"process", "start", "--fleet", "demo", "--timeout", "5s"},
		{"process", "logs"},
		{"process", "logs", "p-1", "--tail", "-1"},
		{"machine", "create"},
		{"events", "now"},
		{"bogus"},
	}
	f := newCLIFakeVMM(t)
	for _, args := range tests {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			code, _, stderr := f.run(t, args...)
			if code != 2 || !strings.Contains(stderr, "dedi: usage: ") {
				t.Errorf("exit %d, stderr %q; want 2 and a usage line", code, stderr)
			}
		})
	}
	if n := len(f.requests()); n != 0 {
		t.Errorf("usage errors sent %d requests", n)
	}
	t.Run("bad address", func(t *testing.T) {
		env := f.env()
		env[api.EnvAddr] = "ftp://host:1"
		if code, _, stderr := runCLI(context.Background(), t, env, nil, "fleet", "list"); code != 2 || !strings.Contains(stderr, "VMM address") {
			t.Errorf("exit %d, stderr %q", code, stderr)
		}
	})
}

func TestClientHelp(t *testing.T) {
	f := newCLIFakeVMM(t)
	code, stdout, _ := f.run(t, "fleet", "create", "-h")
	if code != 0 || !strings.Contains(stdout, "dedi fleet create NAME") || !strings.Contains(stdout, "-per-machine") {
		t.Errorf("exit %d, stdout %q", code, stdout)
	}
	code, stdout, _ = f.run(t, "process", "help")
	if code != 0 || !strings.Contains(stdout, "dedi process start --fleet NAME") {
		t.Errorf("exit %d, stdout %q", code, stdout)
	}
}

func TestClientToken(t *testing.T) {
	f := newCLIFakeVMM(t)
	writeToken := func(t *testing.T, dir string) {
		t.Helper()
		if err := os.MkdirAll(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "admin-token"), []byte(cliToken+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	t.Run("DEDI_DATA_DIR", func(t *testing.T) {
		dir := t.TempDir()
		writeToken(t, dir)
		env := f.env()
		delete(env, api.EnvAdminToken)
		env["DEDI_DATA_DIR"] = dir
		if code, _, stderr := runCLI(context.Background(), t, env, nil, "fleet", "list"); code != 0 {
			t.Errorf("exit %d, stderr %s", code, stderr)
		}
	})
	t.Run("--data-dir", func(t *testing.T) {
		dir := t.TempDir()
		writeToken(t, dir)
		env := f.env()
		delete(env, api.EnvAdminToken)
		env["DEDI_DATA_DIR"] = "/nonexistent"
		if code, _, stderr := runCLI(context.Background(), t, env, nil, "fleet", "list", "--data-dir", dir); code != 0 {
			t.Errorf("exit %d, stderr %s", code, stderr)
		}
	})
	t.Run("HOME/.dedi", func(t *testing.T) {
		home := t.TempDir()
		writeToken(t, filepath.Join(home, ".dedi"))
		env := f.env()
		delete(env, api.EnvAdminToken)
		env["HOME"] = home
		if code, _, stderr := runCLI(context.Background(), t, env, nil, "fleet", "list"); code != 0 {
			t.Errorf("exit %d, stderr %s", code, stderr)
		}
	})
	t.Run("missing", func(t *testing.T) {
		dir := t.TempDir()
		env := f.env()
		delete(env, api.EnvAdminToken)
		env["DEDI_DATA_DIR"] = dir
		code, _, stderr := runCLI(context.Background(), t, env, nil, "fleet", "list")
		if code != 1 || !strings.HasPrefix(stderr, "dedi: no_token: ") ||
			!strings.Contains(stderr, "DEDI_TOKEN") || !strings.Contains(stderr, filepath.Join(dir, "admin-token")) {
			t.Errorf("exit %d, stderr %q", code, stderr)
		}
	})
	if n := len(f.requests()); n != 3 {
		t.Errorf("%d requests, want 3 (none without a token)", n)
	}
}

func TestClientAddrWithoutScheme(t *testing.T) {
	f := newCLIFakeVMM(t)
	env := f.env()
	env[api.EnvAddr] = strings.TrimPrefix(f.srv.URL, "http://")
	code, stdout, stderr := runCLI(context.Background(), t, env, nil, "fleet", "list")
	if code != 0 || !strings.Contains(stdout, "demo") {
		t.Errorf("exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
	// --addr overrides the environment.
	env[api.EnvAddr] = "127.0.0.1:1"
	code, _, stderr = runCLI(context.Background(), t, env, nil, "fleet", "list", "--addr", f.srv.URL+"/")
	if code != 0 {
		t.Errorf("--addr: exit %d, stderr %q", code, stderr)
	}
}

func TestVMMURL(t *testing.T) {
	tests := map[string]string{
		"":                        "http://127.0.0.1:7700",
		"127.0.0.1:7700":          "http://127.0.0.1:7700",
		"vmm.example:80/":         "http://vmm.example:80",
		"https://vmm.example/api": "https://vmm.example/api",
		"http://[::1]:7700":       "http://[::1]:7700",
	}
	for in, want := range tests {
		if got, err := clientBaseURL(in); err != nil || got != want {
			t.Errorf("vmmURL(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"ftp://x", "http://", "http://x/?a=b", "::"} {
		if got, err := clientBaseURL(bad); err == nil {
			t.Errorf("vmmURL(%q) = %q, want an error", bad, got)
		}
	}
}

func TestClientEvents(t *testing.T) {
	at := time.Date(2025, 6, 1, 12, 0, 0, 0, time.UTC)
	frames := []string{
		": hello\n\n",
		fmt.Sprintf("data: {\"seq\":1,\"type\":\"process.state\",\"at\":%q,\"fleet\":\"demo\",\"machineId\":\"m-1\",\"processId\":\"p-1\",\"state\":\"ready\",\"players\":0}\n\n", at.Format(time.RFC3339)),
		"\n",
		fmt.Sprintf("data: {\"seq\":2,\"type\":\"machine.state\",\ndata: \"at\":%q,\"machineId\":\"m-1\",\"state\":\"draining\"}\n\n", at.Format(time.RFC3339)),
	}
	t.Run("table until Ctrl-C", func(t *testing.T) {
		f := newCLIFakeVMM(t)
		f.events, f.holdEvents = frames, true
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		var stdout, stderr cliBuffer
		c := &cli{stdout: &stdout, stderr: &stderr, now: func() time.Time { return cliNow },
			getenv: func(k string) string { return f.env()[k] }}
		done := make(chan int)
		go func() { done <- c.run(ctx, "events", nil) }()
		deadline := time.Now().Add(10 * time.Second)
		for strings.Count(stdout.String(), "\n") < 3 && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		cancel() // Ctrl-C
		if code := <-done; code != 0 {
			t.Fatalf("exit %d, stderr %s", code, stderr.String())
		}
		rows := cliRows(stdout.String())
		want := [][]string{
			{"TIME", "TYPE", "FLEET", "MACHINE", "PROCESS", "STATE", "DETAIL"},
			{at.Local().Format("15:04:05.000"), "process.state", "demo", "m-1", "p-1", "ready"},
			{at.Local().Format("15:04:05.000"), "machine.state", "-", "m-1", "-", "draining"},
		}
		if !reflect.DeepEqual(rows, want) {
			t.Errorf("events\n got %q\nwant %q", rows, want)
		}
	})
	t.Run("json lines; a closed stream is an error", func(t *testing.T) {
		f := newCLIFakeVMM(t)
		f.events = frames
		code, stdout, stderr := f.run(t, "events", "-o", "json")
		if code != 1 || !strings.HasPrefix(stderr, "dedi: unavailable: ") {
			t.Errorf("exit %d, stderr %q", code, stderr)
		}
		lines := strings.Split(strings.TrimRight(stdout, "\n"), "\n")
		if len(lines) != 2 {
			t.Fatalf("want 2 lines, got %q", stdout)
		}
		for _, l := range lines {
			var ev map[string]any
			if err := json.Unmarshal([]byte(l), &ev); err != nil {
				t.Errorf("line %q: %v", l, err)
			}
		}
		if !strings.Contains(lines[0], `"players":0`) {
			t.Errorf("json lines drop fields the Event type lacks: %q", lines[0])
		}
	})
}

// TestRunClient drives the entry point with the process environment.
func TestRunClient(t *testing.T) {
	f := newCLIFakeVMM(t)
	t.Setenv(api.EnvAddr, strings.TrimPrefix(f.srv.URL, "http://"))
	t.Setenv(api.EnvAdminToken, cliToken)
	var stdout, stderr bytes.Buffer
	if code := runClient("process", []string{"list", "-o", "json"}, &stdout, &stderr); code != 0 {
		t.Fatalf("exit %d, stderr %s", code, stderr.String())
	}
	if !strings.Contains(stdout.String(), `"id": "p-1"`) {
		t.Errorf("stdout %s", stdout.String())
	}
}
