package e2e

// Who may call what on the LSPM (API.md "Token kinds"), whether it refuses
// to run without a machine token, and how it answers bad input: always a
// problem+json with the right status and code, and never a change of state.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"dedi.dev/dedi/api"
)

// authRoute is one LSPM route; "{id}" in path stands for a process ID.
type authRoute struct {
	method, path string
	body         string
}

func (r authRoute) String() string { return r.method + " " + r.path }

func (r authRoute) url(base, id string) string {
	return base + strings.ReplaceAll(r.path, "{id}", id)
}

// The routes of API.md's LSPM table, by the token they take.
var (
	machineAuthRoutes = []authRoute{
		{"GET", "/v1/status", ""},
		{"POST", "/v1/processes", `{"ports": []}`},
		{"GET", "/v1/processes", ""},
		{"DELETE", "/v1/processes/{id}", ""},
		{"GET", "/v1/processes/{id}/logs", ""},
		{"POST", "/v1/processes/{id}/allocate", ""},
		{"POST", "/v1/shutdown", ""},
	}
	getProcessAuthRoute = authRoute{"GET", "/v1/processes/{id}", ""}
	sdkAuthRoutes       = []authRoute{
		{"POST", "/v1/processes/{id}/ready", ""},
		{"POST", "/v1/processes/{id}/heartbeat", `{"players": 1}`},
		{"POST", "/v1/processes/{id}/shutdown", ""},
	}
	allAuthRoutes = append(append(append([]authRoute{}, machineAuthRoutes...), getProcessAuthRoute), sdkAuthRoutes...)
)

