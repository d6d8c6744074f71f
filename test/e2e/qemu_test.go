package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"dedi.dev/dedi/api"
)

// The qemu tests give the VMM's qemu provider loopback addresses and
// ports of their own: TestQEMUFleet 127.0.0.180-184 with ports
// 42100-42149, BenchmarkColdStartQEMU 127.0.0.185-189 with ports
// 42150-42199 (10 per machine; the provider's unit tests use
// 127.0.0.170-179 and 42000-42099).

// needQEMU skips the test when no VM can run here at all.
func needQEMU(t testing.TB) {
	t.Helper()
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Skip("qemu-system-x86_64 is not installed (scripts/ci-deps.sh installs it)")
	}
	if ks, _ := filepath.Glob("/boot/vmlinuz-*-cloud-amd64"); len(ks) == 0 {
		t.Skip("no Debian cloud kernel in /boot (scripts/ci-deps.sh installs linux-image-cloud-amd64)")
	}
}

// qemuImage builds the echo example (static, as the e2e binaries are),
// and test/guestprobe beside it if probe, into a qemu image with "dedi
// image build", as a studio would, and returns its reference and size
// (kernel + initramfs).
func qemuImage(t testing.TB, probe bool) (ref string, size int64) {
	t.Helper()
	build, out := t.TempDir(), t.TempDir()
	raw, err := os.ReadFile(echoBin)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(build, "echo"), raw, 0o755); err != nil {
		t.Fatal(err)
	}
	if probe {
		if raw, err = os.ReadFile(probeBin); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(build, "guestprobe"), raw, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// The dedi put in the image is this dedi (its default --dedi).
	cmd := exec.Command(dediBin, "image", "build", "--format", "qemu", "--name", "echo", "--out", out, build, "--", "echo")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("dedi image build: %v\n%s%s", err, stdout.String(), stderr.String())
	}
	lines := strings.Split(strings.TrimSpace(stdout.String()), "\n")
	ref = lines[len(lines)-1]
	if want := "qemu:" + filepath.Join(out, "echo"); ref != want {
		t.Fatalf("dedi image build printed %q as the reference, want %q", ref, want)
	}
	for _, f := range []string{"vmlinuz", "initramfs.cpio.gz"} {
		st, err := os.Stat(filepath.Join(out, "echo", f))
		if err != nil {
			t.Fatal(err)
		}
		size += st.Size()
	}
	return ref, size
}

// qemuVMM starts a VMM whose qemu provider has the given addresses and
// ports. Every qemu left under its data dir is killed when the test ends,
// even when it fails.
func qemuVMM(t testing.TB, firstHost, portBase int) *vmmProc {
	t.Helper()
	var v *vmmProc
	t.Cleanup(func() { // registered first: runs after the VMM is killed
		if v == nil {
			return
		}
		for _, pid := range qemuPIDs(v.dataDir) {
			t.Errorf("qemu (pid %d) left running; killing it", pid)
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		if t.Failed() {
			logs, _ := filepath.Glob(filepath.Join(v.dataDir, "qemu", "machines", "*", "console.log"))
			for _, l := range logs {
				raw, _ := os.ReadFile(l)
				t.Logf("%s:\n%s", l, raw)
			}
		}
	})
	v = startVMM(t, "--qemu-first-host", strconv.Itoa(firstHost), "--qemu-last-host", strconv.Itoa(firstHost+4),
		"--qemu-port-base", strconv.Itoa(portBase), "--qemu-ports-per-machine", "10", "--qemu-memory", "256",
		// An emulated guest on a loaded machine can be late by more than
		// the harness's 200 ms × 3 that makes a machine lost.
		"--report-interval", "1s")
	return v
}

// qemuPIDs lists the qemu processes whose command line names a file
// under dir.
func qemuPIDs(dir string) []int {
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		raw, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err != nil {
			continue
		}
		args := strings.Split(string(raw), "\x00")
		if strings.Contains(filepath.Base(args[0]), "qemu") && strings.Contains(string(raw), dir+"/") {
			pids = append(pids, pid)
		}
	}
	return pids
}

