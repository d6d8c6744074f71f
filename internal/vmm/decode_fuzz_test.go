package vmm

// Fuzz tests of the VMM's untrusted input: fleet bodies, the machines'
// status reports, and any request an admin client may send. They drive the
// real decoder (rest.DecodeBytes), the real validation and the real HTTP
// handler of a VMM whose provider is a fake that makes machines at once.

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"math"
	"net/http"
	"net/http/httptest"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"dedi.dev/dedi/api"
	"dedi.dev/dedi/internal/clock"
	"dedi.dev/dedi/internal/names"
	"dedi.dev/dedi/internal/provider"
	"dedi.dev/dedi/internal/rest"
)

// fuzzProvider is a provider whose machines exist at once and whose LSPMs
// never answer (their URL is a closed port).
type fuzzProvider struct {
	mu       sync.Mutex
	machines map[string]provider.Machine
}

var _ provider.Provider = (*fuzzProvider)(nil)

func (p *fuzzProvider) Name() string { return "local" }

func (p *fuzzProvider) Create(ctx context.Context, spec provider.Spec) (provider.Machine, error) {
	m := provider.Machine{ProviderID: "fuzz-" + spec.MachineID, MachineID: spec.MachineID, Fleet: spec.Fleet,
		Address: "127.0.0.1", LSPMURL: "http://127.0.0.1:1", CreatedAt: time.Now().UTC()}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.machines[m.ProviderID] = m
	return m, nil
}

func (p *fuzzProvider) Delete(ctx context.Context, providerID string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.machines, providerID)
	return nil
}

func (p *fuzzProvider) List(ctx context.Context, fleet string) ([]provider.Machine, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []provider.Machine
	for _, m := range p.machines {
		if fleet == "" || m.Fleet == fleet {
			out = append(out, m)
		}
	}
	return out, nil
}

const fuzzAdminToken = "fuzz-admin-token-0123456789abcdef"

// newFuzzVMM runs a VMM over a temp dir with the fake provider and a fake
// clock that never moves: no tick runs, so no machine is ever lost, booted
// out or created for minMachines behind the fuzzer's back.
func newFuzzVMM(t testing.TB) *VMM {
	t.Helper()
	cfg := Config{Listen: "127.0.0.1:0", DataDir: t.TempDir(), AdminToken: fuzzAdminToken,
		Providers: map[string]provider.Provider{"local": &fuzzProvider{machines: map[string]provider.Machine{}}}}
	v, err := New(cfg, slog.New(slog.DiscardHandler), clock.NewFake(time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- v.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("run: %v", err)
		}
	})
	return v
}

// fuzzDo sends one request to the VMM's handler and returns the recorded
// answer.
func fuzzDo(ctx context.Context, h http.Handler, method, target, token string, body []byte) *httptest.ResponseRecorder {
	req := httptest.NewRequest(method, target, strings.NewReader(string(body))).WithContext(ctx)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	return rec
}

// mustDo is fuzzDo for the set-up requests, which must answer want.
func mustDo(t testing.TB, h http.Handler, method, target, token, body string, want int, out any) {
	t.Helper()
	rec := fuzzDo(context.Background(), h, method, target, token, []byte(body))
	if rec.Code != want {
		t.Fatalf("%s %s: %d %s", method, target, rec.Code, rec.Body)
	}
	if out != nil {
		if err := json.Unmarshal(rec.Body.Bytes(), out); err != nil {
			t.Fatalf("%s %s: %v", method, target, err)
		}
	}
}

// fuzzMachine makes a fleet "f" and one machine of it, and returns the
// machine's id and token.
func fuzzMachine(t testing.TB, v *VMM, h http.Handler) (string, string) {
	t.Helper()
	mustDo(t, h, "POST", "/v1/fleets", fuzzAdminToken, `{"name": "f", "scaling": {"maxMachines": 100}}`, http.StatusCreated, nil)
	var m api.Machine
	mustDo(t, h, "POST", "/v1/machines", fuzzAdminToken, `{"fleet": "f"}`, http.StatusAccepted, &m)
	var token string
	if err := v.doWait(func(s *state) { token = s.machines[m.ID].token }); err != nil || token == "" {
		t.Fatalf("token of %s: %q %v", m.ID, token, err)
	}
	return m.ID, token
}

