package sdk

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"dedi.dev/dedi/api"
)

const (
	testID    = "p-1"
	testToken = "tok-1"
)

// fakeLSPM is a hand-written stand-in for the LSPM's SDK endpoints.
type fakeLSPM struct {
	mu         sync.Mutex
	state      string
	players    *int
	instances  *int
	beats      int
	readyCalls int
	// failReady answers 503 to that many ready calls first.
	failReady int
	// readyProblem, when set, answers every ready call with it.
	readyProblem *api.Problem
}

func (f *fakeLSPM) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Authorization") != "Bearer "+testToken {
		writeProblem(w, &api.Problem{Title: "Unauthorized", Status: 401, Code: api.CodeUnauthorized})
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	base := "/v1/processes/" + testID
	switch {
	case r.Method == http.MethodPost && r.URL.Path == base+"/ready":
		f.readyCalls++
		if f.readyProblem != nil {
			writeProblem(w, f.readyProblem)
			return
		}
		if f.failReady > 0 {
			f.failReady--
			w.Header().Set("Retry-After", "1")
			writeProblem(w, &api.Problem{Title: "Unavailable", Status: 503, Code: api.CodeShuttingDown})
			return
		}
		f.state = api.StateReady
	case r.Method == http.MethodPost && r.URL.Path == base+"/heartbeat":
		var hb api.Heartbeat
		if err := json.NewDecoder(r.Body).Decode(&hb); err != nil {
			writeProblem(w, &api.Problem{Title: "Bad Request", Status: 400, Code: api.CodeInvalid, Detail: err.Error()})
			return
		}
		f.beats++
		f.players, f.instances = hb.Players, hb.Instances
	case r.Method == http.MethodPost && r.URL.Path == base+"/shutdown":
		f.state = api.StateExited
	case r.Method == http.MethodGet && r.URL.Path == base:
	default:
		writeProblem(w, &api.Problem{Title: "Not Found", Status: 404, Code: api.CodeNotFound})
		return
	}
	p := api.Process{ID: testID, State: f.state}
	if f.players != nil {
		p.Players = *f.players
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(p)
}

func (f *fakeLSPM) setState(s string) {
	f.mu.Lock()
	f.state = s
	f.mu.Unlock()
}

func (f *fakeLSPM) snapshot() (beats, players, readyCalls int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	players = -1
	if f.players != nil {
		players = *f.players
	}
	return f.beats, players, f.readyCalls
}

func writeProblem(w http.ResponseWriter, p *api.Problem) {
	w.Header().Set("Content-Type", "application/problem+json")
	w.WriteHeader(p.Status)
	_ = json.NewEncoder(w).Encode(p)
}

// newClient returns a client of a process on the LSPM at url.
func newClient(t *testing.T, url string, mod func(*Config)) *Client {
	t.Helper()
	cfg := Config{ProcessID: testID, Token: testToken, URL: url, HeartbeatPeriod: 20 * time.Millisecond}
	if mod != nil {
		mod(&cfg)
	}
	c, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// serveOn serves h on addr, retrying the listen briefly (the port was just
// freed), and closes the server at cleanup.
func serveOn(t *testing.T, addr string, h http.Handler) *httptest.Server {
	t.Helper()
	var ln net.Listener
	var err error
	for range 50 {
		if ln, err = net.Listen("tcp", addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("listen %s: %v", addr, err)
	}
	srv := httptest.NewUnstartedServer(h)
	srv.Listener.Close()
	srv.Listener = ln
	srv.Start()
	t.Cleanup(srv.Close)
	return srv
}

// freeAddr returns a loopback address on which nothing listens.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestConfigFromEnviron(t *testing.T) {
	full := []string{
		"DEDI_PROCESS_ID=p-7", "DEDI_PROCESS_TOKEN=secret", "DEDI_SDK_URL=http://127.0.0.1:7701",
		`DEDI_PARAMS={"mode":"ranked","n":2}`, "DEDI_MACHINE_ID=m-1", "DEDI_FLEET=demo",
		"DEDI_PORT_GAME=30001", "DEDI_PORT_QUERY=30002", "DEDI_HEARTBEAT_MS=500", "PATH=/bin",
	}
	cfg, err := configFromEnviron(full)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.ProcessID != "p-7" || cfg.Token != "secret" || cfg.URL != "http://127.0.0.1:7701" ||
		cfg.MachineID != "m-1" || cfg.Fleet != "demo" || cfg.HeartbeatPeriod != 500*time.Millisecond {
		t.Errorf("config = %+v", cfg)
	}
	if cfg.Params["mode"] != "ranked" || cfg.Params["n"] != 2.0 {
		t.Errorf("params = %v", cfg.Params)
	}
	if cfg.Ports["game"] != 30001 || cfg.Ports["query"] != 30002 || len(cfg.Ports) != 2 {
		t.Errorf("ports = %v", cfg.Ports)
	}

	without := func(drop string) []string {
		var out []string
		for _, kv := range full {
			if !strings.HasPrefix(kv, drop+"=") {
				out = append(out, kv)
			}
		}
		return out
	}
	replace := func(kv string) []string {
		k, _, _ := strings.Cut(kv, "=")
		return append(without(k), kv)
	}
	for _, tc := range []struct {
		name    string
		env     []string
		wantErr string
	}{
		{"no id", without("DEDI_PROCESS_ID"), "DEDI_PROCESS_ID"},
		{"no token", without("DEDI_PROCESS_TOKEN"), "DEDI_PROCESS_TOKEN"},
		{"no url", without("DEDI_SDK_URL"), "DEDI_SDK_URL"},
		{"nothing", nil, "DEDI_PROCESS_ID, DEDI_PROCESS_TOKEN, DEDI_SDK_URL"},
		{"bad params", replace("DEDI_PARAMS=[1]"), "DEDI_PARAMS"},
		{"bad port", replace("DEDI_PORT_GAME=x"), "DEDI_PORT_GAME"},
		{"bad period", replace("DEDI_HEARTBEAT_MS=-1"), "DEDI_HEARTBEAT_MS"},
		{"bad url", replace("DEDI_SDK_URL=localhost:7701"), "URL"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := configFromEnviron(tc.env)
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("err = %v, want one naming %s", err, tc.wantErr)
			}
		})
	}

	t.Run("defaults", func(t *testing.T) {
		cfg, err := configFromEnviron(without("DEDI_HEARTBEAT_MS")[:3])
		if err != nil {
			t.Fatal(err)
		}
		c, err := New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if c.HeartbeatPeriod() != DefaultHeartbeatPeriod || len(c.Params()) != 0 || len(c.Ports()) != 0 {
			t.Errorf("period %v params %v ports %v", c.HeartbeatPeriod(), c.Params(), c.Ports())
		}
	})
}

