package e2e

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"dedi.dev/dedi/api"
)

// udpEcho sends msg to the game port and returns the reply.
func udpEcho(t testing.TB, addr string, port int, msg string) string {
	t.Helper()
	c, err := net.Dial("udp", net.JoinHostPort(addr, strconv.Itoa(port)))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 2048)
	for i := 0; i < 20; i++ {
		if _, err := c.Write([]byte(msg)); err != nil {
			t.Fatal(err)
		}
		_ = c.SetReadDeadline(time.Now().Add(250 * time.Millisecond))
		if n, err := c.Read(buf); err == nil {
			return string(buf[:n])
		}
	}
	t.Fatalf("no UDP echo from %s:%d", addr, port)
	return ""
}

func TestEchoServesUDPAndReportsPlayers(t *testing.T) {
	t.Parallel()
	l := startLSPM(t, lspmOpts{})
	p := l.spawn(t, api.SpawnRequest{Params: map[string]any{"map": "arena"}, Labels: map[string]string{"region": "eu"},
		Health: &api.Health{PeriodSeconds: 0.1}})
	// Starting, or already ready: on a loaded machine the echo can call
	// ready before the LSPM has written its 201.
	if (p.State != api.StateStarting && p.State != api.StateReady) || p.PID == 0 || p.Ports["game"] == 0 {
		t.Fatalf("spawned %+v", p)
	}
	l.waitState(t, p.ID, 10*time.Second, api.StateReady)
	if got := udpEcho(t, p.Address, p.Ports["game"], "hello"); got != "hello" {
		t.Fatalf("echo = %q", got)
	}
	// The player count reaches the LSPM through the SDK's heartbeats.
	deadline := time.Now().Add(5 * time.Second)
	for l.get(t, p.ID).Players != 1 {
		if time.Now().After(deadline) {
			t.Fatal("players never became 1")
		}
		time.Sleep(20 * time.Millisecond)
	}
	got := l.get(t, p.ID)
	if got.Params["map"] != "arena" || got.Labels["region"] != "eu" || got.LastHeartbeatAt == nil {
		t.Fatalf("process %+v", got)
	}
	st := l.status(t)
	if st.State != api.LoadPartial || len(st.Processes) != 1 || st.Hardware.CPUs == 0 || st.Hardware.Kernel == "" || st.Hardware.MemoryBytes == 0 {
		t.Fatalf("status %+v", st)
	}
	// The environment the game sees carries no machine token.
	env, _ := os.ReadFile(fmt.Sprintf("/proc/%d/environ", p.PID))
	if strings.Contains(string(env), machineToken) || !strings.Contains(string(env), "DEDI_PARAMS={\"map\":\"arena\"}") {
		t.Fatalf("environment %q", env)
	}
	code, _ := call(t, "DELETE", l.url+"/v1/processes/"+p.ID, l.token, nil, nil)
	if code != http.StatusAccepted {
		t.Fatalf("delete: %d", code)
	}
	end := l.waitState(t, p.ID, 10*time.Second, api.StateKilled)
	if end.Exit == nil || end.Exit.Reason != api.ReasonKilled || end.Exit.Code == nil || *end.Exit.Code != 0 {
		t.Fatalf("exit %+v", end.Exit)
	}
	waitDead(t, p.PID, 5*time.Second)
}

func TestCrashIsRecordedWithEvidence(t *testing.T) {
	t.Parallel()
	l := startLSPM(t, lspmOpts{})
	cases := []struct {
		name   string
		flags  []string
		code   int
		signal string
	}{
		{"exit code", []string{"-crash-after", "50ms", "-exit-code", "3"}, 3, ""},
		{"segfault", []string{"-crash-after", "50ms", "-crash-signal", "SEGV"}, -1, "SIGSEGV"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := l.spawn(t, fake(append([]string{"-log-lines", "80", "-stderr-line", "boom on stderr"}, c.flags...)...))
			end := l.waitState(t, p.ID, 10*time.Second, api.StateCrashed)
			ex := end.Exit
			if ex == nil || ex.Reason != api.ReasonCrashed || ex.Signal != c.signal {
				t.Fatalf("exit %+v", ex)
			}
			if c.signal == "" && (ex.Code == nil || *ex.Code != c.code) {
				t.Fatalf("exit code %v, want %d", ex.Code, c.code)
			}
			if len(ex.LogTail) == 0 || len(ex.LogTail) > 50 {
				t.Fatalf("log tail has %d lines", len(ex.LogTail))
			}
			joined := strings.Join(ex.LogTail, "\n")
			if !strings.Contains(joined, "fakegame: ready") || !strings.Contains(joined, "line 80") {
				t.Fatalf("log tail %q", joined)
			}
			// stderr is captured with stdout.
			code, raw := call(t, "GET", l.url+"/v1/processes/"+p.ID+"/logs", l.token, nil, nil)
			if code != http.StatusOK || !strings.Contains(string(raw), "boom on stderr") || !strings.Contains(string(raw), "line 1") {
				t.Fatalf("logs %d %q", code, raw)
			}
			waitDead(t, p.PID, 5*time.Second)
		})
	}
}