// checkProblemAnswer checks that an error answer is a problem document
// with a code.
func checkProblemAnswer(t *testing.T, what string, rec *httptest.ResponseRecorder) {
	t.Helper()
	if ct := rec.Header().Get("Content-Type"); !strings.HasPrefix(ct, "application/problem+json") {
		t.Fatalf("%s: %d with Content-Type %q: %.300s", what, rec.Code, ct, rec.Body)
	}
	var p api.Problem
	if err := json.Unmarshal(rec.Body.Bytes(), &p); err != nil || p.Code == "" || p.Status != rec.Code {
		t.Fatalf("%s: %d with a bad problem document (%v): %.300s", what, rec.Code, err, rec.Body)
	}
	if rec.Code == http.StatusServiceUnavailable && rec.Header().Get("Retry-After") == "" {
		t.Fatalf("%s: 503 without Retry-After", what)
	}
	if rec.Code == http.StatusUnauthorized && !strings.HasPrefix(rec.Header().Get("WWW-Authenticate"), "Bearer") {
		t.Fatalf("%s: 401 without WWW-Authenticate: Bearer", what)
	}
}

// durationFits tells whether seconds is a time.Duration without overflow,
// as the VMM turns the fleet's second counts into durations.
func durationFits(seconds float64) bool {
	return seconds >= 0 && seconds*float64(time.Second) < math.MaxInt64
}

// lspmPortName is the port name rule of the LSPM's spawn validation.
var lspmPortName = regexp.MustCompile(`^[a-z][a-z0-9_]{0,31}$`)

// spawnablePorts tells whether an LSPM takes ports in a spawn: at most 16
// distinct names of lspmPortName.
func spawnablePorts(ports []string) bool {
	seen := map[string]bool{}
	for _, p := range ports {
		if !lspmPortName.MatchString(p) || seen[p] {
			return false
		}
		seen[p] = true
	}
	return len(ports) <= 16
}

