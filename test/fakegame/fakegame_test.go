package fakegame

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"dedi.dev/dedi/api"
)

// The test binary re-executes itself as the fake game server, as the e2e
// tests will.
func TestMain(m *testing.M) {
	if os.Getenv(Env) == "1" {
		os.Exit(Main(os.Args[1:]))
	}
	os.Exit(m.Run())
}

func TestParse(t *testing.T) {
	o, err := parse([]string{
		"-ready-delay", "1s", "-crash-after", "0s", "-crash-signal", "sigsegv", "-players", "4",
		"-leak-mib-per-sec", "8", "-ignore-term", "-log-lines", "3", "-marker", "/tmp/m", "-no-sdk",
	}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if o.readyDelay != time.Second || !o.crashSet || o.crashAfter != 0 || o.crashSignal != syscall.SIGSEGV ||
		o.players != 4 || o.leakMiB != 8 || !o.ignoreTerm || o.logLines != 3 || o.marker != "/tmp/m" ||
		!o.noSDK || o.exitSet || o.hangSet || o.exitCode != 3 {
		t.Errorf("options = %+v", o)
	}
	for _, args := range [][]string{
		{"-crash-signal", "HUP"},
		{"-ready-delay", "soon"},
		{"-exit-after", "-1s"},
		{"extra"},
		{"-unknown"},
	} {
		if _, err := parse(args, io.Discard); err == nil {
			t.Errorf("parse(%q): no error", args)
		}
	}
}

func TestNoSDKExitAfter(t *testing.T) {
	marker := filepath.Join(t.TempDir(), "marker")
	var stdout, stderr bytes.Buffer
	code := run([]string{"-no-sdk", "-exit-after", "50ms", "-log-lines", "2", "-stderr-line", "oops",
		"-marker", marker, "-log-every", "10ms", "-leak-mib-per-sec", "1"}, &stdout, &stderr)
	if code != 0 {
		t.Fatalf("exit code %d, stderr %q", code, stderr.String())
	}
	if !strings.HasPrefix(stdout.String(), "line 1\nline 2\n") || !strings.Contains(stdout.String(), "tick 1\n") ||
		!strings.HasSuffix(stdout.String(), "fakegame: exiting\n") {
		t.Errorf("stdout %q", stdout.String())
	}
	if stderr.String() != "oops\n" {
		t.Errorf("stderr %q", stderr.String())
	}
	b, err := os.ReadFile(marker)
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(b))
	if len(f) != 2 || f[0] != strconv.Itoa(os.Getpid()) {
		t.Errorf("marker %q", b)
	}
}

func TestNoSDKCrashExitCode(t *testing.T) {
	if code := run([]string{"-no-sdk", "-crash-after", "0s", "-exit-code", "7"}, io.Discard, io.Discard); code != 7 {
		t.Errorf("exit code %d, want 7", code)
	}
}

func TestNeedsSDKEnv(t *testing.T) {
	t.Setenv(api.EnvProcessID, "")
	var stderr bytes.Buffer
	if code := run(nil, io.Discard, &stderr); code != 1 || !strings.Contains(stderr.String(), api.EnvProcessID) {
		t.Errorf("code %d, stderr %q", code, stderr.String())
	}
}

// fake starts the fake game server as a child with args and extra
// environment, and returns it with a scanner of its stdout.
func fake(t *testing.T, env []string, args ...string) (*exec.Cmd, *bufio.Scanner) {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(append(os.Environ(), Env+"=1", "GORACE=atexit_sleep_ms=0"), env...)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	return cmd, bufio.NewScanner(out)
}

// waitLine reads stdout until want.
func waitLine(t *testing.T, sc *bufio.Scanner, want string) {
	t.Helper()
	for sc.Scan() {
		if sc.Text() == want {
			return
		}
	}
	t.Fatalf("stdout ended before %q", want)
}

func TestCrashSignal(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGSEGV, syscall.SIGABRT, syscall.SIGKILL} {
		t.Run(sig.String(), func(t *testing.T) {
			name := strings.TrimPrefix(strings.ToUpper(signalName(sig)), "SIG")
			cmd, sc := fake(t, nil, "-no-sdk", "-crash-after", "0s", "-crash-signal", name)
			for sc.Scan() {
			}
			err := cmd.Wait()
			var ee *exec.ExitError
			if !errors.As(err, &ee) {
				t.Fatalf("wait: %v", err)
			}
			ws := ee.Sys().(syscall.WaitStatus)
			if !ws.Signaled() || ws.Signal() != sig {
				t.Errorf("status %v, want killed by %v", ws, sig)
			}
		})
	}
}

func signalName(s syscall.Signal) string {
	for n, v := range signals {
		if v == s {
			return n
		}
	}
	return ""
}

func TestSIGTERM(t *testing.T) {
	cmd, sc := fake(t, nil, "-no-sdk", "-log-lines", "1")
	waitLine(t, sc, "line 1")
	_ = cmd.Process.Signal(syscall.SIGTERM)
	if err := cmd.Wait(); err != nil {
		t.Errorf("exit after SIGTERM: %v", err)
	}

	cmd, sc = fake(t, nil, "-no-sdk", "-ignore-term", "-log-lines", "1")
	waitLine(t, sc, "line 1")
	_ = cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		t.Fatalf("-ignore-term exited on SIGTERM: %v", err)
	case <-time.After(300 * time.Millisecond):
	}
	_ = cmd.Process.Kill()
	<-done
}

// lspm is a hand-written stand-in for the LSPM's SDK endpoints.
type lspm struct {
	mu       sync.Mutex
	ready    bool
	beats    int
	players  int
	shutdown bool
}

func (l *lspm) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	l.mu.Lock()
	defer l.mu.Unlock()
	switch {
	case strings.HasSuffix(r.URL.Path, "/ready"):
		l.ready = true
	case strings.HasSuffix(r.URL.Path, "/heartbeat"):
		var hb api.Heartbeat
		_ = json.NewDecoder(r.Body).Decode(&hb)
		l.beats++
		if hb.Players != nil {
			l.players = *hb.Players
		}
	case strings.HasSuffix(r.URL.Path, "/shutdown"):
		l.shutdown = true
	}
	_ = json.NewEncoder(w).Encode(api.Process{ID: "p-fake", State: api.StateReady})
}

func (l *lspm) get() (beats, players int, shutdown bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.beats, l.players, l.shutdown
}

func sdkEnv(url string) []string {
	return []string{"DEDI_PROCESS_ID=p-fake", "DEDI_PROCESS_TOKEN=t", "DEDI_SDK_URL=" + url, "DEDI_HEARTBEAT_MS=20"}
}

func TestWithSDK(t *testing.T) {
	l := &lspm{}
	srv := httptest.NewServer(l)
	defer srv.Close()

	cmd, sc := fake(t, sdkEnv(srv.URL), "-players", "5", "-hang-after", "200ms", "-exit-after", "500ms")
	waitLine(t, sc, "fakegame: ready")
	waitLine(t, sc, "fakegame: hanging (no more heartbeats)")
	beats, players, _ := l.get()
	if beats < 2 || players != 5 {
		t.Errorf("beats %d players %d, want >= 2 with 5 players", beats, players)
	}
	waitLine(t, sc, "fakegame: exiting")
	if err := cmd.Wait(); err != nil {
		t.Fatalf("exit: %v", err)
	}
	if b, _, shutdown := l.get(); !shutdown || b > beats+1 {
		t.Errorf("shutdown %v; beats %d after hang, %d before", shutdown, b, beats)
	}
}