func TestHungProcessIsKilledUnhealthy(t *testing.T) {
	t.Parallel()
	l := startLSPM(t, lspmOpts{extra: []string{"--grace", "200ms"}})
	req := fake("-hang-after", "300ms", "-ignore-term")
	req.Health = &api.Health{PeriodSeconds: 0.1, FailureThreshold: 3}
	p := l.spawn(t, req)
	l.waitState(t, p.ID, 10*time.Second, api.StateReady)
	end := l.waitState(t, p.ID, 10*time.Second, api.StateUnhealthy)
	// It ignores SIGTERM, so only the SIGKILL after the grace ends it.
	if end.Exit == nil || end.Exit.Reason != api.ReasonUnhealthy || end.Exit.Signal != "SIGKILL" || !strings.Contains(end.Exit.Detail, "heartbeat") {
		t.Fatalf("exit %+v", end.Exit)
	}
	waitDead(t, p.PID, 5*time.Second)
}

func TestNeverReadyIsKilledUnhealthy(t *testing.T) {
	t.Parallel()
	l := startLSPM(t, lspmOpts{})
	req := fake("-no-ready")
	req.Health = &api.Health{StartTimeoutSeconds: 0.5}
	p := l.spawn(t, req)
	end := l.waitState(t, p.ID, 10*time.Second, api.StateUnhealthy)
	if end.ReadyAt != nil || end.Exit == nil || !strings.Contains(end.Exit.Detail, "start timeout") {
		t.Fatalf("process %+v exit %+v", end, end.Exit)
	}
	if d := end.EndedAt.Sub(end.CreatedAt); d < 500*time.Millisecond {
		t.Fatalf("killed after %s, before the start timeout", d)
	}
}

func TestSlowStartWithinTimeoutBecomesReady(t *testing.T) {
	t.Parallel()
	l := startLSPM(t, lspmOpts{})
	req := fake("-ready-delay", "700ms")
	req.Health = &api.Health{StartTimeoutSeconds: 5, PeriodSeconds: 0.1}
	p := l.spawn(t, req)
	time.Sleep(300 * time.Millisecond)
	if s := l.get(t, p.ID).State; s != api.StateStarting {
		t.Fatalf("state %s while still starting", s)
	}
	got := l.waitState(t, p.ID, 10*time.Second, api.StateReady)
	if got.ReadyAt.Sub(got.CreatedAt) < 600*time.Millisecond {
		t.Fatalf("ready after %s", got.ReadyAt.Sub(got.CreatedAt))
	}
}

func TestMemoryLeakIsKilledAtLimit(t *testing.T) {
	t.Parallel()
	l := startLSPM(t, lspmOpts{})
	req := fake("-leak-mib-per-sec", "40")
	req.MemoryLimitBytes = 60 << 20
	p := l.spawn(t, req)
	end := l.waitState(t, p.ID, 20*time.Second, api.StateCrashed)
	if end.Exit == nil || end.Exit.Reason != api.ReasonMemoryLimit || end.Exit.Signal != "SIGKILL" {
		t.Fatalf("exit %+v", end.Exit)
	}
	if end.RSSBytes <= 60<<20 {
		t.Fatalf("killed at rss %d, under the limit", end.RSSBytes)
	}
}

func TestStopIgnoringSIGTERMIsKilledAfterGrace(t *testing.T) {
	t.Parallel()
	l := startLSPM(t, lspmOpts{})
	p := l.spawn(t, fake("-ignore-term"))
	l.waitState(t, p.ID, 10*time.Second, api.StateReady) // SIGTERM is ignored from before ready
	start := time.Now()
	code, raw := call(t, "DELETE", l.url+"/v1/processes/"+p.ID+"?grace=400ms", l.token, nil, nil)
	if code != http.StatusAccepted {
		t.Fatalf("delete %d %s", code, raw)
	}
	end := l.waitState(t, p.ID, 10*time.Second, api.StateKilled)
	if took := time.Since(start); took < 400*time.Millisecond {
		t.Fatalf("killed after %s, before the grace", took)
	}
	if end.Exit.Signal != "SIGKILL" {
		t.Fatalf("exit %+v", end.Exit)
	}
}

