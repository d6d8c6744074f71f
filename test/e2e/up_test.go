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

// dedi up starts the VMM, prints where it is and where its token is, hosts
// the echo example on local machines made on demand, and leaves no process
// behind on Ctrl-C.
func TestUpSmoke(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	cmd := exec.Command(dediBin, "up", "--data-dir", dir, "--listen", "127.0.0.1:0",
		"--local-first-host", "240", "--local-port-base", "64000")
	cmd.Env = append(os.Environ(), "HOME="+dir, "DEDI_TOKEN=")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		_ = cmd.Process.Kill()
		machines, _ := filepath.Glob(filepath.Join(dir, "machines", "machines", "*"))
		for _, m := range machines {
			killUnder(filepath.Join(m, "lspm"))
		}
	}()
	sc := bufio.NewScanner(stdout)
	var url string
	re := regexp.MustCompile(`the VMM at (http://\S+),`)
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
	tokenPath := filepath.Join(dir, "admin-token")
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
	v := &vmmProc{t: t, url: url, token: strings.TrimSpace(string(raw))}
	p := v.start1(t, "demo", true)
	if p.State != api.StateReady || p.Address == "" || p.Ports["game"] == 0 {
		t.Fatalf("started %+v", p)
	}
	if got := udpEcho(t, p.Address, p.Ports["game"], "hello"); got != "hello" {
		t.Fatalf("echo = %q", got)
	}
	// The CLI finds the token in the data dir.
	out, err := exec.Command(dediBin, "process", "list", "--addr", url, "--data-dir", dir, "-o", "json").CombinedOutput()
	if err != nil || !strings.Contains(string(out), p.ID) {
		t.Fatalf("dedi process list: %v %s", err, out)
	}
	_ = cmd.Process.Signal(syscall.SIGINT)
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("dedi up exited with %v", err)
		}
	case <-time.After(40 * time.Second):
		t.Fatal("dedi up did not stop on SIGINT")
	}
	waitDead(t, p.PID, 5*time.Second)
	machines, _ := filepath.Glob(filepath.Join(dir, "machines", "machines", "*"))
	if len(machines) != 0 {
		t.Fatalf("machines left behind: %v", machines)
	}
}