// qemuFleet creates a fleet on the qemu provider; with no command, the
// image's default command runs.
func qemuFleet(t testing.TB, v *vmmProc, name, ref string, ports []string, idle float64, command ...string) {
	t.Helper()
	f := map[string]any{"name": name, "provider": "qemu", "image": ref, "ports": ports,
		"scaling": map[string]any{"maxMachines": 1, "idleShutdownSeconds": idle}}
	if len(command) > 0 {
		f["command"] = command
	}
	if code, raw := call(t, "POST", v.url+"/v1/fleets", v.token, f, nil); code != http.StatusCreated {
		t.Fatalf("create fleet: %d %s", code, raw)
	}
}

// TestQEMUFleet: fleets on the qemu provider, from an image built by
// "dedi image build" with no command in the fleet, one VM at a time (two
// cores). A start boots a VM;
// the echo answers UDP on the machine's address, forwarded by qemu; a
// VMM killed and restarted finds the VM again; a game that crashes is
// recorded with its exit code and log tail; idle machines are shut down
// through the handshake, and no qemu is left.
//
// The crash is test/guestprobe, in a second fleet: it checks what a game
// of its own user can reach in the guest (not the root file system; its
// own HOME), prints what it found and exits 3 on purpose. (The host cannot
// signal a process inside a VM, as the docker test does in a container.)
func TestQEMUFleet(t *testing.T) {
	needQEMU(t)
	t.Parallel()
	ref, _ := qemuImage(t, true)
	v := qemuVMM(t, 180, 42100)
	qemuFleet(t, v, "vm-echo", ref, []string{"game"}, 2)
	qemuFleet(t, v, "vm-crash", ref, []string{"game"}, 2, "/opt/game/guestprobe")

	p := startProcess(t, v, "vm-echo", true)
	if p.State != api.StateReady || !strings.HasPrefix(p.Address, "127.0.0.18") || p.Ports["game"] < 42100 || p.Ports["game"] > 42149 {
		t.Fatalf("process %s on %s:%v, want ready on 127.0.0.180-184 with a port of 42100-42149", p.State, p.Address, p.Ports)
	}
	if strings.Join(p.Command, " ") != "/opt/game/echo" {
		t.Errorf("process runs %q, want the image's default command /opt/game/echo", p.Command)
	}
	if got := udpEcho(t, p.Address, p.Ports["game"], "ping"); got != "ping" {
		t.Fatalf("echo = %q", got)
	}
	ms := v.machines(t, "vm-echo")
	if len(ms) != 1 || ms[0].Provider != "qemu" || ms[0].State != api.MachineReady || ms[0].Address != p.Address ||
		!strings.HasPrefix(ms[0].Hardware.Kernel, "6.") || ms[0].Hardware.Hostname != ms[0].ID {
		t.Fatalf("machines %+v, want one ready qemu machine that reported the guest's hardware", ms)
	}
	pids := qemuPIDs(v.dataDir)
	if len(pids) != 1 {
		t.Fatalf("qemu processes %v, want one", pids)
	}
	for _, pid := range pids { // the machine tokens are in the initrd, never on a command line
		raw, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
		if bytes.Contains(raw, []byte("token")) || bytes.Contains(raw, []byte("vmm")) {
			t.Errorf("qemu's command line names the token or the VMM: %q", raw)
		}
	}

	// kill -9 of the VMM: the restarted one finds the VMs through the
	// provider's state dir, and the game kept serving.
	v.kill9()
	v.start()
	if got := udpEcho(t, p.Address, p.Ports["game"], "again"); got != "again" {
		t.Fatalf("echo after the VMM restart = %q", got)
	}
	eventually(t, 10*time.Second, "the machine ready after the VMM restart", func() bool {
		again := v.machines(t, "vm-echo")
		return len(again) == 1 && again[0].State == api.MachineReady && again[0].ID == ms[0].ID
	})

	// The probe of the crash fleet exits 3 when every check held: crashed,
	// with its words in the log tail, read through the VMM.
	crash := startProcess(t, v, "vm-crash", false)
	eventually(t, 20*time.Second, "the probe crashed", func() bool {
		crash = v.process(t, crash.ID)
		return api.IsTerminal(crash.State)
	})
	const why = "guestprobe: every check held; crashing on purpose"
	if e := crash.Exit; e == nil || e.Reason != api.ReasonCrashed || e.Code == nil || *e.Code != 3 || !strings.Contains(strings.Join(e.LogTail, "\n"), why) {
		t.Fatalf("crash evidence %+v, want reason crashed, code 3 and %q in the log tail", e, why)
	}
	code, logs := call(t, "GET", v.url+"/v1/processes/"+crash.ID+"/logs?tail=20", v.token, nil, nil)
	if code != http.StatusOK || !strings.Contains(string(logs), why) {
		t.Errorf("log tail through the VMM: %d %q", code, logs)
	}

	// Stop the echo; both machines go idle, are shut down through the
	// handshake and deprovisioned: no qemu is left.
	if code, raw := call(t, "DELETE", v.url+"/v1/processes/"+p.ID, v.token, nil, nil); code != http.StatusAccepted {
		t.Fatalf("stop: %d %s", code, raw)
	}
	eventually(t, 40*time.Second, "both idle machines terminated", func() bool {
		for _, f := range []string{"vm-echo", "vm-crash"} {
			ms := v.machines(t, f)
			if len(ms) != 1 || ms[0].State != api.MachineTerminated {
				return false
			}
		}
		return true
	})
	eventually(t, 10*time.Second, "no qemu left", func() bool { return len(qemuPIDs(v.dataDir)) == 0 })
	if left, _ := filepath.Glob(filepath.Join(v.dataDir, "qemu", "machines", "*")); len(left) != 0 {
		t.Errorf("machine dirs left: %v", left)
	}
	if strings.Contains(v.logs.String(), "delete_failed") {
		t.Errorf("VMM log shows a failed delete:\n%s", v.logs)
	}
}