func TestFromEnv(t *testing.T) {
	t.Setenv("DEDI_PROCESS_ID", "")
	if _, err := FromEnv(); err == nil {
		t.Fatal("FromEnv without environment: no error")
	}
	t.Setenv("DEDI_PROCESS_ID", "p-9")
	t.Setenv("DEDI_PROCESS_TOKEN", "t")
	t.Setenv("DEDI_SDK_URL", "http://127.0.0.1:1/")
	t.Setenv("DEDI_PORT_GAME", "30009")
	c, err := FromEnv()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if p, ok := c.Port("GAME"); c.ID() != "p-9" || !ok || p != 30009 {
		t.Errorf("id %q port %d %v", c.ID(), p, ok)
	}
	if _, ok := c.Port("query"); ok {
		t.Error("unallocated port found")
	}
}

func TestReadyRetriesUntilServerUp(t *testing.T) {
	addr := freeAddr(t)
	c := newClient(t, "http://"+addr, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	type result struct {
		p   *api.Process
		err error
	}
	done := make(chan result, 1)
	go func() {
		p, err := c.Ready(ctx)
		done <- result{p, err}
	}()
	time.Sleep(300 * time.Millisecond) // several refused attempts
	select {
	case r := <-done:
		t.Fatalf("Ready returned before the server was up: %+v", r)
	default:
	}
	f := &fakeLSPM{state: api.StateStarting, failReady: 2}
	serveOn(t, addr, f)

	r := <-done
	if r.err != nil {
		t.Fatal(r.err)
	}
	if r.p.State != api.StateReady || c.State() != api.StateReady {
		t.Errorf("state %q, State() %q", r.p.State, c.State())
	}
	if _, _, calls := f.snapshot(); calls != 3 {
		t.Errorf("ready calls = %d, want 3 (two 503 then 200)", calls)
	}
}

func TestReadyGivesUpWithContext(t *testing.T) {
	c := newClient(t, "http://"+freeAddr(t), nil)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, err := c.Ready(ctx)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want deadline exceeded", err)
	}
}

func TestProblemNotRetried(t *testing.T) {
	f := &fakeLSPM{readyProblem: &api.Problem{Title: "Conflict", Status: 409, Code: "not_starting", Detail: "process is exited"}}
	srv := httptest.NewServer(f)
	defer srv.Close()
	c := newClient(t, srv.URL, nil)

	_, err := c.Ready(context.Background())
	var p *api.Problem
	if !errors.As(err, &p) || p.Code != "not_starting" || p.Status != 409 {
		t.Fatalf("err = %#v, want *api.Problem not_starting", err)
	}
	if _, _, calls := f.snapshot(); calls != 1 {
		t.Errorf("ready calls = %d, want 1", calls)
	}

	bad := newClient(t, srv.URL, func(c *Config) { c.Token = "wrong" })
	_, err = bad.Heartbeat(context.Background())
	if !errors.As(err, &p) || p.Code != api.CodeUnauthorized {
		t.Fatalf("err = %v, want unauthorized", err)
	}
}

