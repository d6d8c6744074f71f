package lspm

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"dedi.dev/dedi/api"
	"dedi.dev/dedi/internal/agonespb"
	"dedi.dev/dedi/internal/agonespb/alpha"
	"dedi.dev/dedi/internal/clock"
	"dedi.dev/dedi/internal/procstat"
)

// Unit tests of the Agones SDK run a real Agent (loop, REST and gRPC
// servers) on a fake clock, with a `sleep` child as the game. The test
// process itself plays the game's client: the servers are told that its
// session owns them. Ports 47500-47599 are this file's.

type agonesEnv struct {
	a    *Agent
	clk  *clock.Fake
	id   string
	game launched
	http string // base URL of the REST gateway
	grpc string // host:port of the gRPC service
	stop func() // stops the LSPM and waits for Run to return
}

// selfOwner names the test process as the game whose tree may connect.
func selfOwner(t *testing.T) peerOwner {
	t.Helper()
	start, err := procstat.StartTime(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	_, sid, ok := groupOf(os.Getpid())
	if !ok {
		t.Fatal("read own session")
	}
	return peerOwner{pid: os.Getpid(), start: start, session: sid}
}

func startAgones(t *testing.T, owner func(game launched) peerOwner) *agonesEnv {
	t.Helper()
	return startAgonesWrapped(t, owner, nil)
}

// startAgonesWrapped is startAgones with wrap around the REST handler.
func startAgonesWrapped(t *testing.T, owner func(game launched) peerOwner, wrap func(http.Handler) http.Handler) *agonesEnv {
	t.Helper()
	clk := clock.NewFake(time.Now().UTC())
	cfg := Config{Listen: "127.0.0.1:0", DataDir: t.TempDir(), MachineID: "m", Insecure: true,
		PortMin: 47500, PortMax: 47599, ShimPath: "/bin/false", Grace: 5 * time.Second}
	a, err := New(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)), clk)
	if err != nil {
		t.Fatal(err)
	}
	a.wrapAgonesREST = wrap
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan struct{})
	go func() { defer close(ran); _ = a.Run(ctx) }()
	stop := func() { cancel(); <-ran }
	t.Cleanup(stop)

	e := &agonesEnv{a: a, clk: clk, id: "p-agones", game: sleeper(t), stop: stop}
	var plan spawnPlan
	var rerr error
	if err := a.do(func(tb *table) {
		plan, rerr = tb.reserve(e.id, api.SpawnRequest{SDK: api.SDKAgones, Fleet: "demo"}, []string{"sleep"}, "hash", []string{"game"})
	}); err != nil || rerr != nil {
		t.Fatal(err, rerr)
	}
	if err := os.Mkdir(plan.dir, 0o700); err != nil {
		t.Fatal(err)
	}
	ls, err := listenAgones(plan.agones)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.do(func(tb *table) {
		tb.commit(e.id, e.game)
		a.serveAgones(tb.live[e.id], ls, owner(e.game))
	}); err != nil {
		t.Fatal(err)
	}
	e.http = "http://127.0.0.1:" + strconv.Itoa(plan.agones.HTTPPort)
	e.grpc = "127.0.0.1:" + strconv.Itoa(plan.agones.GRPCPort)
	return e
}

