package e2e

// Agones SDK compatibility, end to end: a game server written against the
// official Agones Node.js SDK (@google-cloud/agones-sdk from npm) and one
// making the calls of Agones' REST documentation run on a real LSPM with
// "sdk": "agones"; clients outside a game's process tree are refused.
//
// This file's LSPMs listen on 127.0.0.244-247 with ports 43000-43399 (a
// block of 100 each); the Agones SDK ports, which are on 127.0.0.1 since
// the official SDKs dial localhost, come from the same blocks. No other
// test uses them.

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"dedi.dev/dedi/api"
	"dedi.dev/dedi/internal/agonespb"
	"dedi.dev/dedi/test/fakegame"
)

// startHostLSPM starts an LSPM on host (a loopback address of the calling
// test's own) with the ports lo..lo+99. It allows the fake game server and,
// when node is given, the node executable.
func startHostLSPM(t *testing.T, host string, lo int, node string) *lspm {
	t.Helper()
	dataDir := t.TempDir()
	args := []string{"lspm", "--listen", host + ":0", "--data-dir", dataDir, "--machine-id", "m-" + strings.ReplaceAll(host, ".", "-"),
		"--max-processes", "4", "--port-range", fmt.Sprintf("%d-%d", lo, lo+99), "--allow", selfBin}
	if node != "" {
		args = append(args, "--allow", node)
	}
	l := &lspm{t: t, token: machineToken, dataDir: dataDir, args: args}
	t.Cleanup(func() { l.cleanup() })
	l.start()
	return l
}

var (
	agonesNodeOnce sync.Once
	agonesNodeBin  string // the node executable
	agonesNodeDir  string // test/agones-node, with its node_modules
	agonesNodeErr  error
)

// agonesNode returns node and test/agones-node, installing the official
// Agones SDK there (npm ci, from the lock file) if it is not yet.
func agonesNode(t *testing.T) (string, string) {
	t.Helper()
	agonesNodeOnce.Do(func() {
		node, err := exec.LookPath("node")
		if err == nil {
			agonesNodeBin, err = filepath.EvalSymlinks(node)
		}
		if err == nil {
			agonesNodeDir, err = filepath.Abs("../agones-node")
		}
		if agonesNodeErr = err; err != nil {
			return
		}
		if _, err := os.Stat(filepath.Join(agonesNodeDir, "node_modules", "@google-cloud", "agones-sdk", "package.json")); err == nil {
			return
		}
		cmd := exec.Command("npm", "ci", "--no-audit", "--no-fund")
		cmd.Dir = agonesNodeDir
		if out, err := cmd.CombinedOutput(); err != nil {
			agonesNodeErr = fmt.Errorf("npm ci in %s: %v\n%s", agonesNodeDir, err, out)
		}
	})
	if agonesNodeErr != nil {
		t.Fatal(agonesNodeErr)
	}
	return agonesNodeBin, agonesNodeDir
}