func TestNonProblemErrorBody(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "no such thing", http.StatusNotFound)
	}))
	defer srv.Close()
	c := newClient(t, srv.URL, nil)
	_, err := c.Process(context.Background())
	var p *api.Problem
	if !errors.As(err, &p) || p.Code != api.CodeNotFound || p.Detail != "no such thing" {
		t.Fatalf("err = %#v", err)
	}
}

func TestHeartbeatLoopCarriesPlayers(t *testing.T) {
	f := &fakeLSPM{state: api.StateReady}
	srv := httptest.NewServer(f)
	defer srv.Close()
	var mu sync.Mutex
	var seen []string
	c := newClient(t, srv.URL, func(cfg *Config) {
		cfg.OnState = func(p api.Process) {
			mu.Lock()
			seen = append(seen, p.State)
			mu.Unlock()
		}
	})
	c.SetPlayers(7)
	c.Start(context.Background())
	c.Start(context.Background()) // no second loop
	eventually(t, "players 7", func() bool { _, p, _ := f.snapshot(); return p == 7 })
	c.SetPlayers(9)
	c.SetInstances(2)
	eventually(t, "players 9", func() bool { _, p, _ := f.snapshot(); return p == 9 })
	f.mu.Lock()
	inst := f.instances
	f.mu.Unlock()
	if inst == nil || *inst != 2 {
		t.Errorf("instances = %v, want 2", inst)
	}

	f.setState(api.StateAllocated)
	eventually(t, "state allocated", func() bool { return c.State() == api.StateAllocated })
	c.Close()
	mu.Lock()
	defer mu.Unlock()
	if strings.Join(seen, ",") != "ready,allocated" {
		t.Errorf("OnState saw %v, want [ready allocated]", seen)
	}
}

func TestLoopSurvivesLSPMRestart(t *testing.T) {
	addr := freeAddr(t)
	f := &fakeLSPM{state: api.StateReady}
	srv := serveOn(t, addr, f)
	c := newClient(t, "http://"+addr, nil)
	c.SetPlayers(1)
	c.Start(context.Background())
	eventually(t, "first heartbeats", func() bool { b, _, _ := f.snapshot(); return b >= 2 })

	srv.Close() // the LSPM goes away: refused connections for a while
	time.Sleep(200 * time.Millisecond)
	if c.State() != api.StateReady {
		t.Errorf("State() = %q while down, want the last known ready", c.State())
	}

	f2 := &fakeLSPM{state: api.StateReady}
	serveOn(t, addr, f2)
	c.SetPlayers(4)
	eventually(t, "heartbeats after restart", func() bool { b, p, _ := f2.snapshot(); return b >= 2 && p == 4 })
}

func TestCloseWaitsForLoop(t *testing.T) {
	f := &fakeLSPM{state: api.StateReady}
	srv := httptest.NewServer(f)
	defer srv.Close()
	entered := make(chan struct{})
	var finished atomic.Bool
	c := newClient(t, srv.URL, func(cfg *Config) {
		cfg.OnState = func(api.Process) {
			close(entered)
			time.Sleep(200 * time.Millisecond)
			finished.Store(true)
		}
	})
	runErr := make(chan error, 1)
	go func() { runErr <- c.Run(context.Background()) }()
	<-entered
	c.Close()
	if !finished.Load() {
		t.Fatal("Close returned while the loop was still running")
	}
	if err := <-runErr; err != nil {
		t.Errorf("Run after Close = %v, want nil", err)
	}
	b, _, _ := f.snapshot()
	time.Sleep(100 * time.Millisecond)
	if b2, _, _ := f.snapshot(); b2 != b {
		t.Errorf("heartbeats after Close: %d -> %d", b, b2)
	}
	if err := c.Run(context.Background()); !errors.Is(err, ErrClosed) {
		t.Errorf("Run on closed client = %v", err)
	}
	c.Close() // idempotent
}

func TestRunStopsWithContext(t *testing.T) {
	srv := httptest.NewServer(&fakeLSPM{state: api.StateReady})
	defer srv.Close()
	c := newClient(t, srv.URL, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := c.Run(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Run = %v", err)
	}
}

func TestShutdownAndProcess(t *testing.T) {
	f := &fakeLSPM{state: api.StateReady}
	srv := httptest.NewServer(f)
	defer srv.Close()
	c := newClient(t, srv.URL, nil)
	p, err := c.Process(context.Background())
	if err != nil || p.ID != testID || p.State != api.StateReady {
		t.Fatalf("Process = %+v, %v", p, err)
	}
	p, err = c.Shutdown(context.Background())
	if err != nil || p.State != api.StateExited || c.State() != api.StateExited {
		t.Fatalf("Shutdown = %+v, %v", p, err)
	}
}