func (e *agonesEnv) view(t *testing.T) api.Process {
	t.Helper()
	p, err := e.a.find(e.id)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// rest makes a call as Agones' REST docs show it (curl -d ... -H
// "Content-Type: application/json" -X METHOD URL) and returns the status
// and the body.
func (e *agonesEnv) rest(t *testing.T, method, path, body string) (int, string) {
	t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, e.http+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(bytes.TrimSpace(b))
}

func (e *agonesEnv) restOK(t *testing.T, method, path, body, want string) {
	t.Helper()
	code, got := e.rest(t, method, path, body)
	// protojson varies its spacing on purpose: compare the JSON values.
	if code != http.StatusOK || (want != "" && !sameJSON(got, want)) {
		t.Fatalf("%s %s %s: %d %s, want 200 %s", method, path, body, code, got, want)
	}
}

func sameJSON(a, b string) bool {
	var va, vb any
	return json.Unmarshal([]byte(a), &va) == nil && json.Unmarshal([]byte(b), &vb) == nil && reflect.DeepEqual(va, vb)
}

// gatewayError checks an error body of the gateway's shape.
func gatewayError(t *testing.T, code int, body string, wantHTTP int, wantCode codes.Code, wantIn string) {
	t.Helper()
	var e struct {
		Code    int    `json:"code"`
		Message string `json:"message"`
		Details []any  `json:"details"`
	}
	if err := json.Unmarshal([]byte(body), &e); err != nil || e.Details == nil {
		t.Fatalf("not a gateway error: %q", body)
	}
	if code != wantHTTP || codes.Code(e.Code) != wantCode || !strings.Contains(e.Message, wantIn) {
		t.Fatalf("got %d %s, want %d code %d with %q", code, body, wantHTTP, wantCode, wantIn)
	}
}

func (e *agonesEnv) gameServer(t *testing.T) map[string]any {
	t.Helper()
	code, body := e.rest(t, "GET", "/gameserver", "")
	if code != 200 {
		t.Fatalf("GET /gameserver: %d %s", code, body)
	}
	var gs map[string]any
	if err := json.Unmarshal([]byte(body), &gs); err != nil {
		t.Fatal(err)
	}
	return gs
}

func gsState(gs map[string]any) string {
	st, _ := gs["status"].(map[string]any)
	s, _ := st["state"].(string)
	return s
}

func (e *agonesEnv) waitState(t *testing.T, want string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		gs := e.gameServer(t)
		if gsState(gs) == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("GameServer state %q, want %q", gsState(gs), want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestAgonesREST(t *testing.T) {
	e := startAgones(t, func(launched) peerOwner { return selfOwner(t) })

	gs := e.gameServer(t)
	meta := gs["object_meta"].(map[string]any)
	if meta["name"] != e.id || gsState(gs) != "Scheduled" || meta["creation_timestamp"] == "" {
		t.Fatalf("gameserver before ready: %v", gs)
	}
	if labels := meta["labels"].(map[string]any); labels["agones.dev/fleet"] != "demo" {
		t.Fatalf("labels: %v", labels)
	}
	ports := gs["status"].(map[string]any)["ports"].([]any)
	if p := ports[0].(map[string]any); p["name"] != "game" || p["port"] != float64(e.view(t).Ports["game"]) {
		t.Fatalf("ports: %v", ports)
	}

	// Pings before Ready (common in Agones games) change nothing, even on a
	// process a restarted LSPM adopted.
	_ = e.a.do(func(tb *table) { tb.live[e.id].adopted = true })
	e.restOK(t, "POST", "/health", "{}", "{}")
	if v := e.view(t); v.State != api.StateStarting {
		t.Fatalf("a ping before ready made the process %s", v.State)
	}
	e.restOK(t, "POST", "/ready", "{}", "{}")
	v := e.view(t)
	if v.State != api.StateReady {
		t.Fatalf("after ready: %s", v.State)
	}
	e.clk.Advance(time.Second)
	e.restOK(t, "POST", "/health", "{}", "{}")
	e.clk.Advance(time.Second)
	e.restOK(t, "POST", "/health", "", "{}") // a body-less ping, as some clients send
	if w := e.view(t); w.LastHeartbeatAt == nil || w.LastHeartbeatAt.Sub(*v.LastHeartbeatAt) != 2*time.Second {
		t.Fatalf("health pings are no heartbeats: %v then %v", v.LastHeartbeatAt, w.LastHeartbeatAt)
	}
	e.restOK(t, "PUT", "/metadata/label", `{"key": "foo", "value": "bar"}`, "{}")
	e.restOK(t, "PUT", "/metadata/annotation", `{"key": "foo", "value": "any text: ok"}`, "{}")
	// Unknown fields are ignored, as the gateway does.
	e.restOK(t, "PUT", "/metadata/label", `{"key": "map", "value": "arena", "extra": 1}`, "{}")
	v = e.view(t)
	if v.Labels["agones.dev/sdk-foo"] != "bar" || v.Labels["agones.dev/sdk-map"] != "arena" ||
		v.Annotations["agones.dev/sdk-foo"] != "any text: ok" {
		t.Fatalf("labels %v annotations %v", v.Labels, v.Annotations)
	}
	gs = e.gameServer(t)
	meta = gs["object_meta"].(map[string]any)
	if meta["labels"].(map[string]any)["agones.dev/sdk-foo"] != "bar" || meta["annotations"].(map[string]any)["agones.dev/sdk-foo"] != "any text: ok" {
		t.Fatalf("gameserver metadata: %v", meta)
	}

	// Player tracking (alpha), as in Agones' REST docs.
	e.restOK(t, "POST", "/alpha/player/connect", `{"playerID": "uzh7i"}`, `{"bool":true}`)
	e.restOK(t, "POST", "/alpha/player/connect", `{"playerID": "uzh7i"}`, `{"bool":false}`)
	e.restOK(t, "POST", "/alpha/player/connect", `{"playerID": "3zh7i"}`, `{"bool":true}`)
	e.restOK(t, "PUT", "/alpha/player/capacity", `{"count": 5}`, "{}")
	e.restOK(t, "GET", "/alpha/player/capacity", `{}`, `{"count":"5"}`)
	e.restOK(t, "GET", "/alpha/player/count", "", `{"count":"2"}`)
	e.restOK(t, "GET", "/alpha/player/connected/uzh7i", "", `{"bool":true}`)
	e.restOK(t, "GET", "/alpha/player/connected/nobody", "", `{"bool":false}`)
	e.restOK(t, "GET", "/alpha/player/connected", "", `{"list":["uzh7i","3zh7i"]}`)
	if v := e.view(t); v.Players != 2 {
		t.Fatalf("players %d, want 2", v.Players)
	}
	e.restOK(t, "POST", "/alpha/player/disconnect", `{"playerID": "uzh7i"}`, `{"bool":true}`)
	e.restOK(t, "POST", "/alpha/player/disconnect", `{"playerID": "uzh7i"}`, `{"bool":false}`)
	if v := e.view(t); v.Players != 1 {
		t.Fatalf("players %d, want 1", v.Players)
	}
	e.restOK(t, "PUT", "/alpha/player/capacity", `{"count": "1"}`, "{}")
	code, body := e.rest(t, "POST", "/alpha/player/connect", `{"playerID": "late"}`)
	gatewayError(t, code, body, 400, codes.FailedPrecondition, "capacity")

	// Reserve: Reserved, refused by the machine's allocate, back to Ready
	// when the time is up.
	e.restOK(t, "POST", "/reserve", `{"seconds": "5"}`, "{}")
	e.waitState(t, "Reserved")
	var aerr error
	_ = e.a.do(func(tb *table) { aerr = tb.allocate(tb.live[e.id]) })
	if aerr == nil || !strings.Contains(aerr.Error(), "reserved") {
		t.Fatalf("allocate of a reserved process: %v", aerr)
	}
	e.clk.Advance(6 * time.Second)
	e.waitState(t, "Ready")

	e.restOK(t, "POST", "/allocate", "{}", "{}")
	if v := e.view(t); v.State != api.StateAllocated {
		t.Fatalf("after allocate: %s", v.State)
	}
	e.waitState(t, "Allocated")
	e.restOK(t, "POST", "/ready", "{}", "{}") // no way back in dedi: stays allocated
	if v := e.view(t); v.State != api.StateAllocated {
		t.Fatalf("ready after allocate: %s", v.State)
	}

	// Bad input: the gateway's errors; nothing changes.
	for _, c := range []struct {
		method, path, body string
		http               int
		code               codes.Code
		in                 string
	}{
		{"PUT", "/metadata/label", `{"key": 1}`, 400, codes.InvalidArgument, "key"},
		{"PUT", "/metadata/label", `{"key": "a b", "value": "x"}`, 400, codes.InvalidArgument, "key"},
		{"PUT", "/metadata/label", `{"key": "ok", "value": "` + strings.Repeat("v", 64) + `"}`, 400, codes.InvalidArgument, "value"},
		{"PUT", "/metadata/label", `{"key": "ok"`, 400, codes.InvalidArgument, ""},
		{"POST", "/reserve", `{"seconds": "-1"}`, 400, codes.InvalidArgument, "seconds"},
		{"POST", "/reserve", `{"seconds": "x"}`, 400, codes.InvalidArgument, ""},
		{"POST", "/alpha/player/connect", `{"playerID": ""}`, 400, codes.InvalidArgument, "playerID"},
		{"PUT", "/alpha/player/capacity", `{"count": -2}`, 400, codes.InvalidArgument, "count"},
		{"GET", "/nope", "", 404, codes.NotFound, "Not Found"},
		{"DELETE", "/ready", "", 501, codes.Unimplemented, "Method Not Allowed"},
		{"POST", "/watch/gameserver", "{}", 501, codes.Unimplemented, "Method Not Allowed"},
		{"POST", "/alpha/player/connected/x", "{}", 501, codes.Unimplemented, "Method Not Allowed"},
		{"GET", "/v1beta1/counters/rooms", "", 501, codes.Unimplemented, "agones.dev.sdk.beta.SDK/GetCounter"},
		{"PATCH", "/v1beta1/counters/rooms", "{}", 501, codes.Unimplemented, "UpdateCounter"},
		{"POST", "/v1beta1/lists/players:addValue", "{}", 501, codes.Unimplemented, "AddListValue"},
		{"POST", "/v1alpha1/lists/players:removeValue", "{}", 501, codes.Unimplemented, "RemoveListValue"},
		{"GET", "/v1beta1/lists/players", "", 501, codes.Unimplemented, "GetList"},
	} {
		code, body := e.rest(t, c.method, c.path, c.body)
		gatewayError(t, code, body, c.http, c.code, c.in)
	}
	if v := e.view(t); len(v.Labels) != 2 || v.State != api.StateAllocated {
		t.Fatalf("bad input changed the process: %+v", v)
	}

	// Shutdown: announced at once, SIGTERM to the game after a second.
	e.restOK(t, "POST", "/shutdown", "{}", "{}")
	e.waitState(t, "Shutdown")
	e.clk.Advance(2 * agonesTermDelay)
	ws := waitExit(t, e.game)
	if !ws.Signaled() || ws.Signal() != syscall.SIGTERM {
		t.Fatalf("game ended with %v, want SIGTERM", ws)
	}
}

func TestAgonesWatchREST(t *testing.T) {
	e := startAgones(t, func(launched) peerOwner { return selfOwner(t) })
	resp, err := http.Get(e.http + "/watch/gameserver")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "application/json" {
		t.Fatalf("watch: %s %s", resp.Status, resp.Header.Get("Content-Type"))
	}
	lines := bufio.NewScanner(resp.Body)
	lines.Buffer(make([]byte, 1<<16), 1<<20)
	next := func() map[string]any {
		t.Helper()
		if !lines.Scan() {
			t.Fatalf("watch stream ended: %v", lines.Err())
		}
		var m struct {
			Result map[string]any `json:"result"`
		}
		if err := json.Unmarshal(lines.Bytes(), &m); err != nil || m.Result == nil {
			t.Fatalf("watch line %q: %v", lines.Text(), err)
		}
		return m.Result
	}
	if s := gsState(next()); s != "Scheduled" {
		t.Fatalf("first watch state %q", s)
	}
	e.restOK(t, "POST", "/ready", "{}", "{}")
	for gs := next(); gsState(gs) != "Ready"; gs = next() {
	}
	e.restOK(t, "PUT", "/metadata/label", `{"key": "watched", "value": "yes"}`, "{}")
	for {
		gs := next()
		if gs["object_meta"].(map[string]any)["labels"].(map[string]any)["agones.dev/sdk-watched"] == "yes" {
			break
		}
	}
}

// goroutinesIn counts the goroutines with a frame whose function name
// contains fn.
func goroutinesIn(fn string) int {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	count := 0
	for _, g := range bytes.Split(buf, []byte("\n\n")) {
		if bytes.Contains(g, []byte(fn)) {
			count++
		}
	}
	return count
}

// TestAgonesStopEndsREST: when the LSPM stops, the REST requests of the
// Agones SDK in flight are ended and waited for (as the gRPC ones are): a
// handler that takes a while to finish once its request's context ended,
// a watch, and a request whose client stalls in its body. Nothing of the
// gateway may run, touching the table or the persister, after Run returned.
func TestAgonesStopEndsREST(t *testing.T) {
	var slowDone atomic.Bool
	slowIn := make(chan struct{})
	wrap := func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			h.ServeHTTP(w, r)
			if r.URL.Path != "/gameserver" {
				return
			}
			close(slowIn)
			select {
			case <-r.Context().Done():
			case <-time.After(10 * time.Second):
			}
			time.Sleep(300 * time.Millisecond) // winding down, as a handler may
			slowDone.Store(true)
		})
	}
	e := startAgonesWrapped(t, func(launched) peerOwner { return selfOwner(t) }, wrap)
	const handler = "lspm.(*agonesServer).ServeHTTP"
	base := goroutinesIn(handler)

	slow := make(chan struct{})
	go func() {
		defer close(slow)
		if resp, err := http.Get(e.http + "/gameserver"); err == nil {
			resp.Body.Close()
		}
	}()
	defer func() { <-slow }()
	<-slowIn

	resp, err := http.Get(e.http + "/watch/gameserver")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	watch := bufio.NewReader(resp.Body)
	if _, err := watch.ReadString('\n'); err != nil {
		t.Fatalf("watch: %v", err)
	}
	// A client that sends half a body and then nothing: only closing its
	// connection ends its handler.
	stalled, err := net.Dial("tcp", strings.TrimPrefix(e.http, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer stalled.Close()
	if _, err := io.WriteString(stalled, "POST /ready HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{"); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); goroutinesIn(handler) < base+2; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d REST handlers running, want %d", goroutinesIn(handler)-base, 2)
		}
	}

	start := time.Now()
	e.stop()
	if took, bound := time.Since(start), agonesHTTPStopWait+5*time.Second; took > bound {
		t.Fatalf("the LSPM took %v to stop, want at most %v", took, bound)
	}
	if !slowDone.Load() {
		t.Fatal("the LSPM stopped before a REST handler in flight had finished")
	}
	if n := goroutinesIn(handler) - base; n != 0 {
		t.Fatalf("%d REST handlers still run after the LSPM stopped", n)
	}
	if n := goroutinesIn("internal/rest.Serve") + goroutinesIn("rest.(*Server)"); n != 0 {
		t.Fatalf("%d goroutines of the REST servers still run after the LSPM stopped", n)
	}
	_, _ = io.Copy(io.Discard, watch) // the watch has ended: this returns
}