// writeControl writes a driver's control file (test/fakegame/drivers.go).
func writeControl(t *testing.T, path string, c fakegame.Control) {
	t.Helper()
	b, _ := json.Marshal(c)
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// logsOf returns a process's captured output.
func (l *lspm) logsOf(t *testing.T, id string) string {
	t.Helper()
	code, raw := call(t, "GET", l.url+"/v1/processes/"+id+"/logs", l.token, nil, nil)
	if code != http.StatusOK {
		t.Fatalf("logs of %s: %d %s", id, code, raw)
	}
	return string(raw)
}

// waitLog polls a process's output until it holds want.
func (l *lspm) waitLog(t *testing.T, id, want string, timeout time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		out := l.logsOf(t, id)
		if strings.Contains(out, want) {
			return out
		}
		if time.Now().After(deadline) {
			t.Fatalf("process %s did not print %q in %s; its output:\n%s", id, want, timeout, out)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestAgonesNodeSDK runs a game server written against the official Agones
// Node.js SDK: ready, health, setLabel, setAnnotation, getGameServer,
// watchGameServer, player tracking, a counters call (unimplemented), and
// shutdown, each seen on the dedi process.
func TestAgonesNodeSDK(t *testing.T) {
	t.Parallel()
	node, dir := agonesNode(t)
	l := startHostLSPM(t, "127.0.0.244", 43000, node)
	control := filepath.Join(t.TempDir(), "control.json")
	writeControl(t, control, fakegame.Control{})
	p := l.spawn(t, api.SpawnRequest{Command: []string{node, filepath.Join(dir, "sdk-client.mjs")}, SDK: api.SDKAgones,
		Env: map[string]string{fakegame.EnvControl: control}, Health: &api.Health{PeriodSeconds: 1, FailureThreshold: 5}})
	out := l.waitLog(t, p.ID, `"what":"done"`, 30*time.Second)

	results := map[string][]json.RawMessage{}
	for _, line := range strings.Split(out, "\n") {
		var r struct {
			What  string          `json:"what"`
			Value json.RawMessage `json:"value"`
		}
		if rest, ok := strings.CutPrefix(line, "node: "); ok && json.Unmarshal([]byte(rest), &r) == nil {
			results[r.What] = append(results[r.What], r.Value)
		}
	}
	if len(results["health-error"]) > 0 || len(results["watch-error"]) > 0 {
		t.Fatalf("SDK errors:\n%s", out)
	}
	var gs struct {
		Name        string            `json:"name"`
		State       string            `json:"state"`
		Labels      map[string]string `json:"labels"`
		Annotations map[string]string `json:"annotations"`
		Ports       []struct {
			Name string `json:"name"`
			Port int    `json:"port"`
		} `json:"ports"`
		Players struct {
			Count   int      `json:"count"`
			IdsList []string `json:"idsList"`
		} `json:"players"`
	}
	if len(results["gameserver"]) != 1 || json.Unmarshal(results["gameserver"][0], &gs) != nil {
		t.Fatalf("no gameserver result:\n%s", out)
	}
	v := l.get(t, p.ID)
	if gs.Name != p.ID || gs.State != "Ready" || gs.Labels["agones.dev/sdk-mode"] != "ranked" ||
		gs.Annotations["agones.dev/sdk-note"] != "hello from node" || len(gs.Ports) != 1 ||
		gs.Ports[0].Name != "game" || gs.Ports[0].Port != v.Ports["game"] || gs.Players.Count != 1 || gs.Players.IdsList[0] != "p1" {
		t.Fatalf("getGameServer: %+v (process %+v)", gs, v)
	}
	// The watch stream runs beside the calls: its update may print after
	// "done" on a loaded machine, so wait for it rather than expect it in
	// the output read so far.
	l.waitLog(t, p.ID, `"agones.dev/sdk-mode":"ranked"`, 10*time.Second)
	if b := string(firstOf(results["beta"])); !strings.Contains(b, `"code":12`) || !strings.Contains(b, "agones.dev.sdk.beta.SDK/GetCounter") {
		t.Fatalf("counters call: %s", b)
	}
	if v.State != api.StateReady || v.Labels["agones.dev/sdk-mode"] != "ranked" || v.Annotations["agones.dev/sdk-note"] != "hello from node" ||
		v.Players != 1 || v.SDK != api.SDKAgones {
		t.Fatalf("process: %+v", v)
	}
	// Health pings are heartbeats: after ready, only they move
	// lastHeartbeatAt. Poll rather than sleep a fixed time: the game pings
	// every 100 ms, but a loaded machine may delay it by far more.
	beat := *l.get(t, p.ID).LastHeartbeatAt
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		v := l.get(t, p.ID)
		if v.LastHeartbeatAt != nil && v.LastHeartbeatAt.After(beat) {
			break
		}
		if api.IsTerminal(v.State) || time.Now().After(deadline) {
			t.Fatalf("health pings do not count as heartbeats: %v then %v (state %s)", beat, v.LastHeartbeatAt, v.State)
		}
	}

	writeControl(t, control, fakegame.Control{Shutdown: true})
	end := l.waitState(t, p.ID, 20*time.Second, api.StateExited, api.StateCrashed, api.StateKilled, api.StateUnhealthy)
	if end.State != api.StateExited || end.Exit.Code == nil || *end.Exit.Code != 0 {
		t.Fatalf("after shutdown: %s %+v", end.State, end.Exit)
	}
	l.waitLog(t, p.ID, `"what":"shutdown"`, 5*time.Second)
}

func firstOf(rs []json.RawMessage) json.RawMessage {
	if len(rs) == 0 {
		return nil
	}
	return rs[0]
}

var docsLine = regexp.MustCompile(`^docs: (\S+) (\S+) (\d+) (.*)$`)

// TestAgonesRESTDocs runs a game server that makes exactly the calls of
// Agones' REST documentation (curl-like, from the game's process) and
// checks each answer and its effect on the dedi process; then it checks
// that the ports refuse clients from outside the game's process tree:
// the test itself (REST and gRPC) and another game on the machine.
func TestAgonesRESTDocs(t *testing.T) {
	t.Parallel()
	l := startHostLSPM(t, "127.0.0.245", 43100, "")
	control := filepath.Join(t.TempDir(), "control.json")
	writeControl(t, control, fakegame.Control{})
	req := fake("-driver", "agones-rest-docs")
	req.SDK = api.SDKAgones
	req.Env[fakegame.EnvControl] = control
	p := l.spawn(t, req)
	out := l.waitLog(t, p.ID, "docs: done", 20*time.Second)

	type answer struct {
		code int
		body string
	}
	got := map[string][]answer{}
	var httpPort, grpcPort int
	for _, line := range strings.Split(out, "\n") {
		if n, _ := fmt.Sscanf(line, "docs: ports http=%d grpc=%d", &httpPort, &grpcPort); n == 2 {
			continue
		}
		if m := docsLine.FindStringSubmatch(line); m != nil {
			code, _ := strconv.Atoi(m[3])
			got[m[1]+" "+m[2]] = append(got[m[1]+" "+m[2]], answer{code, m[4]})
		}
	}
	want := func(call string, i int, body string) {
		t.Helper()
		if len(got[call]) <= i || got[call][i].code != 200 || (body != "" && !sameJSON(got[call][i].body, body)) {
			t.Errorf("%s #%d: got %+v, want 200 %s", call, i, got[call], body)
		}
	}
	want("POST /ready", 0, "{}")
	want("POST /health", 0, "{}")
	want("PUT /metadata/label", 0, "{}")
	want("PUT /metadata/annotation", 0, "{}")
	want("POST /alpha/player/connect", 0, `{"bool": true}`)
	want("PUT /alpha/player/capacity", 0, "{}")
	want("GET /alpha/player/capacity", 0, `{"count": "5"}`)
	want("GET /alpha/player/count", 0, `{"count": "1"}`)
	want("GET /alpha/player/connected/uzh7i", 0, `{"bool": true}`)
	want("GET /alpha/player/connected", 0, `{"list": ["uzh7i"]}`)
	want("POST /alpha/player/disconnect", 0, `{"bool": true}`)
	want("POST /reserve", 0, "{}")
	want("POST /allocate", 0, "{}")
	// GET /gameserver: the documented shape, with proto field names.
	if len(got["GET /gameserver"]) != 2 {
		t.Fatalf("GET /gameserver answers: %+v\n%s", got["GET /gameserver"], out)
	}
	var gs struct {
		ObjectMeta struct {
			Name              string            `json:"name"`
			Namespace         string            `json:"namespace"`
			CreationTimestamp string            `json:"creation_timestamp"`
			Labels            map[string]string `json:"labels"`
			Annotations       map[string]string `json:"annotations"`
		} `json:"object_meta"`
		Status struct {
			State   string `json:"state"`
			Address string `json:"address"`
			Ports   []struct {
				Name string `json:"name"`
				Port int    `json:"port"`
			} `json:"ports"`
		} `json:"status"`
	}
	if err := json.Unmarshal([]byte(got["GET /gameserver"][0].body), &gs); err != nil {
		t.Fatal(err)
	}
	v := l.get(t, p.ID)
	if gs.ObjectMeta.Name != p.ID || gs.ObjectMeta.Namespace == "" || gs.ObjectMeta.CreationTimestamp == "" ||
		gs.ObjectMeta.Labels["agones.dev/sdk-foo"] != "bar" || gs.ObjectMeta.Annotations["agones.dev/sdk-foo"] != "bar" ||
		gs.Status.State != "Ready" || gs.Status.Address != v.Address || len(gs.Status.Ports) != 1 || gs.Status.Ports[0].Port != v.Ports["game"] {
		t.Fatalf("GET /gameserver: %s", got["GET /gameserver"][0].body)
	}
	if err := json.Unmarshal([]byte(got["GET /gameserver"][1].body), &gs); err != nil || gs.Status.State != "Reserved" {
		t.Fatalf("GET /gameserver after reserve: %s", got["GET /gameserver"][1].body)
	}
	w := got["GET /watch/gameserver"]
	if len(w) != 1 || w[0].code != 200 || !strings.HasPrefix(w[0].body, `{"result":`) || !strings.Contains(w[0].body, `"Allocated"`) {
		t.Fatalf("GET /watch/gameserver: %+v", w)
	}
	if v.State != api.StateAllocated || v.Labels["agones.dev/sdk-foo"] != "bar" || v.Annotations["agones.dev/sdk-foo"] != "bar" || v.Players != 1 {
		t.Fatalf("process after the documented calls: %+v", v)
	}

	// Outside the game's process tree: refused, and nothing changes.
	if httpPort == 0 || grpcPort == 0 {
		t.Fatalf("no ports printed:\n%s", out)
	}
	code, raw := call(t, "PUT", fmt.Sprintf("http://127.0.0.1:%d/metadata/label", httpPort), "", `{"key": "foo", "value": "evil"}`, nil)
	var gerr struct {
		Code    int    `json:"code"`
		Message string `json:"message"`
	}
	if code != http.StatusForbidden || json.Unmarshal(raw, &gerr) != nil || codes.Code(gerr.Code) != codes.PermissionDenied {
		t.Fatalf("REST from outside: %d %s", code, raw)
	}
	conn, err := grpc.NewClient(fmt.Sprintf("127.0.0.1:%d", grpcPort), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err = agonespb.NewSDKClient(conn).Shutdown(ctx, &agonespb.Empty{})
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("gRPC from outside: %v", err)
	}
	// Another game on the machine, calling this one's port.
	other := fake("-driver", "agones-rest-docs")
	other.SDK = api.SDKAgones
	other.Env[fakegame.EnvControl] = filepath.Join(t.TempDir(), "control.json")
	other.Env["AGONES_OTHER_HTTP_PORT"] = strconv.Itoa(httpPort)
	o := l.spawn(t, other)
	oout := l.waitLog(t, o.ID, "docs: done", 20*time.Second)
	if !strings.Contains(oout, "docs: other POST /ready 403 ") {
		t.Fatalf("another game used this one's port:\n%s", oout)
	}
	if v := l.get(t, p.ID); v.State != api.StateAllocated || v.Labels["agones.dev/sdk-foo"] != "bar" {
		t.Fatalf("refused calls changed the process: %+v", v)
	}

	writeControl(t, control, fakegame.Control{Shutdown: true})
	end := l.waitState(t, p.ID, 20*time.Second, api.StateExited, api.StateCrashed, api.StateKilled, api.StateUnhealthy)
	if end.State != api.StateExited {
		t.Fatalf("after shutdown: %s %+v", end.State, end.Exit)
	}
	if o := l.logsOf(t, p.ID); !strings.Contains(o, "docs: POST /shutdown 200") {
		t.Fatalf("shutdown answer:\n%s", o)
	}
	// The ports are closed with the process.
	if _, err := http.Post(fmt.Sprintf("http://127.0.0.1:%d/ready", httpPort), "application/json", strings.NewReader("{}")); err == nil {
		t.Fatal("the Agones REST port still answers after the process ended")
	}
}

func sameJSON(a, b string) bool {
	var va, vb any
	if json.Unmarshal([]byte(a), &va) != nil || json.Unmarshal([]byte(b), &vb) != nil {
		return false
	}
	ja, _ := json.Marshal(va)
	jb, _ := json.Marshal(vb)
	return string(ja) == string(jb)
}

// TestAgonesSurvivesRestart: games on the official Agones SDKs with nothing
// added for dedi outlive a kill -9 and restart of the LSPM instead of being
// judged unhealthy by the silence of a health stream that broke with it,
// and their unary calls (shutdown) reach the new LSPM. The Go SDK never
// reopens its stream; the Node.js SDK's grpc-js replays it. The LSPMs are
// on 127.0.0.246 and .247, ports 43200-43399.
func TestAgonesSurvivesRestart(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name, host string
		lo         int
		node       bool
	}{{"go-sdk", "127.0.0.246", 43200, false}, {"node-sdk", "127.0.0.247", 43300, true}} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			control := filepath.Join(t.TempDir(), "control.json")
			writeControl(t, control, fakegame.Control{})
			var l *lspm
			var req api.SpawnRequest
			if c.node {
				node, dir := agonesNode(t)
				l = startHostLSPM(t, c.host, c.lo, node)
				req = api.SpawnRequest{Command: []string{node, filepath.Join(dir, "plain-health.mjs")}, Env: map[string]string{}}
			} else {
				l = startHostLSPM(t, c.host, c.lo, "")
				req = fake("-driver", "agones-grpc-go-plain")
			}
			req.SDK = api.SDKAgones
			req.Env[fakegame.EnvControl] = control
			// Silence beyond 2 × 1 s is unhealthy.
			req.Health = &api.Health{PeriodSeconds: 1, FailureThreshold: 2, StartTimeoutSeconds: 30}
			p := l.spawn(t, req)
			l.waitState(t, p.ID, 30*time.Second, api.StateReady)
			l.waitLog(t, p.ID, "plain: ready", 10*time.Second)

			l.kill9()
			l.start()
			// Watch it for twice the failure window: it must stay ready.
			for until := time.Now().Add(4 * time.Second); time.Now().Before(until); time.Sleep(100 * time.Millisecond) {
				if v := l.get(t, p.ID); v.State != api.StateReady || v.PID != p.PID {
					t.Fatalf("after the LSPM restart: state %s pid %d (want ready, pid %d); output:\n%s", v.State, v.PID, p.PID, l.logsOf(t, p.ID))
				}
			}
			writeControl(t, control, fakegame.Control{Shutdown: true})
			end := l.waitState(t, p.ID, 20*time.Second, api.StateExited, api.StateCrashed, api.StateKilled, api.StateUnhealthy)
			if end.State != api.StateExited || end.Exit == nil || end.Exit.Code == nil || *end.Exit.Code != 0 {
				t.Fatalf("after shutdown: %s %+v; output:\n%s", end.State, end.Exit, l.logsOf(t, p.ID))
			}
			l.waitLog(t, p.ID, "plain: shutdown", 5*time.Second)
		})
	}
}