func TestProcessAnnouncedShutdownExits(t *testing.T) {
	t.Parallel()
	l := startLSPM(t, lspmOpts{})
	p := l.spawn(t, fake("-exit-after", "100ms"))
	end := l.waitState(t, p.ID, 10*time.Second, api.StateExited)
	if end.Exit.Reason != api.ReasonExited || *end.Exit.Code != 0 {
		t.Fatalf("exit %+v", end.Exit)
	}
}

func TestAllowListAndHashPinning(t *testing.T) {
	t.Parallel()
	sum, err := fileSHA256(echoBin)
	if err != nil {
		t.Fatal(err)
	}
	// A copy of the echo binary with one byte changed: a modified server.
	modified := filepath.Join(t.TempDir(), "echo-modified")
	raw, _ := os.ReadFile(echoBin)
	raw[len(raw)-1] ^= 0xff
	if err := os.WriteFile(modified, raw, 0o755); err != nil {
		t.Fatal(err)
	}
	wrong := strings.Repeat("0", 64)
	l := startLSPM(t, lspmOpts{noDefault: true, extra: []string{"--allow", modified + "=" + wrong, "--allow", echoBin + "=" + sum}})

	for _, c := range []struct {
		name    string
		command []string
	}{
		{"not listed", []string{"/bin/sh", "-c", "echo pwned"}},
		{"hash mismatch", []string{modified}},
		{"missing file", []string{"/nonexistent/server"}},
	} {
		code, body := call(t, "POST", l.url+"/v1/processes", l.token, api.SpawnRequest{Command: c.command}, nil)
		if p := problemOf(t, body); code != http.StatusForbidden || p.Code != api.CodeExecutableNotAllowed {
			t.Fatalf("%s: %d %s", c.name, code, body)
		}
	}
	if st := l.status(t); len(st.Processes) != 0 {
		t.Fatalf("a refused spawn left %d processes", len(st.Processes))
	}
	// No command and no default command: a clear 400.
	code, body := call(t, "POST", l.url+"/v1/processes", l.token, api.SpawnRequest{}, nil)
	if p := problemOf(t, body); code != http.StatusBadRequest || p.Code != api.CodeInvalid {
		t.Fatalf("no command: %d %s", code, body)
	}
	p := l.spawn(t, api.SpawnRequest{Command: []string{echoBin}})
	l.waitState(t, p.ID, 10*time.Second, api.StateReady)
}

func TestFullAndPortsNeverShared(t *testing.T) {
	t.Parallel()
	l := startLSPM(t, lspmOpts{maxProcesses: 3, ports: 4})
	seen := map[int]string{}
	var ids []string
	for i := 0; i < 2; i++ {
		p := l.spawn(t, api.SpawnRequest{Ports: []string{"game", "query"}})
		for _, port := range p.Ports {
			if other, ok := seen[port]; ok {
				t.Fatalf("port %d given to %s and %s", port, other, p.ID)
			}
			seen[port] = p.ID
		}
		ids = append(ids, p.ID)
	}
	// Room for a third process, but no port left in the range of 4.
	code, body := call(t, "POST", l.url+"/v1/processes", l.token, api.SpawnRequest{}, nil)
	if p := problemOf(t, body); code != http.StatusConflict || p.Code != api.CodeFull {
		t.Fatalf("no ports: %d %s", code, body)
	}
	// A process with no ports still fits; then the machine is full.
	l.spawn(t, noPorts(fake("-no-sdk", "-exit-after", "1h")))
	if st := l.status(t); st.State != api.LoadFull {
		t.Fatalf("state %s, want full", st.State)
	}
	code, body = call(t, "POST", l.url+"/v1/processes", l.token, noPorts(fake("-no-sdk")), nil)
	if p := problemOf(t, body); code != http.StatusConflict || p.Code != api.CodeFull {
		t.Fatalf("full: %d %s", code, body)
	}
	// Ending a process frees its ports for the next one.
	call(t, "DELETE", l.url+"/v1/processes/"+ids[0], l.token, nil, nil)
	l.waitState(t, ids[0], 10*time.Second, api.StateKilled)
	p := l.spawn(t, api.SpawnRequest{})
	if seen[p.Ports["game"]] != ids[0] {
		t.Fatalf("new process got port %d, want one freed by %s (%v)", p.Ports["game"], ids[0], seen)
	}
}

// noPorts asks for no ports at all.
func noPorts(r api.SpawnRequest) api.SpawnRequest { r.Ports = []string{}; return r }

func fileSHA256(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:]), nil
}
