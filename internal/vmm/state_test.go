package vmm

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"dedi.dev/dedi/api"
	"dedi.dev/dedi/internal/clock"
	"dedi.dev/dedi/internal/provider"
)

// stubLSPM is an LSPM stand-in: it accepts spawns and answers the
// handshake as told.
type stubLSPM struct {
	srv      *httptest.Server
	busy     atomic.Bool // answer the handshake 409
	shutdown atomic.Int32
}

func newStubLSPM(t testing.TB) *stubLSPM {
	l := &stubLSPM{}
	l.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.Method == "POST" && r.URL.Path == "/v1/processes":
			var req api.SpawnRequest
			_ = json.NewDecoder(r.Body).Decode(&req)
			w.WriteHeader(http.StatusCreated)
			_ = json.NewEncoder(w).Encode(api.Process{ID: req.ID, State: api.StateStarting, Address: "127.0.0.1", CreatedAt: time.Now()})
		case r.Method == "POST" && r.URL.Path == "/v1/shutdown":
			l.shutdown.Add(1)
			if l.busy.Load() {
				w.WriteHeader(http.StatusConflict)
				_, _ = io.WriteString(w, `{"code":"busy"}`)
				return
			}
			_, _ = io.WriteString(w, `{"accepted":true}`)
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(l.srv.Close)
	return l
}

// stubProvider makes machines at once, all served by one stub LSPM.
type stubProvider struct {
	lspm    *stubLSPM
	mu      sync.Mutex
	tokens  map[string]string // machine id -> token
	deleted []string
}

func (p *stubProvider) Name() string { return "stub" }
func (p *stubProvider) Create(ctx context.Context, s provider.Spec) (provider.Machine, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.tokens[s.MachineID] = s.Token
	return provider.Machine{ProviderID: s.MachineID, MachineID: s.MachineID, Fleet: s.Fleet, Address: "127.0.0.1", LSPMURL: p.lspm.srv.URL}, nil
}
func (p *stubProvider) Delete(ctx context.Context, id string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.deleted = append(p.deleted, id)
	return nil
}
func (p *stubProvider) List(ctx context.Context, fleet string) ([]provider.Machine, error) {
	return nil, nil
}
func (p *stubProvider) token(id string) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.tokens[id]
}

type testVMM struct {
	*VMM
	clk  *clock.Fake
	prov *stubProvider
	h    http.Handler
	stop func() // stops Run and waits for it to return
}

const testAdmin = "admin-0123456789abcdef"

func newTestVMM(t testing.TB, tweaks ...func(*Config)) *testVMM {
	t.Helper()
	clk := clock.NewFake(time.Now())
	prov := &stubProvider{lspm: newStubLSPM(t), tokens: map[string]string{}}
	cfg := Config{Listen: "127.0.0.1:0", DataDir: t.TempDir(), AdminToken: testAdmin,
		Providers: map[string]provider.Provider{"stub": prov}, ReportInterval: time.Second, BootTimeout: 10 * time.Second}
	for _, tw := range tweaks {
		tw(&cfg)
	}
	v, err := New(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)), clk)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = v.Run(ctx); close(done) }()
	stop := func() { cancel(); <-done }
	t.Cleanup(stop)
	return &testVMM{VMM: v, clk: clk, prov: prov, h: v.Handler(), stop: stop}
}

func (tv *testVMM) req(t testing.TB, method, path, token string, body any) (int, []byte) {
	t.Helper()
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = strings.NewReader(string(b))
	}
	r := httptest.NewRequest(method, path, rd)
	r.Header.Set("Authorization", "Bearer "+token)
	w := httptest.NewRecorder()
	tv.h.ServeHTTP(w, r)
	return w.Code, w.Body.Bytes()
}

// step advances the fake clock by d in ticks and lets the loop run them.
func (tv *testVMM) step(d time.Duration) {
	for moved := time.Duration(0); moved < d; moved += tv.cfg.TickInterval {
		tv.advance(tv.cfg.TickInterval)
	}
}

