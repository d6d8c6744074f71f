package lspm

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"mime"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"dedi.dev/dedi/api"
	"dedi.dev/dedi/internal/rest"
)

// The promises of validateSpawn, written out again here rather than taken
// from http.go, so that a loosened pattern there shows up as a failure.
var (
	fuzzIDPattern   = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)
	fuzzPortPattern = regexp.MustCompile(`^[a-z][a-z0-9_]{0,31}$`)
	fuzzEnvPattern  = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]{0,127}$`)
)

var spawnSeeds = []string{
	`{}`,
	`{"id": "p-1", "command": ["/opt/game/server", "--map", "arena"], "params": {"mode": "ranked"}, "env": {"MODE": "x"}, "labels": {"region": "eu"}, "ports": ["game", "query"], "health": {"periodSeconds": 2, "failureThreshold": 3, "startTimeoutSeconds": 60}, "sdk": "dedi"}`,
	`{"id": "../x"}`,
	`{"id": "-x"}`,
	`{"id": "a.b_c-d"}`,
	`{"ports": ["Game"]}`,
	`{"ports": ["game", "game"]}`,
	`{"ports": []}`,
	`{"env": {"DEDI_PROCESS_TOKEN": "x"}}`,
	`{"env": {"AGONES_SDK_HTTP_PORT": "1"}}`,
	`{"env": {"dedi_x": "1"}}`,
	`{"env": {"DEDI_": ""}}`,
	`{"env": {"DEDI_PORT_GAME": "1"}}`,
	`{"env": {"DEDI_FAKEGAME": "1"}}`,
	`{"env": {"A": "x\u0000"}}`,
	`{"command": [""]}`,
	`{"command": ["x", "a\u0000"]}`,
	`{"labels": {"": "x"}}`,
	`{"health": {"periodSeconds": 0.001}}`,
	`{"health": {"periodSeconds": -1}}`,
	`{"health": {"failureThreshold": 1001}}`,
	`{"sdk": "agones"}`,
	`{"sdk": "steam"}`,
	`{"memoryLimitBytes": -1}`,
}

// FuzzSpawnRequest: decoding and validating any body never panics, refuses
// with a 400 only, and what it accepts keeps validateSpawn's promises.
func FuzzSpawnRequest(f *testing.F) {
	for _, s := range spawnSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		var req api.SpawnRequest
		if err := rest.DecodeBytes(body, &req, false); err != nil {
			return
		}
		if err := validateSpawn(&req); err != nil {
			wantInvalid(t, err)
			return
		}
		if req.ID != "" {
			if !fuzzIDPattern.MatchString(req.ID) {
				t.Fatalf("accepted id %q", req.ID)
			}
			procs := "/data/processes"
			if dir := filepath.Join(procs, req.ID); filepath.Dir(dir) != procs {
				t.Fatalf("id %q leaves the processes directory: %s", req.ID, dir)
			}
		}
		if len(req.Command) > 0 && req.Command[0] == "" {
			t.Fatalf("accepted an empty executable")
		}
		for _, arg := range req.Command {
			if strings.ContainsRune(arg, 0) {
				t.Fatalf("accepted a NUL in argument %q", arg)
			}
		}
		if len(req.Ports) > 16 {
			t.Fatalf("accepted %d ports", len(req.Ports))
		}
		seen := map[string]bool{}
		for _, name := range req.Ports {
			if !fuzzPortPattern.MatchString(name) || seen[name] {
				t.Fatalf("accepted port name %q in %q", name, req.Ports)
			}
			seen[name] = true
		}
		for k, v := range req.Env {
			if !fuzzEnvPattern.MatchString(k) || setByLSPM(k) {
				t.Fatalf("accepted env name %q", k)
			}
			if strings.ContainsRune(v, 0) {
				t.Fatalf("accepted a NUL in env %s", k)
			}
		}
		for k := range req.Labels {
			if k == "" || len(k) > 128 {
				t.Fatalf("accepted label name %q", k)
			}
		}
		if h := req.Health; h != nil {
			if h.PeriodSeconds < 0 || h.PeriodSeconds > 3600 || (h.PeriodSeconds != 0 && h.PeriodSeconds < 0.01) ||
				h.FailureThreshold < 0 || h.FailureThreshold > 1000 ||
				h.StartTimeoutSeconds < 0 || h.StartTimeoutSeconds > 86400 {
				t.Fatalf("accepted health %+v", *h)
			}
		}
		if req.SDK != "" && req.SDK != api.SDKDedi && req.SDK != api.SDKAgones {
			t.Fatalf("accepted sdk %q", req.SDK)
		}
	})
}

// FuzzHeartbeat: the same for heartbeat bodies and validateHeartbeat.
func FuzzHeartbeat(f *testing.F) {
	for _, s := range []string{``, `{}`, `null`, `{"players": 3}`, `{"players": -1}`, `{"players": 1000001}`,
		`{"instances": 100001}`, `{"players": 1.5}`, `{"players": 9223372036854775808}`, `{"player": 1}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		var hb api.Heartbeat
		if err := rest.DecodeBytes(body, &hb, true); err != nil {
			return
		}
		if err := validateHeartbeat(hb); err != nil {
			wantInvalid(t, err)
			return
		}
		if p := hb.Players; p != nil && (*p < 0 || *p > 1_000_000) {
			t.Fatalf("accepted players %d", *p)
		}
		if n := hb.Instances; n != nil && (*n < 0 || *n > 100_000) {
			t.Fatalf("accepted instances %d", *n)
		}
	})
}