func TestAgonesGRPC(t *testing.T) {
	e := startAgones(t, func(launched) peerOwner { return selfOwner(t) })
	conn, err := grpc.NewClient(e.grpc, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	sdk := agonespb.NewSDKClient(conn)
	al := alpha.NewSDKClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	watch, err := sdk.WatchGameServer(ctx, &agonespb.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	first, err := watch.Recv()
	if err != nil || first.GetStatus().GetState() != "Scheduled" || first.GetObjectMeta().GetName() != e.id {
		t.Fatalf("first watch: %v %v", first, err)
	}
	if _, err := sdk.Ready(ctx, &agonespb.Empty{}); err != nil {
		t.Fatal(err)
	}
	health, err := sdk.Health(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		if err := health.Send(&agonespb.Empty{}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := health.CloseAndRecv(); err != nil {
		t.Fatal(err)
	}
	if v := e.view(t); v.State != api.StateReady || v.LastHeartbeatAt == nil {
		t.Fatalf("after ready and health: %+v", v)
	}
	if _, err := sdk.SetLabel(ctx, &agonespb.KeyValue{Key: "mode", Value: "ranked"}); err != nil {
		t.Fatal(err)
	}
	if _, err := sdk.SetAnnotation(ctx, &agonespb.KeyValue{Key: "note", Value: "hello world"}); err != nil {
		t.Fatal(err)
	}
	_, err = sdk.SetLabel(ctx, &agonespb.KeyValue{Key: "bad key", Value: "x"})
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("bad label: %v", err)
	}
	for {
		gs, err := watch.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if gs.GetObjectMeta().GetLabels()["agones.dev/sdk-mode"] == "ranked" &&
			gs.GetObjectMeta().GetAnnotations()["agones.dev/sdk-note"] == "hello world" && gs.GetStatus().GetState() == "Ready" {
			break
		}
	}
	if ok, err := al.PlayerConnect(ctx, &alpha.PlayerID{PlayerID: "p1"}); err != nil || !ok.GetBool() {
		t.Fatalf("player connect: %v %v", ok, err)
	}
	if n, err := al.GetPlayerCount(ctx, &alpha.Empty{}); err != nil || n.GetCount() != 1 {
		t.Fatalf("player count: %v %v", n, err)
	}
	gs, err := sdk.GetGameServer(ctx, &agonespb.Empty{})
	if err != nil || gs.GetStatus().GetPlayers().GetCount() != 1 || gs.GetStatus().GetPlayers().GetIds()[0] != "p1" {
		t.Fatalf("get game server: %v %v", gs, err)
	}
	if _, err := sdk.Reserve(ctx, &agonespb.Duration{Seconds: 0}); err != nil {
		t.Fatal(err)
	}
	e.waitState(t, "Reserved")
	if _, err := sdk.Allocate(ctx, &agonespb.Empty{}); err != nil {
		t.Fatal(err)
	}
	if v := e.view(t); v.State != api.StateAllocated {
		t.Fatalf("after allocate: %s", v.State)
	}
	// Counters and lists: Unimplemented, naming the call.
	err = conn.Invoke(ctx, "/agones.dev.sdk.beta.SDK/GetCounter", &agonespb.Empty{}, &agonespb.Empty{})
	if status.Code(err) != codes.Unimplemented || !strings.Contains(status.Convert(err).Message(), "agones.dev.sdk.beta.SDK/GetCounter") {
		t.Fatalf("beta call: %v", err)
	}
	if _, err := sdk.Shutdown(ctx, &agonespb.Empty{}); err != nil {
		t.Fatal(err)
	}
	for {
		gs, err := watch.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if gs.GetStatus().GetState() == "Shutdown" {
			break
		}
	}
}

// TestAgonesPeerRefused: a client outside the game's process tree (here
// the test process, while the game is a `sleep` that holds no socket) is
// refused on both ports.
func TestAgonesPeerRefused(t *testing.T) {
	e := startAgones(t, func(g launched) peerOwner { return peerOwner{pid: g.pid, start: g.start, session: g.pid} })
	code, body := e.rest(t, "POST", "/ready", "{}")
	gatewayError(t, code, body, 403, codes.PermissionDenied, "process tree")
	conn, err := grpc.NewClient(e.grpc, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err = agonespb.NewSDKClient(conn).Ready(ctx, &agonespb.Empty{})
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("grpc ready from outside: %v", err)
	}
	_, err = alpha.NewSDKClient(conn).PlayerConnect(ctx, &alpha.PlayerID{PlayerID: "x"})
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("grpc alpha from outside: %v", err)
	}
	if v := e.view(t); v.State != api.StateStarting || v.Players != 0 {
		t.Fatalf("a refused call changed the process: %+v", v)
	}
}

// TestAgonesRecordReload: the ports and what the game set survive a
// restart (the record), and the ports are freed when the process ends.
func TestAgonesRecordReload(t *testing.T) {
	tb, _ := newTestTable(t)
	plan, err := tb.reserve("g", api.SpawnRequest{SDK: api.SDKAgones}, []string{"sleep"}, "h", []string{"game"})
	if err != nil {
		t.Fatal(err)
	}
	if plan.agones == nil || plan.agones.HTTPPort == plan.agones.GRPCPort || tb.ports[plan.agones.HTTPPort] != "g" {
		t.Fatalf("agones ports: %+v", plan.agones)
	}
	if err := os.Mkdir(plan.dir, 0o700); err != nil {
		t.Fatal(err)
	}
	l := sleeper(t)
	tb.commit("g", l)
	p := tb.live["g"]
	p.agones.Players = []string{"a", "b"}
	p.agones.Capacity, p.agones.CapacitySet = 4, true
	p.view.Players = 2
	p.view.Annotations = map[string]string{"agones.dev/sdk-x": "y"}
	tb.persist(p)
	tb.a.persist.flush()

	tb2 := &table{a: tb.a, live: map[string]*proc{}, endedByID: map[string]*proc{}, byToken: map[string]string{}, ports: map[int]string{}}
	adopted, err := tb2.load()
	if err != nil || len(adopted) != 1 {
		t.Fatalf("load: %v %d", err, len(adopted))
	}
	q := adopted[0]
	if q.agones == nil || q.agones.HTTPPort != plan.agones.HTTPPort || q.agones.GRPCPort != plan.agones.GRPCPort ||
		len(q.agones.Players) != 2 || q.agones.Capacity != 4 || q.view.Annotations["agones.dev/sdk-x"] != "y" {
		t.Fatalf("reloaded: %+v %+v", q.agones, q.view)
	}
	if tb2.ports[plan.agones.HTTPPort] != "g" || tb2.ports[plan.agones.GRPCPort] != "g" {
		t.Fatal("reloaded agones ports are not held")
	}
	code := 0
	tb2.end("g", &exitRecord{Code: &code, At: time.Now()}, nil, "")
	if _, held := tb2.ports[plan.agones.HTTPPort]; held {
		t.Fatal("agones port still held after the end")
	}
}

// TestAgonesShutdownSIGTERMIsClean: after an Agones Shutdown, a game that
// dies of the SIGTERM dedi sends is recorded exited.
func TestAgonesShutdownSIGTERMIsClean(t *testing.T) {
	tb, _ := newTestTable(t)
	if _, err := tb.reserve("g", api.SpawnRequest{SDK: api.SDKAgones}, []string{"sleep"}, "h", nil); err != nil {
		t.Fatal(err)
	}
	tb.commit("g", sleeper(t))
	p := tb.live["g"]
	p.agones.Shutdown = true
	tb.end("g", &exitRecord{Signal: "SIGTERM", At: time.Now()}, nil, "")
	if p.view.State != api.StateExited || p.view.Exit.Reason != api.ReasonExited {
		t.Fatalf("state %s reason %s", p.view.State, p.view.Exit.Reason)
	}
}

func TestFindSocket(t *testing.T) {
	table := []byte(`  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:9077 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1802766 1 00000000247db9b9 100 0 0 10 0
   1: 0100007F:9077 0100007F:DA9E 01 00000000:00000000 00:00000000 00000000     0        0 1802768 1 00000000e3af38a3 20 0 0 10 -1
   2: 0100007F:DA9E 0100007F:9077 01 00000000:00000000 00:00000000 00000000     0        0 1802767 2 00000000f32315a8 20 0 0 10 -1
`)
	client := netip.MustParseAddrPort("127.0.0.1:55966")
	server := netip.MustParseAddrPort("127.0.0.1:36983")
	if inode, ok := findSocket(table, client, server); !ok || inode != 1802767 {
		t.Fatalf("client socket: %d %v", inode, ok)
	}
	if inode, ok := findSocket(table, server, client); !ok || inode != 1802768 {
		t.Fatalf("server side: %d %v", inode, ok)
	}
	if _, ok := findSocket(table, client, netip.MustParseAddrPort("127.0.0.2:36983")); ok {
		t.Fatal("matched another address")
	}
	tcp6 := []byte(`  sl  local_address                         remote_address                        st
   0: 00000000000000000000000001000000:A3B5 00000000000000000000000001000000:0BB8 01 00000000:00000000 00:00000000 00000000     0        0 4242 1
   1: 0000000000000000FFFF00000100007F:A3B6 0000000000000000FFFF00000100007F:0BB8 01 00000000:00000000 00:00000000 00000000     0        0 4343 1
`)
	if inode, ok := findSocket(tcp6, netip.MustParseAddrPort("[::1]:41909"), netip.MustParseAddrPort("[::1]:3000")); !ok || inode != 4242 {
		t.Fatalf("tcp6: %d %v", inode, ok)
	}
	if inode, ok := findSocket(tcp6, netip.MustParseAddrPort("127.0.0.1:41910"), netip.MustParseAddrPort("127.0.0.1:3000")); !ok || inode != 4343 {
		t.Fatalf("tcp6 v4-mapped: %d %v", inode, ok)
	}
}

// TestCheckPeerLive: on a real connection, the check finds the client's
// socket among the fds of this process and of nobody in another session.
func TestCheckPeerLive(t *testing.T) {
	for _, c := range []struct{ network, addr string }{{"tcp4", "127.0.0.1:0"}, {"tcp6", "[::1]:0"}} {
		t.Run(c.network, func(t *testing.T) { checkPeerLive(t, c.network, c.addr) })
	}
}

func checkPeerLive(t *testing.T, network, addr string) {
	ln, err := net.Listen(network, addr)
	if err != nil {
		if network == "tcp6" {
			t.Skipf("no IPv6 loopback: %v", err)
		}
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			accepted <- c
		}
		close(accepted)
	}()
	c, err := net.Dial(network, ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	sc := <-accepted
	if sc == nil {
		t.Fatal("accept failed")
	}
	defer sc.Close()
	if err := selfOwner(t).checkPeer(sc); err != nil {
		t.Fatalf("own connection refused: %v", err)
	}
	g := sleeper(t)
	if err := (peerOwner{pid: g.pid, start: g.start, session: g.pid}).checkPeer(sc); err == nil {
		t.Fatal("a connection held by another process tree was accepted")
	}
}

// FuzzAgonesREST: routing and decoding any request never panics; it
// answers a gRPC status of the kinds the gateway gives, and what it
// accepts passes the checks the operations make.
func FuzzAgonesREST(f *testing.F) {
	methods := []string{"GET", "POST", "PUT", "PATCH", "DELETE"}
	for _, s := range []struct {
		m          uint8
		path, body string
	}{
		{1, "/ready", "{}"}, {1, "/health", ""}, {1, "/reserve", `{"seconds": "5"}`}, {1, "/reserve", `{"seconds": 5}`},
		{2, "/metadata/label", `{"key": "foo", "value": "bar"}`}, {2, "/metadata/annotation", `{"key": "foo", "value": "bar"}`},
		{1, "/alpha/player/connect", `{"playerID": "uzh7i"}`}, {2, "/alpha/player/capacity", `{"count": "5"}`},
		{0, "/alpha/player/connected/uzh7i", ""}, {0, "/gameserver", ""}, {3, "/v1beta1/counters/x", "{}"},
		{2, "/metadata/label", `{"key": "\u0000", "value": [1]}`}, {1, "/reserve", `{"seconds": "9223372036854775807"}`},
	} {
		f.Add(s.m, s.path, []byte(s.body))
	}
	f.Fuzz(func(t *testing.T, m uint8, path string, body []byte) {
		method := methods[int(m)%len(methods)]
		call, in, err := decodeAgonesRequest(method, path, body)
		if err != nil {
			st, ok := status.FromError(err)
			if !ok {
				t.Fatalf("not a status: %v", err)
			}
			switch st.Code() {
			case codes.InvalidArgument, codes.NotFound, codes.Unimplemented:
			default:
				t.Fatalf("unexpected code %v: %v", st.Code(), err)
			}
			return
		}
		if call.run == nil {
			t.Fatal("accepted a call without an operation")
		}
		switch v := in.(type) {
		case *agonespb.KeyValue:
			if validateAgonesKey(v.Key) != nil {
				t.Fatalf("accepted key %q", v.Key)
			}
		case *agonespb.Duration:
			if v.Seconds < 0 || v.Seconds > maxAgonesReserveSecs {
				t.Fatalf("accepted seconds %d", v.Seconds)
			}
		case *alpha.PlayerID:
			if validatePlayerID(v.PlayerID) != nil {
				t.Fatalf("accepted player %q", v.PlayerID)
			}
		case *alpha.Count:
			if v.Count < 0 || v.Count > maxAgonesCapacity {
				t.Fatalf("accepted count %d", v.Count)
			}
		}
		if in != nil {
			if _, err := agonesMarshal.Marshal(in); err != nil {
				t.Fatalf("accepted message does not marshal: %v", err)
			}
		}
	})
}

// BenchmarkCheckPeer: the cost of the per-connection check, when the game
// itself holds the socket (the common case) and when the whole of /proc is
// scanned for the session (a child of the game connects).
func BenchmarkCheckPeer(b *testing.B) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	c, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	sc := <-accepted
	defer sc.Close()
	start, _ := procstat.StartTime(os.Getpid())
	_, sid, _ := groupOf(os.Getpid())
	for _, bc := range []struct {
		name  string
		owner peerOwner
	}{
		{"game", peerOwner{pid: os.Getpid(), start: start, session: sid}},
		{"session-scan", peerOwner{session: sid}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				if err := bc.owner.checkPeer(sc); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// TestListenAgonesRefusesTakenIPv6: when something else holds [::1] on an
// Agones port, the SDK is not served on 127.0.0.1 alone: a game dialing
// localhost could reach the squatter and take it for dedi.
func TestListenAgonesRefusesTakenIPv6(t *testing.T) {
	squat, err := net.Listen("tcp6", "[::1]:0")
	if err != nil {
		t.Skipf("no IPv6 loopback here: %v", err)
	}
	defer squat.Close()
	port := squat.Addr().(*net.TCPAddr).Port
	free, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	other := free.Addr().(*net.TCPAddr).Port
	free.Close()
	for _, st := range []*agonesState{{HTTPPort: port, GRPCPort: other}, {HTTPPort: other, GRPCPort: port}} {
		ls, err := listenAgones(st)
		if err == nil {
			ls.close()
			t.Fatalf("listenAgones %d/%d served beside a squatter on [::1]:%d", st.HTTPPort, st.GRPCPort, port)
		}
		// Nothing is left bound: both ports can be bound again.
		for _, p := range []int{port, other} {
			if p == port {
				continue
			}
			l, err := net.Listen("tcp4", net.JoinHostPort("127.0.0.1", strconv.Itoa(p)))
			if err != nil {
				t.Fatalf("port %d left bound after the refusal: %v", p, err)
			}
			l.Close()
		}
	}
}

// TestAgonesWatchBound: a game cannot open watch streams without end (each
// costs the loop a GameServer per change): past maxAgonesWatches, REST
// answers 429 ResourceExhausted and gRPC ResourceExhausted; a closed stream
// frees its place.
func TestAgonesWatchBound(t *testing.T) {
	e := startAgones(t, func(launched) peerOwner { return selfOwner(t) })
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	defer client.CloseIdleConnections()
	open := func() (*http.Response, error) {
		resp, err := client.Get(e.http + "/watch/gameserver")
		if err != nil {
			return nil, err
		}
		if resp.StatusCode == 200 {
			// The first line is written once the stream counts.
			if _, err := bufio.NewReader(resp.Body).ReadString('\n'); err != nil {
				resp.Body.Close()
				return nil, err
			}
		}
		return resp, nil
	}
	var streams []*http.Response
	defer func() {
		for _, r := range streams {
			r.Body.Close()
		}
	}()
	for i := 0; i < maxAgonesWatches; i++ {
		resp, err := open()
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("watch %d: %v %v", i, resp, err)
		}
		streams = append(streams, resp)
	}
	resp, err := open()
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	gatewayError(t, resp.StatusCode, string(b), 429, codes.ResourceExhausted, "WatchGameServer")

	conn, err := grpc.NewClient(e.grpc, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	w, err := agonespb.NewSDKClient(conn).WatchGameServer(ctx, &agonespb.Empty{})
	if err == nil {
		_, err = w.Recv()
	}
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("grpc watch past the bound: %v", err)
	}

	// A closed stream frees its place (the server sees the close when it
	// next writes or when the connection's reader notices).
	streams[0].Body.Close()
	streams = streams[1:]
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := open()
		if err == nil && resp.StatusCode == 200 {
			streams = append(streams, resp)
			break
		}
		if resp != nil {
			resp.Body.Close()
		}
		if time.Now().After(deadline) {
			t.Fatalf("a closed watch did not free its place: %v %v", resp, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestAgonesReadyWhileStopping: a game whose start timeout ran out is being
// stopped; a Ready it sends in its grace must not make it ready, or the
// machine would hand players a server that is about to be killed.
func TestAgonesReadyWhileStopping(t *testing.T) {
	e := startAgones(t, func(launched) peerOwner { return selfOwner(t) })
	e.clk.Advance(time.Hour) // far past any start timeout
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		reason := ""
		_ = e.a.do(func(tb *table) { reason = tb.live[e.id].stopReason })
		if reason == api.ReasonUnhealthy {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the start timeout did not stop the process (stop reason %q)", reason)
		}
	}
	e.restOK(t, "POST", "/ready", "{}", "{}")
	if v := e.view(t); v.State != api.StateStarting || v.ReadyAt != nil {
		t.Fatalf("a ready during the stop made the process %s", v.State)
	}
	var aerr error
	_ = e.a.do(func(tb *table) { aerr = tb.allocate(tb.live[e.id]) })
	if aerr == nil {
		t.Fatal("a process being stopped was allocated")
	}
	if s := gsState(e.gameServer(t)); s != "Unhealthy" {
		t.Fatalf("GameServer state %q, want Unhealthy", s)
	}
}

// TestCheckPeerSession: a process the game started (here a shell of the
// game's session holding the socket, not the game itself) passes the check
// through the session; the same connection is refused for another game's
// session.
func TestCheckPeerSession(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	port := ln.Addr().(*net.TCPAddr).Port
	// The "shim": a session leader; its child "game" sleeps, and the
	// leader itself (another process of the session) holds the socket.
	cmd := exec.Command("bash", "-c", "sleep 60 & exec 3<>/dev/tcp/127.0.0.1/"+strconv.Itoa(port)+"; echo $!; wait")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL); _ = cmd.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	game, err := strconv.Atoi(strings.TrimSpace(line))
	if err != nil {
		t.Fatal(err)
	}
	gameStart, err := procstat.StartTime(game)
	if err != nil {
		t.Fatal(err)
	}
	var sc net.Conn
	select {
	case sc = <-accepted:
	case <-time.After(10 * time.Second):
		t.Fatal("the shell did not connect")
	}
	if sc == nil {
		t.Fatal("accept failed")
	}
	defer sc.Close()
	if err := (peerOwner{pid: game, start: gameStart, session: cmd.Process.Pid}).checkPeer(sc); err != nil {
		t.Fatalf("a process of the game's session was refused: %v", err)
	}
	other := sleeper(t) // another process tree, in the test's session
	if err := (peerOwner{pid: other.pid, start: other.start, session: other.pid}).checkPeer(sc); err == nil {
		t.Fatal("another game's tree was let use this connection")
	}
}

// TestAgonesAdoptedHealth: after an LSPM restart, the official SDKs' Health
// stream is gone and never reopened; an adopted Agones process is not
// judged unhealthy by its silence until it pings again, and from that ping
// it is judged as before. A dedi process is judged at once.
func TestAgonesAdoptedHealth(t *testing.T) {
	tb, clk := newTestTable(t)
	for _, id := range []string{"ag", "dd"} {
		req := api.SpawnRequest{}
		if id == "ag" {
			req.SDK = api.SDKAgones
		}
		plan, err := tb.reserve(id, req, []string{"sleep"}, "h-"+id, []string{"game"})
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Mkdir(plan.dir, 0o700); err != nil {
			t.Fatal(err)
		}
		tb.commit(id, sleeper(t))
		tb.ready(tb.live[id])
	}
	tb.a.persist.flush()

	// The restart.
	tb2 := &table{a: tb.a, live: map[string]*proc{}, endedByID: map[string]*proc{}, byToken: map[string]string{}, ports: map[int]string{}}
	tb.a.table = tb2
	if _, err := tb2.load(); err != nil {
		t.Fatal(err)
	}
	clk.Advance(time.Minute) // far past period × threshold
	tb2.checkHealth()
	if r := tb2.live["dd"].stopReason; r != api.ReasonUnhealthy {
		t.Fatalf("silent adopted dedi process: stop reason %q, want unhealthy", r)
	}
	ag := tb2.live["ag"]
	if ag.stopReason != "" {
		t.Fatalf("adopted Agones process without a ping since the restart stopped: %q", ag.stopReason)
	}
	// A ping: judged again from there.
	tb2.agonesPing(ag)
	clk.Advance(time.Minute)
	tb2.checkHealth()
	if ag.stopReason != api.ReasonUnhealthy {
		t.Fatalf("adopted Agones process silent after its ping: stop reason %q, want unhealthy", ag.stopReason)
	}
}

// TestAgonesReadoptRebinds: a restarted LSPM that finds a re-adopted
// process's Agones port taken (something bound it while no LSPM held it)
// serves it as soon as it is free again, instead of never.
func TestAgonesReadoptRebinds(t *testing.T) {
	clk := clock.NewFake(time.Now().UTC())
	cfg := Config{Listen: "127.0.0.1:0", DataDir: t.TempDir(), MachineID: "m", Insecure: true,
		PortMin: 47500, PortMax: 47599, ShimPath: "/bin/false", Grace: 5 * time.Second}
	run := func() (*Agent, func()) {
		a, err := New(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)), clk)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		ran := make(chan struct{})
		go func() { defer close(ran); _ = a.Run(ctx) }()
		stop := func() { cancel(); <-ran }
		t.Cleanup(stop)
		return a, stop
	}
	// The first LSPM starts the game; the sleeper stands in for its shim.
	a, stop := run()
	g := sleeper(t)
	g.shimPID, g.shimStart = g.pid, g.start
	var plan spawnPlan
	var rerr error
	if err := a.do(func(tb *table) {
		plan, rerr = tb.reserve("p-re", api.SpawnRequest{SDK: api.SDKAgones}, []string{"sleep"}, "hash", []string{"game"})
	}); err != nil || rerr != nil {
		t.Fatal(err, rerr)
	}
	if err := os.Mkdir(plan.dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := a.do(func(tb *table) { tb.commit("p-re", g) }); err != nil {
		t.Fatal(err)
	}
	a.persist.flush()
	stop()

	// While no LSPM runs, something binds the REST port.
	squat, err := net.Listen("tcp4", "127.0.0.1:"+strconv.Itoa(plan.agones.HTTPPort))
	if err != nil {
		t.Fatal(err)
	}
	// Run writes lspm.addr once it has adopted the processes.
	addrFile := filepath.Join(cfg.DataDir, "lspm.addr")
	if err := os.Remove(addrFile); err != nil {
		t.Fatal(err)
	}
	b, _ := run()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if _, err := os.Stat(addrFile); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the second LSPM did not start")
		}
	}
	if _, err := b.find("p-re"); err != nil {
		t.Fatalf("not re-adopted: %v", err)
	}
	url := "http://127.0.0.1:" + strconv.Itoa(plan.agones.HTTPPort) + "/gameserver"
	squat.Close()
	// Tick the retry until the port answers as the gateway (the test is
	// outside the game's tree: 403 PermissionDenied).
	deadline := time.Now().Add(10 * time.Second)
	for {
		clk.Advance(agonesRebindEvery)
		hc := &http.Client{Timeout: time.Second}
		resp, err := hc.Get(url)
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			gatewayError(t, resp.StatusCode, string(body), 403, codes.PermissionDenied, "process tree")
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the Agones port was not served again once free: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