// authCall sends a request with authorization as the whole Authorization
// header ("" for none) and returns the status, headers and body.
func authCall(t testing.TB, method, url, authorization, body string) (int, http.Header, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	if authorization != "" {
		req.Header.Set("Authorization", authorization)
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	var buf bytes.Buffer
	_, _ = buf.ReadFrom(resp.Body)
	return resp.StatusCode, resp.Header, buf.Bytes()
}

func bearerHeader(token string) string { return "Bearer " + token }

// checkProblem checks a problem+json answer of the given status and code.
func checkProblem(t testing.TB, what string, status int, h http.Header, raw []byte, wantStatus int, wantCode string) api.Problem {
	t.Helper()
	if status != wantStatus {
		t.Fatalf("%s: status %d, want %d: %s", what, status, wantStatus, raw)
	}
	if ct := h.Get("Content-Type"); !strings.HasPrefix(ct, "application/problem+json") {
		t.Fatalf("%s: Content-Type %q, want application/problem+json: %s", what, ct, raw)
	}
	p := problemOf(t, raw)
	if p.Code != wantCode || p.Status != wantStatus {
		t.Fatalf("%s: problem code %q status %d, want %q %d: %s", what, p.Code, p.Status, wantCode, wantStatus, raw)
	}
	return p
}

// processTokenOf reads the DEDI_PROCESS_TOKEN the LSPM gave a game server
// from its environment (the test runs as the same user).
func processTokenOf(t testing.TB, pid int) string {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		raw, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/environ")
		if err == nil {
			for _, kv := range bytes.Split(raw, []byte{0}) {
				if v, ok := bytes.CutPrefix(kv, []byte(api.EnvProcessToken+"=")); ok && len(v) > 0 {
					return string(v)
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %s in the environment of pid %d (%v)", api.EnvProcessToken, pid, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// idleProcessWithToken spawns a fake game server that makes no SDK call
// and lives until stopped, and returns it with its process token. The
// helpers of this file take the LSPM's base URL and the machine token of
// the harness.
func idleProcessWithToken(t testing.TB, base string) (api.Process, string) {
	t.Helper()
	req := fake("-no-sdk")
	req.Ports = []string{}
	var p api.Process
	if code, raw := call(t, "POST", base+"/v1/processes", machineToken, req, &p); code != http.StatusCreated {
		t.Fatalf("spawn: %d %s", code, raw)
	}
	return p, processTokenOf(t, p.PID)
}

// getProcessAsMachine is GET /v1/processes/{id} with the machine token.
func getProcessAsMachine(t testing.TB, base, id string) api.Process {
	t.Helper()
	var p api.Process
	if code, raw := call(t, "GET", base+"/v1/processes/"+id, machineToken, nil, &p); code != http.StatusOK {
		t.Fatalf("get %s: %d %s", id, code, raw)
	}
	return p
}

// lspmSnapshot is what GET /v1/processes and GET /v1/status show, without the
// fields that move on their own (the status time and sampled memory).
func lspmSnapshot(t testing.TB, base string) string {
	t.Helper()
	var list api.List[api.Process]
	if code, raw := call(t, "GET", base+"/v1/processes", machineToken, nil, &list); code != http.StatusOK {
		t.Fatalf("list: %d %s", code, raw)
	}
	var st api.Status
	if code, raw := call(t, "GET", base+"/v1/status", machineToken, nil, &st); code != http.StatusOK {
		t.Fatalf("status: %d %s", code, raw)
	}
	st.At = time.Time{}
	for _, ps := range [][]api.Process{list.Items, st.Processes, st.Ended} {
		for i := range ps {
			ps[i].RSSBytes = 0
		}
	}
	b, err := json.MarshalIndent(struct {
		Processes []api.Process
		Status    api.Status
	}{list.Items, st}, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestAuthMatrix(t *testing.T) {
	t.Parallel()
	l := startLSPM(t, lspmOpts{})
	a, tokA := idleProcessWithToken(t, l.url)
	b, _ := idleProcessWithToken(t, l.url)
	before := lspmSnapshot(t, l.url)

	t.Run("no token", func(t *testing.T) {
		for _, r := range allAuthRoutes {
			code, h, raw := authCall(t, r.method, r.url(l.url, a.ID), "", r.body)
			checkProblem(t, r.String(), code, h, raw, http.StatusUnauthorized, api.CodeUnauthorized)
			if wa := h.Get("WWW-Authenticate"); !strings.HasPrefix(wa, "Bearer") {
				t.Fatalf("%s: WWW-Authenticate %q, want Bearer...", r, wa)
			}
		}
	})
	t.Run("wrong token", func(t *testing.T) {
		for _, authz := range []string{
			bearerHeader("not-the-token-0123456789abcdef"),
			bearerHeader(machineToken + "x"),
			bearerHeader(tokA[:len(tokA)-1]),
			"Basic " + machineToken,
			"Bearer",
			machineToken,
		} {
			for _, r := range allAuthRoutes {
				code, h, raw := authCall(t, r.method, r.url(l.url, a.ID), authz, r.body)
				checkProblem(t, fmt.Sprintf("%s with %q", r, authz), code, h, raw, http.StatusUnauthorized, api.CodeUnauthorized)
				if wa := h.Get("WWW-Authenticate"); !strings.HasPrefix(wa, "Bearer") {
					t.Fatalf("%s: WWW-Authenticate %q, want Bearer...", r, wa)
				}
			}
		}
	})
	t.Run("process token on machine routes", func(t *testing.T) {
		for _, r := range machineAuthRoutes {
			code, h, raw := authCall(t, r.method, r.url(l.url, a.ID), bearerHeader(tokA), r.body)
			checkProblem(t, r.String(), code, h, raw, http.StatusForbidden, api.CodeForbidden)
		}
	})
	t.Run("process token on another process", func(t *testing.T) {
		for _, r := range append([]authRoute{getProcessAuthRoute}, sdkAuthRoutes...) {
			code, h, raw := authCall(t, r.method, r.url(l.url, b.ID), bearerHeader(tokA), r.body)
			checkProblem(t, r.String(), code, h, raw, http.StatusForbidden, api.CodeForbidden)
		}
	})
	t.Run("machine token on SDK routes", func(t *testing.T) {
		for _, r := range sdkAuthRoutes {
			code, h, raw := authCall(t, r.method, r.url(l.url, a.ID), bearerHeader(machineToken), r.body)
			checkProblem(t, r.String(), code, h, raw, http.StatusForbidden, api.CodeForbidden)
		}
	})
	t.Run("process token on its own process", func(t *testing.T) {
		var p api.Process
		code, raw := call(t, "GET", l.url+"/v1/processes/"+a.ID, tokA, nil, &p)
		if code != http.StatusOK || p.ID != a.ID {
			t.Fatalf("GET own process: %d %s", code, raw)
		}
	})
	t.Run("healthz needs no token", func(t *testing.T) {
		code, _, raw := authCall(t, "GET", l.url+"/healthz", "", "")
		if code != http.StatusOK {
			t.Fatalf("healthz: %d %s", code, raw)
		}
	})
	t.Run("refused calls changed nothing", func(t *testing.T) {
		if after := lspmSnapshot(t, l.url); after != before {
			t.Fatalf("state changed:\nbefore %s\nafter %s", before, after)
		}
		if !alive(a.PID) || !alive(b.PID) {
			t.Fatal("a refused call ended a process")
		}
	})
	// The positive controls: the token that was refused elsewhere works on
	// its own SDK routes.
	t.Run("process token on its own SDK routes", func(t *testing.T) {
		for _, r := range sdkAuthRoutes {
			var p api.Process
			code, raw := call(t, r.method, r.url(l.url, a.ID), tokA, r.body, &p)
			if code != http.StatusOK || p.ID != a.ID {
				t.Fatalf("%s: %d %s", r, code, raw)
			}
		}
		if p := getProcessAsMachine(t, l.url, a.ID); p.State != api.StateReady || p.Players != 1 {
			t.Fatalf("after ready and heartbeat: %s with %d players", p.State, p.Players)
		}
	})
}

// TestAuthBeforeBody: the token is judged before the body, so a caller
// without the right learns nothing from the validation of its input.
func TestAuthBeforeBody(t *testing.T) {
	t.Parallel()
	l := startLSPM(t, lspmOpts{})
	a, tokA := idleProcessWithToken(t, l.url)
	b, _ := idleProcessWithToken(t, l.url)
	before := lspmSnapshot(t, l.url)
	for _, c := range []struct {
		name, path, authz, body string
		status                  int
		code                    string
	}{
		{"spawn without token", "/v1/processes", "", `{"command": [`, http.StatusUnauthorized, api.CodeUnauthorized},
		{"spawn with a process token", "/v1/processes", bearerHeader(tokA), `{"command": [`, http.StatusForbidden, api.CodeForbidden},
		{"heartbeat without token", "/v1/processes/" + a.ID + "/heartbeat", "", `{"players": -1}`, http.StatusUnauthorized, api.CodeUnauthorized},
		{"heartbeat with a wrong token", "/v1/processes/" + a.ID + "/heartbeat", bearerHeader("wrong-token-0123456789"), `{"players": -1}`, http.StatusUnauthorized, api.CodeUnauthorized},
		{"heartbeat with the machine token", "/v1/processes/" + a.ID + "/heartbeat", bearerHeader(machineToken), `{"players": "x"}`, http.StatusForbidden, api.CodeForbidden},
		{"heartbeat with another process's token", "/v1/processes/" + b.ID + "/heartbeat", bearerHeader(tokA), `{"players": -1}`, http.StatusForbidden, api.CodeForbidden},
	} {
		t.Run(c.name, func(t *testing.T) {
			code, h, raw := authCall(t, "POST", l.url+c.path, c.authz, c.body)
			checkProblem(t, c.name, code, h, raw, c.status, c.code)
		})
	}
	if after := lspmSnapshot(t, l.url); after != before {
		t.Fatalf("state changed:\nbefore %s\nafter %s", before, after)
	}
}

// envWithout is the test's environment without the named variables.
func envWithout(names ...string) []string {
	var env []string
next:
	for _, kv := range os.Environ() {
		for _, n := range names {
			if strings.HasPrefix(kv, n+"=") {
				continue next
			}
		}
		env = append(env, kv)
	}
	return env
}

func TestTokenRequiredToStart(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name  string
		args  []string
		token string // DEDI_MACHINE_TOKEN; "" leaves it unset
	}{
		{"no token at all", nil, ""},
		{"empty env token", nil, "="},
		{"short flag token", []string{"--token", "short"}, ""},
		{"short env token", nil, "short"},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			defer cancel()
			args := append([]string{"lspm", "--listen", "127.0.0.1:0", "--data-dir", dir, "--machine-id", "m"}, c.args...)
			cmd := exec.CommandContext(ctx, dediBin, args...)
			cmd.Env = envWithout(api.EnvMachineToken)
			switch c.token {
			case "":
			case "=":
				cmd.Env = append(cmd.Env, api.EnvMachineToken+"=")
			default:
				cmd.Env = append(cmd.Env, api.EnvMachineToken+"="+c.token)
			}
			out, err := cmd.CombinedOutput()
			if ctx.Err() != nil {
				t.Fatalf("the LSPM kept running without a valid token:\n%s", out)
			}
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() == 0 {
				t.Fatalf("exit %v, want a non-zero exit:\n%s", err, out)
			}
			if !strings.Contains(strings.ToLower(string(out)), "token") {
				t.Fatalf("the message does not mention the token:\n%s", out)
			}
			if _, err := os.Stat(filepath.Join(dir, "lspm.addr")); err == nil {
				t.Fatal("the LSPM listened before refusing to start")
			}
		})
	}
}

func TestInsecureStartsWithoutToken(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	var logs bytes.Buffer
	cmd := exec.Command(dediBin, "lspm", "--insecure", "--listen", "127.0.0.1:0", "--data-dir", dir, "--machine-id", "m")
	cmd.Env = envWithout(api.EnvMachineToken)
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
		killUnder(dir)
	})
	var url string
	for deadline := time.Now().Add(10 * time.Second); url == ""; {
		if b, err := os.ReadFile(filepath.Join(dir, "lspm.addr")); err == nil && len(b) > 0 {
			url = "http://" + string(b)
			break
		}
		select {
		case err := <-exited:
			t.Fatalf("--insecure LSPM exited (%v):\n%s", err, logs.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("--insecure LSPM did not start:\n%s", logs.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
	var st api.Status
	if code, raw := call(t, "GET", url+"/v1/status", "", nil, &st); code != http.StatusOK || st.MachineID != "m" {
		t.Fatalf("status without a token: %d %s", code, raw)
	}
	if code, raw := call(t, "GET", url+"/v1/processes", "", nil, nil); code != http.StatusOK {
		t.Fatalf("list without a token: %d %s", code, raw)
	}
}

// badInput is one request the LSPM must refuse without changing anything.
type badInput struct {
	name   string
	method string
	path   string // "{id}" stands for the live process
	body   string
	status int
	code   string
}

// spawnOverMiB is a JSON object just over the 1 MiB body limit.
var spawnOverMiB = `{"params": {"pad": "` + strings.Repeat("a", 1<<20) + `"}}`

func spawnBad(name, body string) badInput {
	return badInput{"spawn " + name, "POST", "/v1/processes", body, http.StatusBadRequest, api.CodeInvalid}
}

func heartbeatBad(name, body string) badInput {
	return badInput{"heartbeat " + name, "POST", "/v1/processes/{id}/heartbeat", body, http.StatusBadRequest, api.CodeInvalid}
}

func queryBad(method, path, query string) badInput {
	return badInput{method + " " + path + "?" + query, method, path + "?" + query, "", http.StatusBadRequest, api.CodeInvalid}
}

func badInputs() []badInput {
	cases := []badInput{
		// Bodies of POST /v1/processes: syntax.
		spawnBad("empty body", ""),
		spawnBad("broken JSON", `{"command": [`),
		spawnBad("not JSON", `command=/bin/sh`),
		spawnBad("byte order mark", "\ufeff{}"),
		spawnBad("an array", `[]`),
		spawnBad("a string", `"spawn"`),
		spawnBad("trailing garbage", `{"ports": []} x`),
		spawnBad("two objects", `{"ports": []}{"ports": []}`),
		spawnBad("unknown field", `{"ports": [], "nope": 1}`),
		spawnBad("unknown field with a space", `{"ports": [], "ports ": []}`),
		// Field names are exact (API.md: camelCase); a refused command
		// keeps this one from spawning if the name were taken.
		spawnBad("field name in another case", `{"COMMAND": ["/bin/sh"]}`),
		// Wrong types.
		spawnBad("id a number", `{"id": 5}`),
		spawnBad("command a string", `{"command": "/bin/sh"}`),
		spawnBad("command of numbers", `{"command": [1]}`),
		spawnBad("params an array", `{"params": []}`),
		spawnBad("params a string", `{"params": "x"}`),
		spawnBad("env value a number", `{"env": {"A": 1}}`),
		spawnBad("labels value a bool", `{"labels": {"a": true}}`),
		spawnBad("ports a string", `{"ports": "game"}`),
		spawnBad("health an array", `{"health": []}`),
		spawnBad("health period a string", `{"health": {"periodSeconds": "2"}}`),
		spawnBad("failure threshold a fraction", `{"health": {"failureThreshold": 1.5}}`),
		spawnBad("sdk a number", `{"sdk": 1}`),
		spawnBad("memory limit a string", `{"memoryLimitBytes": "1"}`),
		spawnBad("memory limit overflowing", `{"memoryLimitBytes": 1e30}`),
		// Bad ids.
		spawnBad("id starting with a dash", `{"id": "-x"}`),
		spawnBad("id starting with a dot", `{"id": ".x"}`),
		spawnBad("id dot dot", `{"id": ".."}`),
		spawnBad("id with a slash", `{"id": "a/b"}`),
		spawnBad("id escaping", `{"id": "../../x"}`),
		spawnBad("id with a space", `{"id": "a b"}`),
		spawnBad("id with a NUL", `{"id": "a\u0000"}`),
		spawnBad("id of 129 characters", `{"id": "`+strings.Repeat("a", 129)+`"}`),
		// Bad commands.
		spawnBad("empty executable", `{"command": [""]}`),
		spawnBad("NUL in an argument", `{"command": ["/bin/true", "a\u0000b"]}`),
		// Bad port names.
		spawnBad("port upper case", `{"ports": ["Game"]}`),
		spawnBad("port starting with a digit", `{"ports": ["1game"]}`),
		spawnBad("port empty", `{"ports": [""]}`),
		spawnBad("port with a dash", `{"ports": ["game-2"]}`),
		spawnBad("port of 33 characters", `{"ports": ["`+strings.Repeat("p", 33)+`"]}`),
		spawnBad("port named twice", `{"ports": ["game", "game"]}`),
		spawnBad("17 ports", `{"ports": [`+portNameList(17)+`]}`),
		// Bad env names.
		spawnBad("env DEDI_", `{"env": {"DEDI_PROCESS_TOKEN": "x"}}`),
		spawnBad("env AGONES_", `{"env": {"AGONES_SDK_HTTP_PORT": "1"}}`),
		spawnBad("env starting with a digit", `{"env": {"1A": "x"}}`),
		spawnBad("env with a dash", `{"env": {"A-B": "x"}}`),
		spawnBad("env with =", `{"env": {"A=B": "x"}}`),
		spawnBad("env empty name", `{"env": {"": "x"}}`),
		spawnBad("env NUL in value", `{"env": {"A": "x\u0000"}}`),
		spawnBad("env name of 129 characters", `{"env": {"`+strings.Repeat("E", 129)+`": "x"}}`),
		// Bad labels and health.
		spawnBad("label empty name", `{"labels": {"": "x"}}`),
		spawnBad("health negative period", `{"health": {"periodSeconds": -1}}`),
		spawnBad("health period over an hour", `{"health": {"periodSeconds": 3601}}`),
		spawnBad("health period too small", `{"health": {"periodSeconds": 0.001}}`),
		spawnBad("health negative threshold", `{"health": {"failureThreshold": -1}}`),
		spawnBad("health threshold over 1000", `{"health": {"failureThreshold": 1001}}`),
		spawnBad("health negative start timeout", `{"health": {"startTimeoutSeconds": -1}}`),
		spawnBad("health start timeout over a day", `{"health": {"startTimeoutSeconds": 86401}}`),
		spawnBad("unknown sdk", `{"sdk": "steam"}`),
		{"spawn over 1 MiB", "POST", "/v1/processes", spawnOverMiB, http.StatusRequestEntityTooLarge, api.CodeTooLarge},
		{"spawn an executable not allowed", "POST", "/v1/processes", `{"command": ["/bin/sh", "-c", "true"]}`, http.StatusForbidden, api.CodeExecutableNotAllowed},
		{"spawn the id of a live process", "POST", "/v1/processes", `{"id": "{id}", "ports": []}`, http.StatusConflict, api.CodeExists},

		// Bodies of POST .../heartbeat (with the process's own token).
		heartbeatBad("broken JSON", `{"players": `),
		heartbeatBad("unknown field", `{"player": 1}`),
		heartbeatBad("players a string", `{"players": "3"}`),
		heartbeatBad("players a fraction", `{"players": 1.5}`),
		heartbeatBad("players a bool", `{"players": true}`),
		heartbeatBad("an array", `[1]`),
		heartbeatBad("trailing garbage", `{"players": 1} {}`),
		heartbeatBad("negative players", `{"players": -1}`),
		heartbeatBad("too many players", `{"players": 1000001}`),
		heartbeatBad("negative instances", `{"instances": -1}`),
		{"heartbeat over 1 MiB", "POST", "/v1/processes/{id}/heartbeat", `{"players": 1, "pad": "` + strings.Repeat("a", 1<<20) + `"}`, http.StatusRequestEntityTooLarge, api.CodeTooLarge},

		// Query parameters.
		queryBad("DELETE", "/v1/processes/{id}", "grace=abc"),
		queryBad("DELETE", "/v1/processes/{id}", "grace=10"),
		queryBad("DELETE", "/v1/processes/{id}", "grace=-1s"),
		queryBad("DELETE", "/v1/processes/{id}", "grace=2h"),
		queryBad("GET", "/v1/processes/{id}/logs", "tail=-1"),
		queryBad("GET", "/v1/processes/{id}/logs", "tail=ten"),
		queryBad("GET", "/v1/processes/{id}/logs", "tail=1.5"),
		queryBad("GET", "/v1/processes/{id}/logs", "tail=1000001"),
		queryBad("GET", "/v1/processes/{id}/logs", "tail=99999999999999999999"),
		queryBad("GET", "/v1/processes/{id}/logs", "follow=yes"),
		queryBad("GET", "/v1/processes/{id}/logs", "follow=2"),
		queryBad("GET", "/v1/processes/{id}/logs", "tail=5&follow=maybe"),
	}
	// Unknown process IDs on the machine's routes.
	for _, r := range []authRoute{
		{"GET", "/v1/processes/p-nope", ""},
		{"DELETE", "/v1/processes/p-nope", ""},
		{"GET", "/v1/processes/p-nope/logs", ""},
		{"POST", "/v1/processes/p-nope/allocate", ""},
	} {
		cases = append(cases, badInput{"unknown id " + r.String(), r.method, r.path, "", http.StatusNotFound, api.CodeNotFound})
	}
	// Unknown paths.
	for _, r := range []authRoute{
		{"GET", "/", ""},
		{"GET", "/v1", ""},
		{"GET", "/v2/status", ""},
		{"GET", "/v1/status/x", ""},
		{"POST", "/v1/processes/{id}/restart", ""},
		{"GET", "/v1/processes/{id}/logs/x", ""},
		{"POST", "/v1/processes/{id}/ready/x", ""},
		{"GET", "/v1/machines", ""},
	} {
		cases = append(cases, badInput{"unknown path " + r.String(), r.method, r.path, "", http.StatusNotFound, api.CodeNotFound})
	}
	// Wrong methods on known paths.
	for _, r := range []authRoute{
		{"POST", "/healthz", ""},
		{"PUT", "/v1/status", ""},
		{"DELETE", "/v1/processes", ""},
		{"PUT", "/v1/processes/{id}", ""},
		{"PATCH", "/v1/processes/{id}", `{}`},
		{"POST", "/v1/processes/{id}", `{}`},
		{"DELETE", "/v1/processes/{id}/logs", ""},
		{"GET", "/v1/processes/{id}/allocate", ""},
		{"GET", "/v1/processes/{id}/ready", ""},
		{"GET", "/v1/processes/{id}/heartbeat", ""},
		{"DELETE", "/v1/processes/{id}/shutdown", ""},
		{"GET", "/v1/shutdown", ""},
	} {
		cases = append(cases, badInput{"wrong method " + r.String(), r.method, r.path, r.body, http.StatusMethodNotAllowed, api.CodeMethodNotAllowed})
	}
	return cases
}

func portNameList(n int) string {
	names := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprintf(`"p%d"`, i)
	}
	return strings.Join(names, ",")
}

func TestBadInput(t *testing.T) {
	t.Parallel()
	l := startLSPM(t, lspmOpts{})
	a, tokA := idleProcessWithToken(t, l.url)
	first := lspmSnapshot(t, l.url)
	for _, c := range badInputs() {
		t.Run(c.name, func(t *testing.T) {
			token := machineToken
			if strings.HasSuffix(c.path, "/heartbeat") && c.method == "POST" {
				token = tokA // the SDK routes take the process's own token
			}
			path := strings.ReplaceAll(c.path, "{id}", a.ID)
			body := strings.ReplaceAll(c.body, "{id}", a.ID)
			before := lspmSnapshot(t, l.url)
			code, h, raw := authCall(t, c.method, l.url+path, bearerHeader(token), body)
			if len(raw) > 400 {
				raw = append(raw[:400:400], "..."...)
			}
			checkProblem(t, c.method+" "+path, code, h, raw, c.status, c.code)
			if code == http.StatusMethodNotAllowed && h.Get("Allow") == "" {
				t.Errorf("405 without an Allow header")
			}
			if after := lspmSnapshot(t, l.url); after != before {
				t.Fatalf("state changed:\nbefore %s\nafter %s", before, after)
			}
		})
	}
	// Nothing was stopped on the way (a SIGTERM would have ended the fake).
	time.Sleep(100 * time.Millisecond)
	if !alive(a.PID) {
		t.Fatal("the process died during the bad requests")
	}
	if last := lspmSnapshot(t, l.url); last != first {
		t.Fatalf("state changed:\nbefore %s\nafter %s", first, last)
	}
}