// setByLSPM reports whether the LSPM sets the variable k for a game server
// itself (API.md "What a game server process receives"), or it is a secret
// of the daemons; a spawn request must not name it.
func setByLSPM(k string) bool {
	switch k {
	case api.EnvProcessID, api.EnvProcessToken, api.EnvSDKURL, api.EnvParams, api.EnvMachineID,
		api.EnvFleet, api.EnvHeartbeatMS, api.EnvMachineToken, api.EnvAdminToken:
		return true
	}
	return strings.HasPrefix(k, api.EnvPortPrefix) || strings.HasPrefix(k, "AGONES_SDK_")
}

func wantInvalid(t *testing.T, err error) {
	t.Helper()
	var e *rest.Error
	if !errors.As(err, &e) || e.Kind != rest.Invalid || e.Code == "" {
		t.Fatalf("refusal %#v is not an Invalid *rest.Error", err)
	}
}

const fuzzToken = "0123456789abcdef0123"

// FuzzHandler drives the whole REST API with the machine token: no request
// gets a 500, every answer is JSON (or problem+json, or the text of a log),
// and every error carries a code. The agent has no default command and
// allows no executable, so no request can start a process.
func FuzzHandler(f *testing.F) {
	a, err := New(Config{DataDir: f.TempDir(), MachineID: "m", Token: fuzzToken, Listen: "127.0.0.1:0"},
		slog.New(slog.DiscardHandler), nil)
	if err != nil {
		f.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- a.Run(ctx) }()
	f.Cleanup(func() {
		cancel()
		if err := <-ran; err != nil {
			f.Errorf("Run: %v", err)
		}
	})
	h := a.Handler()

	for _, s := range []struct{ method, path, query, body string }{
		{"GET", "/healthz", "", ""},
		{"GET", "/v1/status", "", ""},
		{"GET", "/v1/processes", "", ""},
		{"POST", "/v1/processes", "", `{}`},
		{"POST", "/v1/processes", "", `{"command": ["/bin/sh", "-c", "true"], "ports": []}`},
		{"POST", "/v1/processes", "", `{"command": [`},
		{"GET", "/v1/processes/p-1", "", ""},
		{"DELETE", "/v1/processes/p-1", "grace=1s", ""},
		{"DELETE", "/v1/processes/p-1", "grace=x", ""},
		{"GET", "/v1/processes/p-1/logs", "tail=10&follow=true", ""},
		{"GET", "/v1/processes/p-1/logs", "tail=-1", ""},
		{"POST", "/v1/processes/p-1/allocate", "", ""},
		{"POST", "/v1/processes/p-1/ready", "", ""},
		{"POST", "/v1/processes/p-1/heartbeat", "", `{"players": 1}`},
		{"POST", "/v1/processes/p-1/shutdown", "", ""},
		{"POST", "/v1/shutdown", "", ""},
		{"PUT", "/v1/status", "", ""},
		{"GET", "/nope", "", ""},
		{"GET", "/v1/processes/%2e%2e/logs", "", ""},
		{"OPTIONS", "*", "", ""},
	} {
		f.Add(s.method, s.path, s.query, []byte(s.body))
	}
	f.Fuzz(func(t *testing.T, method, path, query string, body []byte) {
		if !strings.HasPrefix(path, "/") {
			path = "/" + path
		}
		target := "http://lspm" + path
		if query != "" {
			target += "?" + query
		}
		req, err := http.NewRequest(method, target, strings.NewReader(string(body)))
		if err != nil || req.URL.Host != "lspm" {
			return // not a request a client could send
		}
		req.Header.Set("Authorization", "Bearer "+fuzzToken)
		ctx, cancel := context.WithCancel(context.Background())
		cancel() // a follow=true stream must not hold the fuzzer
		req = req.WithContext(ctx)
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)

		res := rec.Result()
		raw, _ := io.ReadAll(res.Body)
		what := method + " " + target
		if res.StatusCode >= 500 && res.StatusCode != http.StatusServiceUnavailable {
			t.Fatalf("%s: %d %s", what, res.StatusCode, raw)
		}
		if res.StatusCode/100 == 3 {
			// The mux redirects unclean paths (/v1//status) to the clean one.
			if res.Header.Get("Location") == "" {
				t.Fatalf("%s: %d without Location", what, res.StatusCode)
			}
			return
		}
		ct, _, _ := mime.ParseMediaType(res.Header.Get("Content-Type"))
		switch {
		case ct == "text/plain" && res.StatusCode == http.StatusOK && strings.HasSuffix(req.URL.Path, "/logs"):
			return
		case ct == "application/json" && res.StatusCode/100 == 2:
		case ct == "application/problem+json" && res.StatusCode >= 400:
		default:
			t.Fatalf("%s: %d with Content-Type %q: %s", what, res.StatusCode, ct, raw)
		}
		if method == http.MethodHead {
			return
		}
		var doc map[string]any
		if err := json.Unmarshal(raw, &doc); err != nil {
			t.Fatalf("%s: %d body is not a JSON object: %v: %q", what, res.StatusCode, err, raw)
		}
		if res.StatusCode/100 != 2 {
			if code, _ := doc["code"].(string); code == "" {
				t.Fatalf("%s: %d problem without a code: %s", what, res.StatusCode, raw)
			}
		}
		if res.StatusCode == http.StatusCreated {
			t.Fatalf("%s: a process was spawned: %s", what, raw)
		}
	})
}
