package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"dedi.dev/dedi/api"
)

// The docker tests give the VMM's docker provider loopback addresses and
// ports of their own: TestDockerFleet 127.0.3.1-10 with ports 25000-25999,
// BenchmarkColdStartDocker 127.0.3.11-20 with ports 26000-26999 (the
// provider's unit tests use 127.0.2.x and 20000-24099).

// needDocker skips the test when no Docker engine can run here.
func needDocker(t testing.TB) {
	t.Helper()
	out, err := exec.Command("docker", "version", "--format", "{{.Server.APIVersion}}").CombinedOutput()
	if err != nil {
		t.Skipf("no Docker engine can run here: docker version: %v: %s", err, strings.TrimSpace(string(out)))
	}
}

// dockerImage builds the echo example (static, as the e2e binaries are)
// into a docker image with "dedi image build", as a studio would, and
// returns its reference. The image is removed when the test ends.
func dockerImage(t testing.TB) (ref string, bytes int64) {
	t.Helper()
	build := t.TempDir()
	raw, err := os.ReadFile(echoBin)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(build, "echo"), raw, 0o755); err != nil {
		t.Fatal(err)
	}
	name := fmt.Sprintf("e2e-echo-%d-%d", os.Getpid(), time.Now().UnixNano())
	t.Cleanup(func() {
		// Every tag of the image: the reference and NAME:latest.
		out, _ := exec.Command("docker", "images", "--filter", "label=dev.dedi.image="+name, "--format", "{{.Repository}}:{{.Tag}}").Output()
		for _, r := range strings.Fields(string(out)) {
			_ = exec.Command("docker", "rmi", "-f", r).Run()
		}
	})
	// The dedi put in the image is this dedi (its default --dedi).
	cmd := exec.Command(dediBin, "image", "build", "--format", "docker", "--name", name, build, "--", "echo")
	out, err := cmd.Output()
	if err != nil {
		stderr := ""
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = string(ee.Stderr)
		}
		t.Fatalf("dedi image build: %v\n%s%s", err, out, stderr)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	ref = lines[len(lines)-1]
	if !strings.HasPrefix(ref, "dedi-"+name+":") {
		t.Fatalf("dedi image build printed %q as the reference", ref)
	}
	size, err := exec.Command("docker", "image", "inspect", "--format", "{{.Size}}", ref).Output()
	if err != nil {
		t.Fatalf("docker image inspect %s: %v", ref, err)
	}
	bytes, _ = strconv.ParseInt(strings.TrimSpace(string(size)), 10, 64)
	return ref, bytes
}

// dockerVMM starts a VMM whose docker provider has the given instance
// label, first address and port base. Its containers are removed when
// the test ends (after the VMM is stopped), and the test fails if any
// was left.
func dockerVMM(t testing.TB, instance, firstAddress string, portBase int) *vmmProc {
	t.Helper()
	t.Cleanup(func() { // registered first: runs after the VMM is killed
		if ids := dockerContainers(t, instance); len(ids) > 0 {
			_ = exec.Command("docker", append([]string{"rm", "-f"}, ids...)...).Run()
		}
	})
	return startVMM(t, "--docker-instance", instance, "--docker-first-address", firstAddress,
		"--docker-machines", "10", "--docker-port-base", strconv.Itoa(portBase))
}

// dockerContainers lists the containers (running or not) of a docker
// provider instance, as "docker ps -a" by label shows them.
func dockerContainers(t testing.TB, instance string) []string {
	t.Helper()
	out, err := exec.Command("docker", "ps", "-a", "-q", "--filter", "label=dev.dedi.instance="+instance).Output()
	if err != nil {
		t.Errorf("docker ps: %v", err)
	}
	return strings.Fields(string(out))
}

// dockerFleet creates a fleet on the docker provider with no command:
// the image's default command runs.
func dockerFleet(t testing.TB, v *vmmProc, name, ref string, idle float64) {
	t.Helper()
	f := map[string]any{"name": name, "provider": "docker", "image": ref,
		"scaling": map[string]any{"maxMachines": 2, "idleShutdownSeconds": idle}}
	if code, raw := call(t, "POST", v.url+"/v1/fleets", v.token, f, nil); code != http.StatusCreated {
		t.Fatalf("create fleet: %d %s", code, raw)
	}
}

