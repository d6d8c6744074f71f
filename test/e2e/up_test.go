package e2e

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"dedi.dev/dedi/api"
)

// dedi up starts, prints where it is and where its token is, hosts the
// echo example, and leaves no game server behind on Ctrl-C.
func TestUpSmoke(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	cmd := exec.Command(dediBin, "up", "--data-dir", dir, "--listen", "127.0.0.1:0")
	cmd.Env = append(os.Environ(), "HOME="+dir)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		_ = cmd.Process.Kill()
		killUnder(filepath.Join(dir, "lspm"))
	}()
	sc := bufio.NewScanner(stdout)
	var url string
	re := regexp.MustCompile(`an LSPM at (http://\S+)`)
	var printed []string
	for sc.Scan() {
		printed = append(printed, sc.Text())
		if m := re.FindStringSubmatch(sc.Text()); m != nil {
			url = m[1]
		}
		if strings.HasPrefix(sc.Text(), "Ctrl-C") {
			break
		}
	}
	go func() { // keep draining so dedi never blocks on a full pipe
		for sc.Scan() {
		}
	}()
	if url == "" {
		t.Fatalf("no URL printed: %q", printed)
	}
	tokenPath := filepath.Join(dir, "machine-token")
	if !strings.Contains(strings.Join(printed, "\n"), tokenPath) {
		t.Fatalf("token path not printed: %q", printed)
	}
	raw, err := os.ReadFile(tokenPath)
	if err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(tokenPath); st.Mode().Perm() != 0o600 {
		t.Fatalf("token file mode %v", st.Mode().Perm())
	}
	l := &lspm{t: t, url: url, token: strings.TrimSpace(string(raw))}
	p := l.spawn(t, api.SpawnRequest{Params: map[string]any{"map": "arena"}})
	l.waitState(t, p.ID, 10*time.Second, api.StateReady)
	if got := udpEcho(t, p.Address, p.Ports["game"], "hello"); got != "hello" {
		t.Fatalf("echo = %q", got)
	}
	_ = cmd.Process.Signal(syscall.SIGINT)
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("dedi up exited with %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("dedi up did not stop on SIGINT")
	}
	if alive(p.PID) {
		t.Fatal("Ctrl-C left the game server running")
	}
}