func FuzzFleet(f *testing.F) {
	for _, s := range []string{
		`{"name": "demo"}`,
		`{"name": "demo", "provider": "local", "image": "", "command": ["/opt/game/server"], "processesPerMachine": 4,
		  "ports": ["game"], "health": {"periodSeconds": 2, "failureThreshold": 3, "startTimeoutSeconds": 60},
		  "scaling": {"minMachines": 0, "maxMachines": 10, "idleShutdownSeconds": 60}, "placement": "packed", "sdk": "dedi"}`,
		`{"name": "a", "placement": "distributed", "sdk": "agones", "ports": []}`,
		`{"name": "x-1", "processesPerMachine": 1000, "scaling": {"minMachines": 10000, "maxMachines": 10000}}`,
		`{"name": "x", "health": {"periodSeconds": 0.01, "failureThreshold": 1000, "startTimeoutSeconds": 86400}}`,
		`{"name": "x", "scaling": {"idleShutdownSeconds": 0.5}}`,
		`{"name": "x", "scaling": {"minMachines": 3, "maxMachines": 2}}`,
		`{"name": "x", "processesPerMachine": -1}`,
		`{"name": "X"}`,
		`{"name": "x", "Scaling": {}}`,
		`{"name": "x", "command": [""]}`,
		`{"name": "x", "command": ["/g", "a\u0000"], "ports": ["game", "Game", "game"]}`,
		`{"name": "x", "state": "active"}`,
		`{"name": "x"} {}`,
		`{"name": 1}`,
		`[]`,
		``,
	} {
		f.Add([]byte(s))
	}
	// A regression: 1e10 s (317 years, "never") overflowed time.Duration
	// in tick, so an idle machine of such a fleet was drained at once.
	f.Add([]byte(`{"name": "never-idle", "scaling": {"idleShutdownSeconds": 1e10}}`))
	// A regression of this test: its copy of an accepted fleet made an
	// empty command nil, and took its own copy for a change.
	f.Add([]byte(`{"name": "000", "command": []}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		var fl api.Fleet
		err := rest.DecodeBytes(body, &fl, false)
		if err == nil {
			if !json.Valid(body) {
				t.Fatalf("accepted a body that is not JSON: %q", body)
			}
			err = validateFleet(&fl)
		}
		if err != nil {
			var re *rest.Error
			if !errors.As(err, &re) || re.Kind != rest.Invalid || re.Code != api.CodeInvalid {
				t.Fatalf("refusal %v (%T), want an invalid *rest.Error", err, err)
			}
			return
		}
		sc, h := fl.Scaling, fl.Health
		switch {
		case !names.Fleet(fl.Name):
			t.Fatalf("accepted name %q", fl.Name)
		case fl.Provider == "":
			t.Fatal("accepted a fleet without provider")
		case fl.Placement != api.PlacementPacked && fl.Placement != api.PlacementDistributed:
			t.Fatalf("accepted placement %q", fl.Placement)
		case fl.SDK != api.SDKDedi && fl.SDK != api.SDKAgones:
			t.Fatalf("accepted sdk %q", fl.SDK)
		case fl.ProcessesPerMachine < 1 || fl.ProcessesPerMachine > 1000:
			t.Fatalf("accepted processesPerMachine %d", fl.ProcessesPerMachine)
		case fl.Ports == nil:
			t.Fatal("accepted fleet has nil ports")
		case sc.MinMachines < 0 || sc.MinMachines > sc.MaxMachines || sc.MaxMachines < 1 || sc.MaxMachines > 10000:
			t.Fatalf("accepted scaling %+v", sc)
		case !durationFits(sc.IdleShutdownSeconds):
			// The loop compares idle time with
			// time.Duration(idleShutdownSeconds*1e9); past MaxInt64 that
			// conversion goes negative and "idle for ages" means "at once".
			t.Fatalf("accepted idleShutdownSeconds %g, which is no time.Duration", sc.IdleShutdownSeconds)
		case h.PeriodSeconds < 0.01 || h.PeriodSeconds > 3600 || h.FailureThreshold < 1 || h.FailureThreshold > 1000 ||
			h.StartTimeoutSeconds < 0 || h.StartTimeoutSeconds > 86400:
			t.Fatalf("accepted health %+v", h)
		case len(fl.Command) > 0 && fl.Command[0] == "":
			t.Fatal("accepted an empty executable")
		case strings.ContainsRune(strings.Join(fl.Command, ""), 0):
			t.Fatalf("accepted a NUL in command %q", fl.Command)
		case !spawnablePorts(fl.Ports):
			t.Fatalf("accepted ports %q, which every LSPM refuses", fl.Ports)
		case fl.State != "" || !fl.CreatedAt.IsZero():
			t.Fatal("accepted state or createdAt from the client")
		}
		// The defaults are a fixed point: an accepted fleet validates as it is.
		again := fl
		again.Command = slices.Clone(fl.Command) // keeps [] apart from nil, as DeepEqual does
		again.Ports = slices.Clone(fl.Ports)
		if err := validateFleet(&again); err != nil {
			t.Fatalf("accepted fleet refused on a second look: %v", err)
		}
		if !reflect.DeepEqual(again, fl) {
			t.Fatalf("validation is not stable:\n%+v\n%+v", fl, again)
		}
	})
}

func FuzzStatusReport(f *testing.F) {
	now := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	full := api.Status{State: api.LoadPartial, Seq: 7, MaxProcesses: 4, StartedAt: now, At: now,
		Hardware: api.Hardware{CPUModel: "x", CPUs: 2, MemoryBytes: 1 << 30, Kernel: "6.1", Hostname: "h"},
		Processes: []api.Process{{ID: "p-1", State: api.StateReady, Command: []string{"/g"}, Params: map[string]any{"a": 1.0},
			Labels: map[string]string{"b": "c"}, Ports: map[string]int{"game": 30000}, Players: 3, CreatedAt: now, ReadyAt: &now}},
		Ended: []api.Process{{ID: "p-2", State: api.StateCrashed, EndedAt: &now,
			Exit: &api.Exit{Reason: api.ReasonCrashed, Signal: "SIGSEGV", LogTail: []string{"boom"}}}}}
	raw, _ := json.Marshal(full)
	for _, s := range []string{
		string(raw),
		`{"seq": 1, "state": "empty"}`,
		`{"seq": 2, "state": "shutting_down", "shutdownAt": "2025-01-01T00:00:00Z"}`,
		`{"seq": 3, "state": "full", "processes": [{"id": "p-1", "state": "allocated"}]}`,
		`{"seq": 4, "state": "empty", "ended": [{"id": "p-1", "state": "exited", "exit": {"code": 0, "reason": "exited", "logTail": []}}]}`,
		`{"seq": 5, "state": "partial", "processes": [{"id": "p-3", "state": "ready"}, {"id": "p-3", "state": "starting"}], "ended": [{"id": "p-3", "state": "lost"}]}`,
		`{"seq": 6, "state": "empty", "maxProcesses": -1, "at": "0001-01-01T00:00:00Z"}`,
		`{"seq": 18446744073709551615, "state": "full"}`,
		`{"seq": 0, "state": "empty"}`,
		`{"machineId": "m-other", "seq": 9, "state": "empty"}`,
		`{"seq": 1, "state": "on-fire"}`,
		`{"seq": 1, "state": "partial", "processes": [{"state": "ready"}]}`,
		`{"seq": 1, "state": "partial", "processes": [{"id": "p-4", "state": "crashed"}]}`,
		`{"seq": 1, "processes": [{"ID": "p"}]}`,
		`{"seq": 1, "state": "partial", "processes": [{"": ""}]}`, // hung rest.DecodeBytes, this test's reference decoder
		`{"seq": -1}`,
		`{"seq": 1} x`,
		`null`,
		``,
	} {
		f.Add([]byte(s))
	}
	v := newFuzzVMM(f)
	h := v.Handler()
	id, token := fuzzMachine(f, v, h)
	f.Fuzz(func(t *testing.T, body []byte) {
		var st api.Status
		decodeErr := rest.DecodeBytes(body, &st, false)
		// Every report counts as new, so each input reaches applyReport,
		// and finds the machine as the first report did: without the
		// processes of earlier inputs, which would otherwise pile up by
		// the ten thousand (each report asks the LSPM about every one it
		// leaves out) until the worker seems hung.
		if err := v.doWait(func(s *state) {
			m := s.machines[id]
			m.m.Seq = 0
			for pid, p := range s.processes {
				if p.MachineID == id {
					delete(s.processes, pid)
					delete(s.sums, pid)
				}
			}
			clear(m.procs)
			clear(s.asking)
		}); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		rec := fuzzDo(ctx, h, "POST", "/v1/machines/"+id+"/status", token, body)
		what := "report " + string(body)
		if len(what) > 300 {
			what = what[:300] + "..."
		}
		if rec.Code >= 500 {
			t.Fatalf("%s: %d %.300s", what, rec.Code, rec.Body)
		}
		switch {
		case decodeErr != nil:
			if rec.Code != http.StatusBadRequest && rec.Code != http.StatusRequestEntityTooLarge {
				t.Fatalf("%s: undecodable (%v) but answered %d %.300s", what, decodeErr, rec.Code, rec.Body)
			}
			checkProblemAnswer(t, what, rec)
		case st.MachineID != "" && st.MachineID != id:
			if rec.Code != http.StatusBadRequest {
				t.Fatalf("%s: report of machine %q answered %d", what, st.MachineID, rec.Code)
			}
			checkProblemAnswer(t, what, rec)
		case rec.Code == http.StatusOK:
			var ans api.ReportAnswer
			if err := rest.DecodeBytes(rec.Body.Bytes(), &ans, false); err != nil {
				t.Fatalf("%s: answer %q: %v", what, rec.Body, err)
			}
			if ans.Applied != (st.Seq > 0) {
				t.Fatalf("%s: applied %v for seq %d above 0", what, ans.Applied, st.Seq)
			}
		default:
			// A refusal of a decodable report is allowed (the VMM may
			// check values), but only as a 4xx problem.
			checkProblemAnswer(t, what, rec)
		}
		// The state the report left is still served.
		for _, path := range []string{"/v1/machines/" + id, "/v1/processes?machine=" + id, "/v1/fleets/f"} {
			got := fuzzDo(ctx, h, "GET", path, fuzzAdminToken, nil)
			if got.Code != http.StatusOK || !json.Valid(got.Body.Bytes()) {
				t.Fatalf("after %s: GET %s: %d %.300s", what, path, got.Code, got.Body)
			}
		}
	})
}

func FuzzHandler(f *testing.F) {
	for _, c := range []struct{ method, path, query, body string }{
		{"GET", "/healthz", "", ""},
		{"GET", "/metrics", "", ""},
		{"POST", "/v1/fleets", "", `{"name": "g", "processesPerMachine": 2, "scaling": {"maxMachines": 3}}`},
		{"POST", "/v1/fleets", "", `{"name": "f"}`},
		{"POST", "/v1/fleets", "", `{"name": "Bad"}`},
		{"GET", "/v1/fleets", "", ""},
		{"GET", "/v1/fleets/f", "", ""},
		{"DELETE", "/v1/fleets/nope", "", ""},
		{"POST", "/v1/machines", "", `{"fleet": "f"}`},
		{"POST", "/v1/machines", "", `{}`},
		{"GET", "/v1/machines", "fleet=f&state=ready", ""},
		{"GET", "/v1/machines", "state=nope", ""},
		{"DELETE", "/v1/machines/m-nope", "", ""},
		{"POST", "/v1/machines/m-nope/status", "", `{"seq": 1}`},
		{"POST", "/v1/processes", "", `{"fleet": "f", "params": {"a": [1, {"b": null}]}, "labels": {"c": "d"}}`},
		{"POST", "/v1/processes", "wait=ready&timeout=50ms", `{"fleet": "f"}`},
		{"POST", "/v1/processes", "timeout=0s", `{"fleet": "f"}`},
		{"POST", "/v1/processes", "", `{"fleet": "nope"}`},
		{"GET", "/v1/processes", "fleet=f&machine=m&state=ready", ""},
		{"GET", "/v1/processes/p-seed", "", ""},
		{"GET", "/v1/processes/p-seed/logs", "tail=10&follow=false", ""},
		{"GET", "/v1/processes/p-seed/logs", "tail=-1", ""},
		{"DELETE", "/v1/processes/p-seed", "grace=1s", ""},
		{"DELETE", "/v1/processes/p-seed", "grace=x", ""},
		{"GET", "/v1/events", "after=x", ""},
		{"PUT", "/v1/fleets", "", `{}`},
		{"GET", "/v1/fleets/", "", ""},
		{"GET", "/v1/../healthz", "", ""},
		{"GET", "//v1/fleets", "", ""},
		{"GET", "/v1/fleets/%2e%2e", "", ""},
		{"OPTIONS", "*", "", ""},
		{"HEAD", "/v1/fleets", "", ""},
	} {
		f.Add(c.method, c.path, c.query, []byte(c.body))
	}
	v := newFuzzVMM(f)
	h := v.Handler()
	id, token := fuzzMachine(f, v, h)
	// The machine reports in, with one process, so starts find a ready
	// machine (whose LSPM never answers) and p-seed exists.
	seed := `{"seq": 1, "state": "partial", "maxProcesses": 1000, "processes": [{"id": "p-seed", "state": "ready"}]}`
	var ans api.ReportAnswer
	mustDo(f, h, "POST", "/v1/machines/"+id+"/status", token, seed, http.StatusOK, &ans)
	if !ans.Applied {
		f.Fatal("the seed report was not applied")
	}
	f.Fuzz(func(t *testing.T, method, path, query string, body []byte) {
		if !strings.HasPrefix(path, "/") {
			path = "/" + path
		}
		target := "http://vmm.test" + path
		if query != "" {
			target += "?" + query
		}
		// A short deadline ends the requests that wait: for a machine that
		// never boots, for ?wait=ready, for an event stream.
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		req, err := http.NewRequestWithContext(ctx, method, target, strings.NewReader(string(body)))
		if err != nil {
			return // not a request a server could receive
		}
		if req.URL.Path == "/v1/events" {
			return // a stream: it only ends at the deadline, slowing the fuzzer
		}
		req.Header.Set("Authorization", "Bearer "+fuzzAdminToken)
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		what := method + " " + target
		if rec.Code >= 500 && rec.Code != http.StatusServiceUnavailable && rec.Code != http.StatusGatewayTimeout {
			t.Fatalf("%s (body %.200q): %d %.300s", what, body, rec.Code, rec.Body)
		}
		ct := rec.Header().Get("Content-Type")
		switch {
		case strings.HasPrefix(ct, "application/json"), strings.HasPrefix(ct, "application/problem+json"):
			if !json.Valid(rec.Body.Bytes()) {
				t.Fatalf("%s: %d %s that is not JSON: %.300q", what, rec.Code, ct, rec.Body)
			}
		case strings.HasPrefix(ct, "text/event-stream"):
		case strings.HasPrefix(ct, "text/plain; version=0.0.4") && req.URL.Path == "/metrics":
		default:
			t.Fatalf("%s: %d with Content-Type %q: %.300q", what, rec.Code, ct, rec.Body)
		}
		if rec.Code >= 300 {
			checkProblemAnswer(t, what, rec)
		}
	})
}
