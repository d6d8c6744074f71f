package e2e

import (
	"bufio"
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"dedi.dev/dedi/api"
)

// sleeper is a fleet command that runs long and costs nothing; it never
// calls ready, so the start timeout is set high.
func sleeperFleet(name string, perMachine, max int, placement string) api.Fleet {
	return api.Fleet{Name: name, Command: []string{"/bin/sleep", "3600"}, ProcessesPerMachine: perMachine,
		Ports: []string{}, Placement: placement, Health: api.Health{StartTimeoutSeconds: 3600},
		Scaling: api.Scaling{MaxMachines: max, IdleShutdownSeconds: 3600}}
}

func TestVMMProvisionsOnDemandAndPacks(t *testing.T) {
	t.Parallel()
	v := startVMM(t)
	v.fleet(t, sleeperFleet("packed", 2, 3, api.PlacementPacked))
	var ps []api.Process
	for i := 0; i < 3; i++ {
		ps = append(ps, v.start1(t, "packed", false))
	}
	if ps[0].MachineID != ps[1].MachineID || ps[2].MachineID == ps[0].MachineID {
		t.Fatalf("packed placement put processes on %s %s %s", ps[0].MachineID, ps[1].MachineID, ps[2].MachineID)
	}
	if ms := v.machines(t, "packed"); len(ms) != 2 {
		t.Fatalf("%d machines for 3 processes of 2 per machine", len(ms))
	}
	// An echo fleet, answering UDP through the machine's own address.
	v.fleet(t, api.Fleet{Name: "echo", Scaling: api.Scaling{MaxMachines: 1}})
	p := v.start1(t, "echo", true)
	if p.State != api.StateReady || !strings.HasPrefix(p.Address, "127.0.0.") || p.Address == "127.0.0.1" {
		t.Fatalf("process %+v", p)
	}
	if got := udpEcho(t, p.Address, p.Ports["game"], "ping"); got != "ping" {
		t.Fatalf("echo = %q", got)
	}
}

func TestVMMDistributedSpreads(t *testing.T) {
	t.Parallel()
	v := startVMM(t)
	f := sleeperFleet("spread", 4, 2, api.PlacementDistributed)
	f.Scaling.MinMachines = 2
	v.fleet(t, f)
	eventually(t, 20*time.Second, "two ready machines", func() bool {
		n := 0
		for _, m := range v.machines(t, "spread") {
			if m.State == api.MachineReady {
				n++
			}
		}
		return n == 2
	})
	a, b := v.start1(t, "spread", false), v.start1(t, "spread", false)
	if a.MachineID == b.MachineID {
		t.Fatalf("distributed placement put both on %s", a.MachineID)
	}
}

func TestVMMIdleMachineShutsDownThroughHandshake(t *testing.T) {
	t.Parallel()
	v := startVMM(t)
	f := api.Fleet{Name: "idle", Scaling: api.Scaling{MaxMachines: 1, IdleShutdownSeconds: 0.5}}
	v.fleet(t, f)
	p := v.start1(t, "idle", true)
	ms := v.machines(t, "idle")
	if len(ms) != 1 {
		t.Fatalf("%d machines", len(ms))
	}
	time.Sleep(800 * time.Millisecond)
	// Busy: a machine running a process is never shut down.
	if m := v.machines(t, "idle")[0]; m.State != api.MachineReady {
		t.Fatalf("a busy machine went %s", m.State)
	}
	if code, raw := call(t, "DELETE", v.url+"/v1/processes/"+p.ID, v.token, nil, nil); code != http.StatusAccepted {
		t.Fatalf("stop: %d %s", code, raw)
	}
	eventually(t, 20*time.Second, "the idle machine terminated", func() bool {
		return v.machines(t, "idle")[0].State == api.MachineTerminated
	})
	if got := v.process(t, p.ID); got.State != api.StateKilled {
		t.Fatalf("process %s", got.State)
	}
	waitDead(t, p.PID, 5*time.Second)
	if dirs, _ := filepath.Glob(filepath.Join(v.dataDir, "machines", "machines", "*")); len(dirs) != 0 {
		t.Fatalf("provider left %v", dirs)
	}
}