// advance moves the fake clock by d, a whole number of ticks, and waits
// until the loop has ticked at the new time. A command sent after the
// tick does not wait for it: when both are ready, the loop's select takes
// either, and a tick still waiting when the clock moves again makes the
// fake ticker drop the next one, so a test on a loaded machine saw one
// look at the machines fewer than it counted on.
func (tv *testVMM) advance(d time.Duration) {
	tv.clk.Advance(d)
	now := tv.clk.Now().UTC()
	for ticked := false; !ticked; {
		if err := tv.doWait(func(s *state) { ticked = !s.lastTick.Before(now) }); err != nil {
			return // the VMM stopped
		}
	}
}

func (tv *testVMM) machine(t testing.TB, id string) api.Machine {
	var m api.Machine
	_ = tv.doWait(func(s *state) { m = s.machines[id].m })
	return m
}

func (tv *testVMM) report(t testing.TB, id string, seq uint64, live []api.Process, ended []api.Process) {
	t.Helper()
	load := api.LoadEmpty
	if len(live) > 0 {
		load = api.LoadPartial
	}
	code, raw := tv.req(t, "POST", "/v1/machines/"+id+"/status", tv.prov.token(id), api.Status{MachineID: id, State: load, Seq: seq,
		MaxProcesses: 4, Processes: live, Ended: ended, At: tv.clk.Now()})
	if code != 200 {
		t.Fatalf("report: %d %s", code, raw)
	}
}

// startIn starts a process of the fleet through the API; it must be taken.
func (tv *testVMM) startIn(t testing.TB, fleet string) api.Process {
	t.Helper()
	code, raw := tv.req(t, "POST", "/v1/processes", testAdmin, api.StartRequest{Fleet: fleet})
	if code != 201 {
		t.Fatalf("start: %d %s", code, raw)
	}
	var p api.Process
	_ = json.Unmarshal(raw, &p)
	return p
}

func fleetOf(name string) api.Fleet {
	f := api.Fleet{Name: name, Provider: "stub", Command: []string{"/game"}, Scaling: api.Scaling{MaxMachines: 2, IdleShutdownSeconds: 5}}
	_ = validateFleet(&f)
	return f
}

// bootOne creates a fleet and a machine, and brings it to ready.
func bootOne(t testing.TB, tv *testVMM) string {
	t.Helper()
	if code, raw := tv.req(t, "POST", "/v1/fleets", testAdmin, fleetOf("f")); code != 201 {
		t.Fatalf("fleet: %d %s", code, raw)
	}
	code, raw := tv.req(t, "POST", "/v1/machines", testAdmin, api.CreateMachineRequest{Fleet: "f"})
	if code != 202 {
		t.Fatalf("machine: %d %s", code, raw)
	}
	var m api.Machine
	_ = json.Unmarshal(raw, &m)
	deadline := time.Now().Add(5 * time.Second)
	for tv.machine(t, m.ID).State != api.MachineBooting {
		if time.Now().After(deadline) {
			t.Fatal("machine never booting")
		}
		time.Sleep(time.Millisecond)
	}
	tv.report(t, m.ID, 1, nil, nil)
	if st := tv.machine(t, m.ID).State; st != api.MachineReady {
		t.Fatalf("after the first report: %s", st)
	}
	return m.ID
}

// A VMM whose loop stalled (here: the clock jumps past the lost timeout
// between two ticks) has not been reading reports: it holds lost detection
// back one report interval instead of ending the machine's games; a
// machine that stays silent after that is lost.
func TestVMMStallDoesNotLoseMachines(t *testing.T) {
	tv := newTestVMM(t)
	id := bootOne(t, tv)
	p := tv.startIn(t, "f")
	live := []api.Process{{ID: p.ID, State: api.StateReady}}
	tv.step(time.Second) // the loop ticks as it does
	tv.report(t, id, 2, live, nil)
	tv.advance(5 * time.Second) // past LostAfter (3 s) in one tick: a stall
	if st := tv.machine(t, id).State; st != api.MachineReady {
		t.Fatalf("after the VMM's own stall: %s", st)
	}
	tv.report(t, id, 3, live, nil) // the machine was fine all along
	tv.step(2500 * time.Millisecond)
	if st := tv.machine(t, id).State; st != api.MachineReady {
		t.Fatalf("lost too early after the stall: %s", st)
	}
	tv.step(time.Second)
	if st := tv.machine(t, id).State; st != api.MachineLost {
		t.Fatalf("after 3.5 silent intervals past the stall: %s", st)
	}
}

