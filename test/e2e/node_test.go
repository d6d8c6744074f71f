package e2e

import (
	"encoding/json"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"dedi.dev/dedi/api"
)

// Node.js game servers: the Node SDK's own tests (node --test, against the
// dedi built here) and the Node echo example hosted by a real LSPM.
//
// The Node SDK's tests run LSPMs on 127.0.0.252 with game ports
// 37000-37999 (sdk/node/testing/lspm.mjs); the echo tests here take their
// ports from startLSPM's counter and advertise 127.0.0.252 as the machine
// address, which nothing else binds ports of that counter on.

// nodeAddress is the machine address the Node echo tests advertise.
const nodeAddress = "127.0.0.252"

// nodeBin returns the node executable, skipping the test when Node.js is
// not installed at all (CI installs it: scripts/ci-deps.sh).
func nodeBin(t testing.TB) string {
	t.Helper()
	p, err := exec.LookPath("node")
	if err != nil {
		t.Skip("node is not installed")
	}
	resolved, err := filepath.EvalSymlinks(p)
	if err != nil {
		t.Fatal(err)
	}
	return resolved
}

// repoRoot is the module's root: tests run in test/e2e.
func repoRoot(t testing.TB) string {
	t.Helper()
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	return root
}

// nodeEchoCommand is the spawn command of examples/node-echo: node and the
// entry file its package.json names as main.
func nodeEchoCommand(t testing.TB, node string) []string {
	t.Helper()
	dir := filepath.Join(repoRoot(t), "examples", "node-echo")
	raw, err := os.ReadFile(filepath.Join(dir, "package.json"))
	if err != nil {
		t.Fatal(err)
	}
	var pkg struct {
		Main string `json:"main"`
		Type string `json:"type"`
	}
	if err := json.Unmarshal(raw, &pkg); err != nil || pkg.Main == "" || pkg.Type != "module" {
		t.Fatalf("examples/node-echo/package.json: main %q, type %q, err %v", pkg.Main, pkg.Type, err)
	}
	return []string{node, filepath.Join(dir, pkg.Main)}
}

// TestNodeSDK runs the Node SDK's tests (sdk/node/test) with the dedi built
// for this run, so `go test ./...` runs them.
func TestNodeSDK(t *testing.T) {
	t.Parallel()
	node := nodeBin(t)
	cmd := exec.CommandContext(ctxTimeout(t, 3*time.Minute), node, "--test", "sdk/node/test/")
	cmd.Dir = repoRoot(t)
	cmd.Env = append(os.Environ(), "DEDI_BIN="+dediBin)
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("node --test sdk/node/test/: %v\n%s", err, out)
	}
	// A run that found no tests also exits 0.
	pass := regexp.MustCompile(`(?m)^# pass (\d+)$`).FindSubmatch(out)
	fail := regexp.MustCompile(`(?m)^# fail (\d+)$`).FindSubmatch(out)
	if pass == nil || string(pass[1]) == "0" || fail == nil || string(fail[1]) != "0" {
		t.Fatalf("node --test sdk/node/test/: no passing tests, or failures:\n%s", out)
	}
	t.Logf("node --test sdk/node/test/: %s passed", pass[1])
}

