package main

import (
	"bufio"
	"encoding/json"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"dedi.dev/dedi/api"
)

// The test binary re-executes itself as the echo server.
func TestMain(m *testing.M) {
	if os.Getenv("ECHO_TEST_MAIN") == "1" {
		os.Exit(run())
	}
	os.Exit(m.Run())
}

// lspm is a hand-written stand-in for the LSPM's SDK endpoints.
type lspm struct {
	mu       sync.Mutex
	state    string
	players  int
	shutdown bool
}

func (l *lspm) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	l.mu.Lock()
	defer l.mu.Unlock()
	switch {
	case strings.HasSuffix(r.URL.Path, "/ready"):
		if l.state == api.StateStarting {
			l.state = api.StateReady
		}
	case strings.HasSuffix(r.URL.Path, "/heartbeat"):
		var hb api.Heartbeat
		_ = json.NewDecoder(r.Body).Decode(&hb)
		if hb.Players != nil {
			l.players = *hb.Players
		}
	case strings.HasSuffix(r.URL.Path, "/shutdown"):
		l.shutdown = true
	}
	_ = json.NewEncoder(w).Encode(api.Process{ID: "p-echo", State: l.state, Players: l.players})
}

func (l *lspm) get() (state string, players int, shutdown bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.state, l.players, l.shutdown
}

// start runs the echo server against l and waits for its ready line.
func start(t *testing.T, l *lspm) (cmd *exec.Cmd, port int, out *bufio.Scanner) {
	t.Helper()
	srv := httptest.NewServer(l)
	t.Cleanup(srv.Close)
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port = pc.LocalAddr().(*net.UDPAddr).Port
	pc.Close()

	cmd = exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "ECHO_TEST_MAIN=1", "GORACE=atexit_sleep_ms=0",
		"DEDI_PROCESS_ID=p-echo", "DEDI_PROCESS_TOKEN=t", "DEDI_SDK_URL="+srv.URL,
		"DEDI_PORT_GAME="+strconv.Itoa(port), "DEDI_HEARTBEAT_MS=50")
	cmd.Stderr = os.Stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill() })
	out = bufio.NewScanner(stdout)
	if !out.Scan() || out.Text() != "echo: ready on udp port "+strconv.Itoa(port) {
		t.Fatalf("first line %q, want the ready line", out.Text())
	}
	return cmd, port, out
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

func TestEchoAndSIGTERM(t *testing.T) {
	l := &lspm{state: api.StateStarting}
	cmd, port, out := start(t, l)

	conn, err := net.Dial("udp", "127.0.0.1:"+strconv.Itoa(port))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	buf := make([]byte, 100)
	for i := 0; ; i++ { // UDP: resend until an echo comes back
		if _, err := conn.Write([]byte("hello")); err != nil {
			t.Fatal(err)
		}
		_ = conn.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		n, err := conn.Read(buf)
		if err == nil {
			if string(buf[:n]) != "hello" {
				t.Fatalf("echo %q", buf[:n])
			}
			break
		}
		if i == 10 {
			t.Fatal("no echo:", err)
		}
	}
	waitFor(t, "players 1 in a heartbeat", func() bool { _, p, _ := l.get(); return p == 1 })

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	var lines []string
	for out.Scan() {
		lines = append(lines, out.Text())
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("exit: %v (output %q)", err, lines)
	}
	if _, _, shutdown := l.get(); !shutdown {
		t.Error("no shutdown call to the LSPM")
	}
	if len(lines) == 0 || lines[len(lines)-1] != "echo: bye" {
		t.Errorf("shutdown lines %q", lines)
	}
}

func TestExitsWhenLSPMReportsEnd(t *testing.T) {
	l := &lspm{state: api.StateStarting}
	cmd, _, out := start(t, l)
	l.mu.Lock()
	l.state = api.StateKilled
	l.mu.Unlock()
	for out.Scan() {
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("exit: %v", err)
	}
	if _, _, shutdown := l.get(); shutdown {
		t.Error("shutdown call after the LSPM reported the end")
	}
}