// With a longer report interval the machines are looked over less often
// than the loop ticks, and a silent machine is still lost in time.
func TestSilentMachineLostWithSparseLooks(t *testing.T) {
	tv := newTestVMM(t, func(c *Config) { c.ReportInterval = 4 * time.Second })
	id := bootOne(t, tv)
	p := tv.startIn(t, "f")
	tv.step(time.Second)
	tv.report(t, id, 2, []api.Process{{ID: p.ID, State: api.StateReady}}, nil)
	tv.step(11500 * time.Millisecond) // under 3 intervals (12 s) of silence
	if st := tv.machine(t, id).State; st != api.MachineReady {
		t.Fatalf("lost too early: %s", st)
	}
	tv.step(1500 * time.Millisecond) // at most one look (1 s) past them
	if st := tv.machine(t, id).State; st != api.MachineLost {
		t.Fatalf("after 13 s of silence: %s", st)
	}
}

func TestSilentMachineGoesLostWithItsProcesses(t *testing.T) {
	tv := newTestVMM(t)
	id := bootOne(t, tv)
	p := tv.startIn(t, "f")
	tv.step(2 * time.Second)
	tv.report(t, id, 2, []api.Process{{ID: p.ID, State: api.StateReady}}, nil)
	tv.step(2500 * time.Millisecond) // under 3 intervals of silence
	if st := tv.machine(t, id).State; st != api.MachineReady {
		t.Fatalf("lost too early: %s", st)
	}
	tv.step(time.Second)
	if st := tv.machine(t, id).State; st != api.MachineLost {
		t.Fatalf("after 3.5 silent intervals: %s", st)
	}
	var got api.Process
	_ = tv.doWait(func(s *state) { got = *s.processes[p.ID] })
	if got.State != api.StateLost || got.Exit == nil || got.Exit.Reason != api.ReasonLost {
		t.Fatalf("process %s %+v", got.State, got.Exit)
	}
	// The provider is told to delete what is left of it, once; the record
	// keeps the provider's id as evidence.
	deadline := time.Now().Add(5 * time.Second)
	for {
		tv.prov.mu.Lock()
		n := len(tv.prov.deleted)
		tv.prov.mu.Unlock()
		if n == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("provider deletes: %d", n)
		}
		tv.step(tv.cfg.TickInterval) // the tick starts the delete
		time.Sleep(time.Millisecond)
	}
	tv.step(time.Minute)
	tv.prov.mu.Lock()
	n := len(tv.prov.deleted)
	tv.prov.mu.Unlock()
	if m := tv.machine(t, id); n != 1 || m.ProviderID != id || m.State != api.MachineLost {
		t.Fatalf("after the delete: %d deletes, machine %+v", n, m)
	}
}

func TestStaleReportIsIgnored(t *testing.T) {
	tv := newTestVMM(t)
	id := bootOne(t, tv)
	tv.report(t, id, 10, []api.Process{{ID: "p-x", State: api.StateReady}}, nil)
	code, raw := tv.req(t, "POST", "/v1/machines/"+id+"/status", tv.prov.token(id), api.Status{MachineID: id, Seq: 9, State: api.LoadEmpty})
	if code != 200 || !strings.Contains(string(raw), `"applied":false`) {
		t.Fatalf("stale report: %d %s", code, raw)
	}
	var n int
	_ = tv.doWait(func(s *state) { n = len(s.machines[id].procs) })
	if n != 1 {
		t.Fatalf("a stale report changed the machine: %d processes", n)
	}
}