func TestVMMSilentMachineIsLost(t *testing.T) {
	t.Parallel()
	v := startVMM(t)
	v.fleet(t, api.Fleet{Name: "lost", Scaling: api.Scaling{MaxMachines: 2}})
	p := v.start1(t, "lost", true)
	// kill -9 the machine's LSPM and its game: the machine goes silent.
	mdir := filepath.Join(v.dataDir, "machines", "machines", p.MachineID)
	raw, err := os.ReadFile(filepath.Join(mdir, "machine.json"))
	if err != nil {
		t.Fatal(err)
	}
	var mj struct {
		PID int `json:"pid"`
	}
	if err := json.Unmarshal(raw, &mj); err != nil || mj.PID == 0 {
		t.Fatalf("machine.json %s: %v", raw, err)
	}
	_ = syscall.Kill(mj.PID, syscall.SIGKILL)
	killUnder(filepath.Join(mdir, "lspm"))
	eventually(t, 10*time.Second, "the machine lost", func() bool {
		for _, m := range v.machines(t, "lost") {
			if m.ID == p.MachineID {
				return m.State == api.MachineLost
			}
		}
		return false
	})
	if got := v.process(t, p.ID); got.State != api.StateLost || got.Exit == nil || got.Exit.Reason != api.ReasonLost {
		t.Fatalf("process on a lost machine: %s %+v", got.State, got.Exit)
	}
	// A new start goes to a new machine.
	q := v.start1(t, "lost", true)
	if q.MachineID == p.MachineID {
		t.Fatal("placed on the lost machine")
	}
}

// kill -9 of the VMM loses nothing it acknowledged, leaks no machine, and
// a process that ended while it was down shows its real end after restart.
func TestVMMKill9AndRestartLosesNothing(t *testing.T) {
	t.Parallel()
	v := startVMM(t)
	v.fleet(t, api.Fleet{Name: "keep", Scaling: api.Scaling{MaxMachines: 1}})
	v.fleet(t, api.Fleet{Name: "dies", Command: []string{"/bin/sh", "-c", "sleep 1; exit 3"}, Ports: []string{},
		Health: api.Health{StartTimeoutSeconds: 3600}, Scaling: api.Scaling{MaxMachines: 1}})
	keep := v.start1(t, "keep", true)
	dies := v.start1(t, "dies", false)

	v.kill9()
	time.Sleep(1500 * time.Millisecond) // "dies" ends while no VMM runs
	v.start()

	eventually(t, 5*time.Second, "the end seen after the restart", func() bool {
		p := v.process(t, dies.ID)
		return p.State == api.StateCrashed && p.Exit != nil && p.Exit.Code != nil && *p.Exit.Code == 3
	})
	if p := v.process(t, keep.ID); p.State != api.StateReady {
		t.Fatalf("keep is %s", p.State)
	}
	var fl api.List[api.Fleet]
	call(t, "GET", v.url+"/v1/fleets", v.token, nil, &fl)
	var pl api.List[api.Process]
	call(t, "GET", v.url+"/v1/processes", v.token, nil, &pl)
	var ml api.List[api.Machine]
	call(t, "GET", v.url+"/v1/machines", v.token, nil, &ml)
	if len(fl.Items) != 2 || len(pl.Items) != 2 || len(ml.Items) != 2 {
		t.Fatalf("after restart: %d fleets, %d processes, %d machines", len(fl.Items), len(pl.Items), len(ml.Items))
	}
	for _, m := range ml.Items {
		if m.State != api.MachineReady {
			t.Fatalf("machine %s is %s", m.ID, m.State)
		}
	}
	// The machine is found again: a new process joins it, no new machine.
	again := v.start1(t, "keep", true)
	if again.MachineID != keep.MachineID {
		t.Fatalf("a new machine %s after restart, want %s", again.MachineID, keep.MachineID)
	}
	if dirs, _ := filepath.Glob(filepath.Join(v.dataDir, "machines", "machines", "*")); len(dirs) != 2 {
		t.Fatalf("%d machine dirs", len(dirs))
	}
}

