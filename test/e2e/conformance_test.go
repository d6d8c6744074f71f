package e2e

// The SDK conformance sequence (issue 5): one script that every way a game
// server talks to dedi must pass against a real LSPM: the Go SDK, the Node
// SDK, Agones' REST SDK and Agones' gRPC SDK (the official Node.js client).
//
// Each SDK supplies a driver, a game server the LSPM spawns and the test
// steers through a control file, CONFORMANCE_CONTROL=/path/control.json in
// its environment, holding {"players": N, "shutdown": bool}:
//   - at start it calls the SDK's ready;
//   - every 100 ms it reads the control file (a missing or unparsable one
//     keeps the previous values) and sends a heartbeat (Agones: a health
//     ping) carrying N players (Agones: alpha player tracking holds N ids);
//   - a failed call (the LSPM is being restarted) is logged to stderr and
//     retried on the next tick: the driver never exits because the LSPM
//     went away;
//   - when shutdown is true it calls the SDK's shutdown and exits 0;
//   - it prints "conformance: ready" and "conformance: shutdown".
//
// Drivers: Go SDK and Agones REST: test/fakegame (-driver conformance,
// -driver agones-rest-conformance); Node SDK:
// sdk/node/test/conformance-driver.mjs; Agones gRPC:
// test/agones-node/conformance-driver.mjs.
//
// The sequence: ready; players 3; kill -9 of the LSPM, players 5 while it
// is down, restart; players 5 must show and heartbeats resume with the same
// game process still ready; players 2; shutdown, and the process ends
// exited with code 0.
//
// Each driver gets an LSPM of its own on 127.0.0.240-243 with ports
// 41000-41399 (a block of 100 each); no other test uses them.

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"dedi.dev/dedi/api"
	"dedi.dev/dedi/test/fakegame"
)

func TestSDKConformance(t *testing.T) {
	t.Parallel()
	drivers := []struct {
		name string
		host string
		lo   int
		node bool
		req  func(t *testing.T) api.SpawnRequest
	}{
		{"go-sdk", "127.0.0.240", 41000, false, func(t *testing.T) api.SpawnRequest {
			return fake("-driver", "conformance")
		}},
		{"node-sdk", "127.0.0.241", 41100, true, func(t *testing.T) api.SpawnRequest {
			driver := filepath.Join(repoRoot(t), "sdk", "node", "test", "conformance-driver.mjs")
			if _, err := os.Stat(driver); err != nil {
				t.Skipf("the Node SDK's conformance driver %s is not there yet: %v", driver, err)
			}
			node, _ := agonesNode(t)
			return api.SpawnRequest{Command: []string{node, driver}, Env: map[string]string{}}
		}},
		{"agones-rest", "127.0.0.242", 41200, false, func(t *testing.T) api.SpawnRequest {
			req := fake("-driver", "agones-rest-conformance")
			req.SDK = api.SDKAgones
			return req
		}},
		{"agones-grpc-node", "127.0.0.243", 41300, true, func(t *testing.T) api.SpawnRequest {
			node, dir := agonesNode(t)
			return api.SpawnRequest{Command: []string{node, filepath.Join(dir, "conformance-driver.mjs")},
				SDK: api.SDKAgones, Env: map[string]string{}}
		}},
	}
	for _, d := range drivers {
		t.Run(d.name, func(t *testing.T) {
			t.Parallel()
			req := d.req(t)
			node := ""
			if d.node {
				node, _ = agonesNode(t)
			}
			l := startHostLSPM(t, d.host, d.lo, node)
			conformance(t, l, req)
		})
	}
}

// conformance runs the sequence against the driver that req spawns.
func conformance(t *testing.T, l *lspm, req api.SpawnRequest) {
	control := filepath.Join(t.TempDir(), "control.json")
	writeControl(t, control, fakegame.Control{})
	req.Env[fakegame.EnvControl] = control
	// Heartbeats come every 100 ms; 5 missed seconds would be unhealthy,
	// well above what an LSPM restart takes.
	req.Health = &api.Health{PeriodSeconds: 1, FailureThreshold: 5, StartTimeoutSeconds: 30}
	p := l.spawn(t, req)
	l.waitState(t, p.ID, 30*time.Second, api.StateReady)
	l.waitLog(t, p.ID, "conformance: ready", 10*time.Second)

	waitPlayers := func(n int, since time.Time) api.Process {
		t.Helper()
		deadline := time.Now().Add(15 * time.Second)
		for {
			v := l.get(t, p.ID)
			if v.Players == n && v.LastHeartbeatAt != nil && v.LastHeartbeatAt.After(since) {
				return v
			}
			if api.IsTerminal(v.State) || time.Now().After(deadline) {
				t.Fatalf("players %d (state %s, last heartbeat %v), want %d with a heartbeat after %v; output:\n%s",
					v.Players, v.State, v.LastHeartbeatAt, n, since, l.logsOf(t, p.ID))
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	writeControl(t, control, fakegame.Control{Players: 3})
	waitPlayers(3, time.Time{})

	// kill -9 of the LSPM; the players change while it is down.
	l.kill9()
	writeControl(t, control, fakegame.Control{Players: 5})
	time.Sleep(300 * time.Millisecond)
	restarted := time.Now()
	l.start()
	v := waitPlayers(5, restarted)
	if v.State != api.StateReady || v.PID != p.PID {
		t.Fatalf("after the restart: state %s pid %d, want ready pid %d", v.State, v.PID, p.PID)
	}

	writeControl(t, control, fakegame.Control{Players: 2})
	waitPlayers(2, restarted)

	writeControl(t, control, fakegame.Control{Players: 2, Shutdown: true})
	end := l.waitState(t, p.ID, 20*time.Second, api.StateExited, api.StateCrashed, api.StateKilled, api.StateUnhealthy)
	if end.State != api.StateExited || end.Exit == nil || end.Exit.Code == nil || *end.Exit.Code != 0 {
		t.Fatalf("after shutdown: %s %+v", end.State, end.Exit)
	}
	l.waitLog(t, p.ID, "conformance: shutdown", 5*time.Second)
}