// hostPIDOf finds a game server's pid on the host by the process id in its
// environment: the pid the LSPM reports is the one inside the container.
func hostPIDOf(t testing.TB, processID string) int {
	t.Helper()
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		env, _ := os.ReadFile("/proc/" + e.Name() + "/environ")
		if strings.Contains("\x00"+string(env), "\x00"+api.EnvProcessID+"="+processID+"\x00") {
			return pid
		}
	}
	t.Fatalf("no process on the host has %s=%s (reading other users' environments needs root)", api.EnvProcessID, processID)
	return 0
}

// TestDockerFleet: a fleet on the docker provider, from an image built by
// "dedi image build" with no command in the fleet: a start provisions a
// container, the echo answers UDP on the machine's address, a crash is
// recorded with its signal and log tail, and the idle machine is shut
// down through the handshake, leaving no container.
func TestDockerFleet(t *testing.T) {
	needDocker(t)
	t.Parallel()
	ref, _ := dockerImage(t)
	instance := fmt.Sprintf("e2e-%d-%d", os.Getpid(), time.Now().UnixNano())
	v := dockerVMM(t, instance, "127.0.3.1", 25000)
	dockerFleet(t, v, "dock", ref, 2)

	p := v.start1(t, "dock", true)
	if p.State != api.StateReady || p.Address != "127.0.3.1" || p.Ports["game"] < 25000 || p.Ports["game"] > 25099 {
		t.Fatalf("process %s on %s:%v, want ready on 127.0.3.1 with a port of 25000-25099", p.State, p.Address, p.Ports)
	}
	if !strings.HasPrefix(strings.Join(p.Command, " "), "/opt/game/echo") {
		t.Errorf("process runs %q, want the image's default command /opt/game/echo", p.Command)
	}
	if got := udpEcho(t, p.Address, p.Ports["game"], "ping"); got != "ping" {
		t.Fatalf("echo = %q", got)
	}
	ms := v.machines(t, "dock")
	if len(ms) != 1 || ms[0].Provider != "docker" || ms[0].State != api.MachineReady || ms[0].Hardware.CPUs == 0 {
		t.Fatalf("machines %+v, want one ready docker machine that reported its hardware", ms)
	}
	if ids := dockerContainers(t, instance); len(ids) != 1 || !strings.HasPrefix(ms[0].ProviderID, ids[0]) {
		t.Fatalf("containers of the instance %v, want the machine's %s", ids, ms[0].ProviderID)
	}

	// kill -9 of the VMM: the restarted one finds the container again
	// through the provider (it keeps no state but the labels) and keeps
	// the machine, whose game kept serving.
	v.kill9()
	restarted := time.Now()
	v.start()
	if got := udpEcho(t, p.Address, p.Ports["game"], "again"); got != "again" {
		t.Fatalf("echo after the VMM restart = %q", got)
	}
	// The restarted VMM applies a report of the machine it listed again
	// (its reconciliation ran before: it starts with the server).
	var again []api.Machine
	eventually(t, 10*time.Second, "a report applied by the restarted VMM", func() bool {
		again = v.machines(t, "dock")
		return len(again) == 1 && again[0].LastReportAt != nil && again[0].LastReportAt.After(restarted)
	})
	if again[0].State != api.MachineReady || again[0].ProviderID != ms[0].ProviderID || again[0].Address != ms[0].Address {
		t.Fatalf("machine after the VMM restart %+v, want %s ready on %s", again[0], ms[0].ID, ms[0].Address)
	}
	if ids := dockerContainers(t, instance); len(ids) != 1 || !strings.HasPrefix(ms[0].ProviderID, ids[0]) {
		t.Fatalf("containers of the instance after the VMM restart %v, want the machine's %s", ids, ms[0].ProviderID)
	}
	if got := v.process(t, p.ID); got.State != api.StateReady {
		t.Fatalf("process after the VMM restart is %s", got.State)
	}

	// The game dies by a signal it cannot catch (Go turns a SIGSEGV into exit 2).
	if err := syscall.Kill(hostPIDOf(t, p.ID), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	var ended api.Process
	eventually(t, 10*time.Second, "the process crashed", func() bool {
		ended = v.process(t, p.ID)
		return ended.State == api.StateCrashed
	})
	if e := ended.Exit; e == nil || e.Reason != api.ReasonCrashed || e.Signal != "SIGKILL" || !strings.Contains(strings.Join(e.LogTail, "\n"), "echo: ready on udp port") {
		t.Fatalf("crash evidence %+v, want reason crashed, SIGKILL and the echo's output in the log tail", e)
	}
	code, logs := call(t, "GET", v.url+"/v1/processes/"+p.ID+"/logs?tail=20", v.token, nil, nil)
	if code != http.StatusOK || !strings.Contains(string(logs), "echo: ready on udp port "+strconv.Itoa(p.Ports["game"])) {
		t.Errorf("log tail through the VMM: %d %q", code, logs)
	}

	// Idle, handshake, deprovision: nothing left on the engine.
	eventually(t, 30*time.Second, "the idle machine terminated", func() bool {
		ms := v.machines(t, "dock")
		return len(ms) == 1 && ms[0].State == api.MachineTerminated
	})
	if ids := dockerContainers(t, instance); len(ids) != 0 {
		t.Fatalf("containers left after the machine terminated: %v", ids)
	}
	if strings.Contains(v.logs.String(), "delete_failed") {
		t.Errorf("VMM log shows a failed delete:\n%s", v.logs)
	}
}

// BenchmarkColdStartDocker: POST /v1/processes?wait=ready with no machine
// up, until the 201, on the docker provider and (the baseline, in the same
// run and VMM) the local one: the provider makes a machine, its LSPM
// reports, the echo example is spawned and ready. Between iterations,
// outside the timer, the process and the machine are deleted and the
// benchmark waits until the machine is terminated. Besides ns/op it
// reports the median (p50-ms) and, from the VMM's events, the median of
// each step: machine (provisioning -> ready: the provider makes the
// machine, its LSPM starts and its first report is applied; "booting" is
// not always seen in between, as a fast LSPM reports before the VMM has
// heard back from the provider) and game (machine ready -> process
// ready); and the image size.
//
//	go test ./test/e2e -run '^$' -bench ColdStartDocker -benchtime 5x -count 1
func BenchmarkColdStartDocker(b *testing.B) {
	needDocker(b)
	ref, size := dockerImage(b)
	instance := fmt.Sprintf("e2e-bench-%d-%d", os.Getpid(), time.Now().UnixNano())
	v := dockerVMM(b, instance, "127.0.3.11", 26000)
	dockerFleet(b, v, "cold-docker", ref, 3600)
	v.fleet(b, api.Fleet{Name: "cold-local", Scaling: api.Scaling{MaxMachines: 2, IdleShutdownSeconds: 3600}})
	benchColdStarts(b, v, "docker", "cold-docker", size, v.start1,
		// A machine that went lost (reports late on a loaded host) is
		// deleted by the VMM's next tick: the next start is cold only once
		// its container is gone.
		"no container of the instance", func() bool { return len(dockerContainers(b, instance)) == 0 })
	if ids := dockerContainers(b, instance); len(ids) != 0 {
		b.Errorf("containers left: %v", ids)
		for _, m := range v.machines(b, "cold-docker") {
			b.Logf("machine %s: %s, provider id %q", m.ID, m.State, m.ProviderID)
		}
		readEvents(b, v, 0, func(e api.Event) bool {
			if e.Fleet == "cold-docker" && e.ProcessID == "" {
				b.Logf("event %s %s %s %s %s", e.At.Format("15:04:05.000"), e.Type, e.MachineID, e.State, e.Detail)
			}
			return false
		})
	}
}

func millis(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// benchColdStarts runs the cold-start sub-benchmarks "local" (fleet
// cold-local, the baseline) and name (fleet): each iteration starts a
// process with start (?wait=ready) on a fleet with no machine, then, outside
// the timer, deletes the process and the machine and waits until the
// machine is terminated and gone() (nothing of it left at the provider,
// what says what). It reports the median (p50-ms), the medians of the
// machine's and the game's steps (coldStartSteps) and, for name, the image
// size.
func benchColdStarts(b *testing.B, v *vmmProc, name, fleet string, imageBytes int64,
	start func(t testing.TB, fleet string, wait bool) api.Process, what string, gone func() bool) {
	for _, c := range []struct{ name, fleet string }{{"local", "cold-local"}, {name, fleet}} {
		b.Run(c.name, func(b *testing.B) {
			b.StopTimer()
			var total, machine, game []float64
			for i := 0; i < b.N; i++ {
				after := lastEventSeq(b, v)
				b.StartTimer()
				t0 := time.Now()
				p := start(b, c.fleet, true)
				d := time.Since(t0)
				b.StopTimer()
				if p.State != api.StateReady {
					b.Fatalf("process %s is %s", p.ID, p.State)
				}
				total = append(total, millis(d))
				steps := coldStartSteps(b, v, after, p)
				machine, game = append(machine, steps[0]), append(game, steps[1])
				call(b, "DELETE", v.url+"/v1/processes/"+p.ID+"?grace=0s", v.token, nil, nil)
				call(b, "DELETE", v.url+"/v1/machines/"+p.MachineID, v.token, nil, nil)
				eventually(b, 60*time.Second, "machine "+p.MachineID+" terminated", func() bool {
					for _, m := range v.machines(b, c.fleet) {
						if m.State != api.MachineTerminated && m.State != api.MachineLost {
							return false
						}
					}
					return true
				})
				eventually(b, 30*time.Second, what, gone)
			}
			b.ReportMetric(median(total), "p50-ms")
			b.ReportMetric(median(machine), "machine-ms")
			b.ReportMetric(median(game), "game-ms")
			if c.name == name {
				b.ReportMetric(float64(imageBytes)/1e6, "image-MB")
			}
			b.Logf("%s cold starts (ms): %v", c.name, fmtMillis(total))
		})
	}
}

// lastEventSeq is the VMM's latest event number (0 when none).
func lastEventSeq(t testing.TB, v *vmmProc) int64 {
	t.Helper()
	var last int64
	readEvents(t, v, 0, func(e api.Event) bool { last = e.Seq; return false })
	return last
}

// readEvents reads the VMM's stored events after seq, calling fn for each
// until it returns true or the replay ends (the stream goes quiet).
func readEvents(t testing.TB, v *vmmProc, after int64, fn func(api.Event) bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", v.url+"/v1/events?after="+strconv.FormatInt(after, 10), nil)
	req.Header.Set("Authorization", "Bearer "+v.token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("events: %v", err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == ": stream open" { // the replay is done
			return
		}
		data, ok := strings.CutPrefix(line, "data: ")
		if !ok {
			continue
		}
		var e api.Event
		if err := json.Unmarshal([]byte(data), &e); err != nil {
			t.Fatalf("event %q: %v", data, err)
		}
		if fn(e) {
			return
		}
	}
}

// coldStartSteps returns the milliseconds of the machine's start (to its
// first report) and of the game's start in process p's cold start, from
// the VMM's events after seq.
func coldStartSteps(t testing.TB, v *vmmProc, after int64, p api.Process) [2]float64 {
	t.Helper()
	at := map[string]time.Time{}
	readEvents(t, v, after, func(e api.Event) bool {
		switch {
		case e.MachineID == p.MachineID && e.ProcessID == "" && strings.HasPrefix(e.Type, "machine."):
			if _, seen := at[e.Type]; !seen {
				at[e.Type] = e.At
			}
		case e.ProcessID == p.ID && e.Type == "process.ready":
			at[e.Type] = e.At
			return true
		}
		return false
	})
	steps := [][2]string{{"machine.provisioning", "machine.ready"}, {"machine.ready", "process.ready"}}
	var out [2]float64
	for i, s := range steps {
		from, ok1 := at[s[0]]
		to, ok2 := at[s[1]]
		if !ok1 || !ok2 {
			keys := make([]string, 0, len(at))
			for k := range at {
				keys = append(keys, k)
			}
			sort.Strings(keys)
			t.Fatalf("cold start of %s: events %v lack %s or %s", p.ID, keys, s[0], s[1])
		}
		out[i] = millis(to.Sub(from))
	}
	return out
}