// BenchmarkColdStartQEMU: POST /v1/processes?wait=ready with no machine
// up, until the 201, on the qemu provider and (the baseline, in the same
// run and VMM) the local one: the provider boots a VM, its LSPM reports,
// the echo example is spawned and ready. Between iterations, outside the
// timer, the process and the machine are deleted and the benchmark waits
// until no qemu is left. It reports the median (p50-ms), the medians of
// the machine's start (provisioning -> ready) and of the game's (machine
// ready -> process ready), and the image's size (kernel + initramfs).
//
//	go test ./test/e2e -run '^$' -bench ColdStartQEMU -benchtime 5x -count 1
func BenchmarkColdStartQEMU(b *testing.B) {
	needQEMU(b)
	ref, size := qemuImage(b, false)
	v := qemuVMM(b, 185, 42150)
	qemuFleet(b, v, "cold-qemu", ref, []string{"game"}, 3600)
	v.fleet(b, api.Fleet{Name: "cold-local", Scaling: api.Scaling{MaxMachines: 2, IdleShutdownSeconds: 3600}})
	benchColdStarts(b, v, "qemu", "cold-qemu", size, func(t testing.TB, fleet string, wait bool) api.Process {
		return startProcess(t, v, fleet, wait)
	}, "no qemu left", func() bool { return len(qemuPIDs(v.dataDir)) == 0 })
}

// startProcess starts a process, with ?wait=ready if wait: a VM that
// boots under TCG on a busy host may take longer than the harness client
// waits.
func startProcess(t testing.TB, v *vmmProc, fleet string, wait bool) api.Process {
	t.Helper()
	raw, err := json.Marshal(api.StartRequest{Fleet: fleet})
	if err != nil {
		t.Fatal(err)
	}
	u := v.url + "/v1/processes"
	if wait {
		u += "?wait=ready&timeout=60s"
	}
	req, err := http.NewRequest("POST", u, bytes.NewReader(raw))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+v.token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := (&http.Client{Timeout: 90 * time.Second}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var p api.Process
	if resp.StatusCode != http.StatusCreated || json.Unmarshal(body, &p) != nil {
		t.Fatalf("start on %s: %d %s", fleet, resp.StatusCode, body)
	}
	return p
}

func fmtMillis(xs []float64) string {
	s := make([]string, len(xs))
	for i, x := range xs {
		s[i] = fmt.Sprintf("%.0f", x)
	}
	return strings.Join(s, " ")
}