// TestNodeEchoServesUDP hosts examples/node-echo under a real LSPM: it
// becomes ready, echoes UDP, reports its player through the Node SDK's
// heartbeats, and stops cleanly on SIGTERM.
func TestNodeEchoServesUDP(t *testing.T) {
	t.Parallel()
	node := nodeBin(t)
	l := startLSPM(t, lspmOpts{extra: []string{"--allow", node, "--address", nodeAddress}})
	p := l.spawn(t, api.SpawnRequest{
		Command: nodeEchoCommand(t, node),
		Params:  map[string]any{"map": "arena"},
		Health:  &api.Health{PeriodSeconds: 0.2, FailureThreshold: 5},
	})
	if p.Address != nodeAddress || p.Ports["game"] == 0 {
		t.Fatalf("spawned %+v", p)
	}
	ready := l.waitState(t, p.ID, 15*time.Second, api.StateReady)
	if ready.ReadyAt == nil {
		t.Fatalf("ready without readyAt: %+v", ready)
	}
	// udpEcho connects its socket, so the reply must come from the
	// machine's address, the one the client sent to.
	if got := udpEcho(t, p.Address, p.Ports["game"], "hello from go"); got != "hello from go" {
		t.Fatalf("echo = %q", got)
	}
	deadline := time.Now().Add(5 * time.Second)
	for l.get(t, p.ID).Players != 1 {
		if time.Now().After(deadline) {
			t.Fatal("players never became 1")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if got := l.get(t, p.ID); got.LastHeartbeatAt == nil || !got.LastHeartbeatAt.After(*ready.ReadyAt) {
		t.Fatalf("no heartbeat after ready: %+v", got)
	}

	code, raw := call(t, "DELETE", l.url+"/v1/processes/"+p.ID, l.token, nil, nil)
	if code != http.StatusAccepted {
		t.Fatalf("delete: %d %s", code, raw)
	}
	end := l.waitState(t, p.ID, 15*time.Second, api.StateKilled)
	// A clean stop: it exited 0 by itself on SIGTERM, no SIGKILL.
	if end.Exit == nil || end.Exit.Code == nil || *end.Exit.Code != 0 || end.Exit.Signal != "" {
		t.Fatalf("exit %+v", end.Exit)
	}
	waitDead(t, p.PID, 5*time.Second)
	_, logs := call(t, "GET", l.url+"/v1/processes/"+p.ID+"/logs", l.token, nil, nil)
	for _, want := range []string{"node-echo: ready on udp " + nodeAddress, "node-echo: signal; shutting down", "node-echo: bye"} {
		if !strings.Contains(string(logs), want) {
			t.Fatalf("log lacks %q:\n%s", want, logs)
		}
	}
}

// TestNodeEchoRefusesBadEnvironment: without a game port the example says
// why and exits 2, which the LSPM records as a crash with that line.
func TestNodeEchoRefusesBadEnvironment(t *testing.T) {
	t.Parallel()
	node := nodeBin(t)
	l := startLSPM(t, lspmOpts{extra: []string{"--allow", node}})
	p := l.spawn(t, api.SpawnRequest{Command: nodeEchoCommand(t, node), Ports: []string{}})
	end := l.waitState(t, p.ID, 15*time.Second, api.StateCrashed)
	if end.Exit == nil || end.Exit.Code == nil || *end.Exit.Code != 2 || !strings.Contains(strings.Join(end.Exit.LogTail, "\n"), "DEDI_PORT_GAME must be a port number") {
		t.Fatalf("exit %+v", end.Exit)
	}
}

// BenchmarkNodeEchoReady: spawn -> ready of examples/node-echo under the
// LSPM, beside the Go echo in the same run and on the same LSPM, as the
// LSPM times it (readyAt - createdAt). Metrics: the median of 5 spawns of
// each (node-ms, go-ms) per op; spawns alternate and come apart.
func BenchmarkNodeEchoReady(b *testing.B) {
	node := nodeBin(b)
	l := startLSPM(b, lspmOpts{maxProcesses: 4, extra: []string{"--allow", node}})
	nodeCmd := nodeEchoCommand(b, node)
	once := func(cmd []string) float64 {
		p := l.spawn(b, api.SpawnRequest{Command: cmd})
		l.waitReadyPoll(b, p.ID)
		got := l.get(b, p.ID)
		call(b, "DELETE", l.url+"/v1/processes/"+p.ID+"?grace=2s", l.token, nil, nil)
		l.waitState(b, p.ID, 10*time.Second, api.StateKilled)
		waitDead(b, p.PID, 10*time.Second)
		time.Sleep(benchSpacing)
		return float64(got.ReadyAt.Sub(got.CreatedAt)) / float64(time.Millisecond)
	}
	var nodeMs, goMs []float64
	for i := 0; i < b.N; i++ {
		var n, g []float64
		for j := 0; j < 5; j++ {
			g = append(g, once([]string{echoBin}))
			n = append(n, once(nodeCmd))
		}
		nodeMs = append(nodeMs, median(n))
		goMs = append(goMs, median(g))
	}
	b.ReportMetric(median(nodeMs), "node-ms")
	b.ReportMetric(median(goMs), "go-ms")
}