func TestBootTimeoutDeletesTheMachine(t *testing.T) {
	tv := newTestVMM(t)
	if code, _ := tv.req(t, "POST", "/v1/fleets", testAdmin, fleetOf("f")); code != 201 {
		t.Fatal("fleet")
	}
	_, raw := tv.req(t, "POST", "/v1/machines", testAdmin, api.CreateMachineRequest{Fleet: "f"})
	var m api.Machine
	_ = json.Unmarshal(raw, &m)
	for tv.machine(t, m.ID).State != api.MachineBooting { // the provider answers off the loop
		time.Sleep(time.Millisecond)
	}
	tv.step(9 * time.Second)
	if st := tv.machine(t, m.ID).State; st != api.MachineBooting {
		t.Fatalf("before the boot timeout: %s", st)
	}
	tv.step(2 * time.Second)
	deadline := time.Now().Add(5 * time.Second)
	for tv.machine(t, m.ID).State != api.MachineTerminated {
		if time.Now().After(deadline) {
			t.Fatalf("machine %s", tv.machine(t, m.ID).State)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestIdleShutdownWaitsForTheHandshake(t *testing.T) {
	tv := newTestVMM(t)
	id := bootOne(t, tv)
	seq := uint64(1)
	// alive keeps the machine reporting (empty) while time passes.
	alive := func(d time.Duration) {
		for moved := time.Duration(0); moved < d; moved += 500 * time.Millisecond {
			seq++
			tv.report(t, id, seq, nil, nil)
			tv.step(500 * time.Millisecond)
		}
	}
	waitFor := func(what string, cond func() bool) {
		deadline := time.Now().Add(5 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("%s: machine %s, %d handshakes", what, tv.machine(t, id).State, tv.prov.lspm.shutdown.Load())
			}
			time.Sleep(time.Millisecond)
			tv.step(0)
		}
	}
	tv.prov.lspm.busy.Store(true)
	alive(6 * time.Second) // past the idle timeout: draining, then refused
	waitFor("a refused handshake puts it back to ready", func() bool {
		return tv.prov.lspm.shutdown.Load() > 0 && tv.machine(t, id).State == api.MachineReady
	})
	tv.prov.mu.Lock()
	deletedEarly := len(tv.prov.deleted)
	tv.prov.mu.Unlock()
	if deletedEarly != 0 {
		t.Fatal("the provider deleted a machine whose LSPM refused the handshake")
	}
	tv.prov.lspm.busy.Store(false)
	alive(6 * time.Second)
	waitFor("an accepted handshake deletes it", func() bool { return tv.machine(t, id).State == api.MachineTerminated })
	tv.prov.mu.Lock()
	defer tv.prov.mu.Unlock()
	if len(tv.prov.deleted) != 1 || tv.prov.deleted[0] != id {
		t.Fatalf("deleted %v", tv.prov.deleted)
	}
}

// Machines gone for good are forgotten beyond KeepEndedMachines, oldest
// first, in memory and in the store.
func TestEndedMachinesArePruned(t *testing.T) {
	tv := newTestVMM(t, func(c *Config) { c.KeepEndedMachines = 1 })
	f := fleetOf("f")
	f.Scaling.MaxMachines = 3
	if code, _ := tv.req(t, "POST", "/v1/fleets", testAdmin, f); code != 201 {
		t.Fatal("fleet")
	}
	var ids []string
	for i := 0; i < 3; i++ {
		_, raw := tv.req(t, "POST", "/v1/machines", testAdmin, api.CreateMachineRequest{Fleet: "f"})
		var m api.Machine
		_ = json.Unmarshal(raw, &m)
		ids = append(ids, m.ID)
		for tv.machine(t, m.ID).State != api.MachineBooting {
			time.Sleep(time.Millisecond)
		}
		tv.step(time.Second) // distinct creation times
	}
	tv.step(11 * time.Second) // all three miss the boot timeout
	deadline := time.Now().Add(5 * time.Second)
	for _, id := range ids {
		for tv.machine(t, id).State != api.MachineTerminated {
			if time.Now().After(deadline) {
				t.Fatalf("machine %s: %s", id, tv.machine(t, id).State)
			}
			time.Sleep(time.Millisecond)
		}
	}
	tv.step(40 * tv.cfg.TickInterval) // a prune round
	for i, id := range ids {
		code, _ := tv.req(t, "GET", "/v1/machines/"+id, testAdmin, nil)
		if want := map[bool]int{true: 200, false: 404}[i == 2]; code != want {
			t.Errorf("machine %d (%s): GET %d, want %d", i, id, code, want)
		}
	}
	deadline = time.Now().Add(5 * time.Second)
	for {
		snap, err := tv.store.Load()
		if err != nil {
			t.Fatal(err)
		}
		if len(snap.Machines) == 1 && snap.Machines[0].Key == ids[2] {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("stored machines: %d", len(snap.Machines))
		}
		time.Sleep(5 * time.Millisecond)
	}
}