func TestVMMConcurrentStartsNeverOversubscribe(t *testing.T) {
	t.Parallel()
	v := startVMM(t)
	v.fleet(t, sleeperFleet("rush", 4, 3, api.PlacementPacked))
	const n = 200
	var wg sync.WaitGroup
	var mu sync.Mutex
	codes := map[int]int{}
	var placed []api.Process
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var p api.Process
			code, raw := call(t, "POST", v.url+"/v1/processes", v.token, api.StartRequest{Fleet: "rush"}, &p)
			mu.Lock()
			defer mu.Unlock()
			codes[code]++
			switch code {
			case http.StatusCreated:
				placed = append(placed, p)
			case http.StatusServiceUnavailable:
				if pr := problemOf(t, raw); pr.Code != api.CodeNoCapacity {
					t.Errorf("503 with code %s", pr.Code)
				}
			default:
				t.Errorf("start: %d %s", code, raw)
			}
		}()
	}
	wg.Wait()
	if codes[http.StatusCreated] != 12 || codes[http.StatusServiceUnavailable] != n-12 {
		t.Fatalf("answers %v, want 12 placed and %d no_capacity", codes, n-12)
	}
	per := map[string]int{}
	for _, p := range placed {
		per[p.MachineID]++
	}
	ms := v.machines(t, "rush")
	if len(ms) != 3 || len(per) != 3 {
		t.Fatalf("%d machines, processes on %d", len(ms), len(per))
	}
	for m, c := range per {
		if c > 4 {
			t.Fatalf("machine %s got %d processes, room for 4", m, c)
		}
	}
}

func TestVMMEventsAndMetrics(t *testing.T) {
	t.Parallel()
	v := startVMM(t)
	req, _ := http.NewRequest("GET", v.url+"/v1/events", nil)
	req.Header.Set("Authorization", "Bearer "+v.token)
	resp, err := (&http.Client{}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
		t.Fatalf("events: %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	got := make(chan api.Event, 100)
	go func() {
		sc := bufio.NewScanner(resp.Body)
		for sc.Scan() {
			if data, ok := strings.CutPrefix(sc.Text(), "data: "); ok {
				var e api.Event
				if json.Unmarshal([]byte(data), &e) == nil {
					got <- e
				}
			}
		}
		close(got)
	}()
	v.fleet(t, api.Fleet{Name: "ev", Scaling: api.Scaling{MaxMachines: 1}})
	p := v.start1(t, "ev", true)
	want := map[string]bool{"fleet.created": false, "machine.provisioning": false, "machine.ready": false, "process.ready": false}
	deadline := time.After(10 * time.Second)
	for missing := len(want); missing > 0; {
		select {
		case e, ok := <-got:
			if !ok {
				t.Fatal("event stream ended")
			}
			if seen, ok := want[e.Type]; ok && !seen && (e.Type != "process.ready" || e.ProcessID == p.ID) {
				want[e.Type] = true
				missing--
			}
		case <-deadline:
			t.Fatalf("events seen: %v", want)
		}
	}
	code, raw := call(t, "GET", v.url+"/metrics", v.token, nil, nil)
	body := string(raw)
	for _, m := range []string{`dedi_machines{fleet="ev",state="ready"} 1`, `dedi_processes{fleet="ev",state="ready"} 1`, "dedi_placement_seconds_bucket", "dedi_report_lag_seconds_count"} {
		if code != 200 || !strings.Contains(body, m) {
			t.Fatalf("metrics lack %q:\n%s", m, body)
		}
	}
}
