package e2e

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"dedi.dev/dedi/api"
	"dedi.dev/dedi/internal/provider/sim"
)

// Benchmarks of the VMM's figures (docs/BENCHMARKS.md):
//
//	go test ./test/e2e -run '^$' -bench PlacementWarm -benchtime 480x -count 5
//	go test ./test/e2e -run '^$' -bench ColdStartLocal -benchtime 20x -count 5
//	go test ./test/e2e -run '^$' -bench StatusIngest -benchtime 1x -timeout 30m
//
// Each benchmark starts one VMM (startVMM) in its parent and shares it
// with its sub-benchmarks and their -count runs, so a run uses one
// loopback block.

// placementClients is how many clients place processes at once.
const placementClients = 8

// warmFleet makes a fleet whose two machines are up before the timer
// starts: 2 x perMachine slots, never shut down for idleness.
func warmFleet(b *testing.B, v *vmmProc, f api.Fleet) {
	b.Helper()
	name := f.Name
	if code, _ := call(b, "GET", v.url+"/v1/fleets/"+name, v.token, nil, nil); code == http.StatusOK {
		return // made by an earlier run of the same benchmark
	}
	// A command that never reports ready must not be killed for it.
	f.Health = api.Health{StartTimeoutSeconds: 86400}
	f.Scaling = api.Scaling{MinMachines: 2, MaxMachines: 2, IdleShutdownSeconds: 3600}
	v.fleet(b, f)
	eventually(b, 60*time.Second, "two machines of "+name+" ready", func() bool {
		n := 0
		for _, m := range v.machines(b, name) {
			if m.State == api.MachineReady {
				n++
			}
		}
		return n == 2
	})
	// One start and stop on each machine: shim pools and connections warm.
	hc := placementClient()
	var ids []string
	for i := 0; i < 2*f.ProcessesPerMachine; i++ {
		p, _, err := placeOne(hc, v, name, false)
		if err != nil {
			b.Fatal(err)
		}
		ids = append(ids, p.ID)
	}
	stopAll(b, v, name, ids)
}

func placementClient() *http.Client {
	return &http.Client{Timeout: 60 * time.Second,
		Transport: &http.Transport{MaxIdleConnsPerHost: placementClients, MaxIdleConns: placementClients}}
}

// placeOne sends POST /v1/processes (?wait=ready) and returns the process
// and the time to its 201. It may run off the benchmark's goroutine.
func placeOne(hc *http.Client, v *vmmProc, fleet string, wait bool) (api.Process, time.Duration, error) {
	url := v.url + "/v1/processes"
	if wait {
		url += "?wait=ready&timeout=30s"
	}
	body, _ := json.Marshal(api.StartRequest{Fleet: fleet})
	req, _ := http.NewRequest("POST", url, bytes.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+v.token)
	req.Header.Set("Content-Type", "application/json")
	t0 := time.Now()
	resp, err := hc.Do(req)
	if err != nil {
		return api.Process{}, 0, fmt.Errorf("place: %w", err)
	}
	raw, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	d := time.Since(t0)
	var p api.Process
	if resp.StatusCode != http.StatusCreated || json.Unmarshal(raw, &p) != nil {
		return api.Process{}, 0, fmt.Errorf("place: %d %s", resp.StatusCode, raw)
	}
	return p, d, nil
}

// stopAll stops the processes and waits until the VMM has seen every
// machine of the fleet empty again.
func stopAll(b *testing.B, v *vmmProc, fleet string, ids []string) {
	b.Helper()
	var wg sync.WaitGroup
	sem := make(chan struct{}, placementClients)
	for _, id := range ids {
		wg.Add(1)
		sem <- struct{}{}
		go func(id string) {
			defer wg.Done()
			defer func() { <-sem }()
			req, _ := http.NewRequest("DELETE", v.url+"/v1/processes/"+id+"?grace=0s", nil)
			req.Header.Set("Authorization", "Bearer "+v.token)
			resp, err := client.Do(req)
			if err != nil {
				b.Errorf("stop %s: %v", id, err)
				return
			}
			raw, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusAccepted {
				b.Errorf("stop %s: %d %s", id, resp.StatusCode, raw)
			}
		}(id)
	}
	wg.Wait()
	eventually(b, 60*time.Second, "machines of "+fleet+" empty", func() bool {
		for _, m := range v.machines(b, fleet) {
			if m.State == api.MachineReady && m.ProcessCount > 0 {
				return false
			}
		}
		return true
	})
}

// benchPlacement places b.N processes from placementClients concurrent
// clients in rounds that leave placementClients of the fleet's slots free
// (machines with room: a placement never races another for the last
// slot), stopping them between rounds outside the timer; it reports
// p50-ms, p99-ms and placements/s (over the timed rounds).
func benchPlacement(b *testing.B, v *vmmProc, f api.Fleet, wait bool) {
	b.StopTimer()
	warmFleet(b, v, f)
	fleet := f.Name
	hc := placementClient()
	var lat []time.Duration
	var timed time.Duration
	b.ResetTimer()
	for done := 0; done < b.N; {
		n := min(b.N-done, 2*f.ProcessesPerMachine-placementClients)
		ids := make([]string, n)
		lats := make([]time.Duration, n)
		var next atomic.Int64
		var wg sync.WaitGroup
		t0 := time.Now()
		b.StartTimer()
		for c := 0; c < placementClients; c++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					i := int(next.Add(1) - 1)
					if i >= n {
						return
					}
					p, d, err := placeOne(hc, v, fleet, wait)
					if err != nil {
						b.Error(err)
						next.Store(int64(n)) // stop the others
						return
					}
					ids[i], lats[i] = p.ID, d
				}
			}()
		}
		wg.Wait()
		b.StopTimer()
		timed += time.Since(t0)
		if b.Failed() {
			for _, m := range v.machines(b, fleet) {
				b.Logf("machine %s: %s, %d of %d processes, last report %v", m.ID, m.State, m.ProcessCount, m.MaxProcesses, m.LastReportAt)
			}
			var placed []string
			for _, id := range ids {
				if id != "" {
					placed = append(placed, id)
				}
			}
			stopAll(b, v, fleet, placed) // the fleet is left empty for the next run
			b.FailNow()
		}
		lat = append(lat, lats...)
		done += n
		stopAll(b, v, fleet, ids)
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
	b.ReportMetric(float64(len(lat))/timed.Seconds(), "placements/s")
}

// BenchmarkPlacementWarm: POST /v1/processes on two machines with room
// (local provider, 64 slots each), from 8 concurrent clients. "answer":
// 201 once the LSPM accepted the spawn, the game's own start excluded (the
// command is /bin/sleep, which never reports ready); "ready": ?wait=ready
// with the echo example, 201 once a status report shows it ready;
// "vmm-only": as "answer" on two sim machines (500 slots each) whose LSPM
// is a stand-in that accepts every spawn at once (stubLSPM), so only the
// VMM's own work is timed.
func BenchmarkPlacementWarm(b *testing.B) {
	simDir := filepath.Join(b.TempDir(), "sim")
	stub := startStubLSPM(b, simDir)
	// DEDI_BENCH_VMM_ARGS adds VMM flags (--pprof-listen 127.0.0.1:6060, say).
	v := startVMM(b, append([]string{"--sim-provider-dir", simDir}, strings.Fields(os.Getenv("DEDI_BENCH_VMM_ARGS"))...)...)
	stub.run(b, v)
	b.Run("answer", func(b *testing.B) {
		benchPlacement(b, v, api.Fleet{Name: "warm-sleep", Command: []string{"/bin/sleep", "3600"}, ProcessesPerMachine: 64}, false)
	})
	b.Run("ready", func(b *testing.B) {
		benchPlacement(b, v, api.Fleet{Name: "warm-echo", Command: []string{echoBin}, ProcessesPerMachine: 64}, true)
	})
	b.Run("vmm-only", func(b *testing.B) {
		benchPlacement(b, v, api.Fleet{Name: "warm-stub", Provider: "sim", Command: []string{"/opt/game/server"}, ProcessesPerMachine: 500}, false)
	})
}

// stubLSPM stands in for the LSPMs of every sim machine (sim.URLFile
// points them here): it accepts each spawn at once, kills at once, and
// reports each machine's processes to the VMM every 100 ms, as an LSPM
// would, with the machine's token from the sim provider's machine log.
type stubLSPM struct {
	srv    *httptest.Server
	simDir string
	stop   chan struct{}
	done   chan struct{}

	mu       sync.Mutex
	byToken  map[string]string                 // machine token -> machine id
	tokens   map[string]string                 // machine id -> token
	live     map[string]map[string]api.Process // machine -> process id -> process
	ended    map[string][]api.Process          // machine -> ended since its last report
	endedAll map[string]api.Process            // for GET of an ended process
	seq      map[string]uint64
}

func startStubLSPM(b *testing.B, simDir string) *stubLSPM {
	s := &stubLSPM{simDir: simDir, stop: make(chan struct{}), done: make(chan struct{}),
		byToken: map[string]string{}, tokens: map[string]string{}, live: map[string]map[string]api.Process{},
		ended: map[string][]api.Process{}, endedAll: map[string]api.Process{}, seq: map[string]uint64{}}
	s.srv = httptest.NewServer(s)
	if err := os.MkdirAll(simDir, 0o700); err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(simDir, sim.URLFile), []byte(s.srv.URL), 0o600); err != nil {
		b.Fatal(err)
	}
	return s
}

// run starts the reports to v; they stop, and the server closes, at the
// end of b (before the VMM is killed).
func (s *stubLSPM) run(b *testing.B, v *vmmProc) {
	hc := &http.Client{Timeout: 10 * time.Second}
	go func() {
		defer close(s.done)
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-s.stop:
				return
			case <-t.C:
			}
			s.readTokens()
			for _, r := range s.reports() {
				req, _ := http.NewRequest("POST", v.url+"/v1/machines/"+r.st.MachineID+"/status", bytes.NewReader(r.body))
				req.Header.Set("Authorization", "Bearer "+r.token)
				req.Header.Set("Content-Type", "application/json")
				if resp, err := hc.Do(req); err == nil {
					_, _ = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
			}
		}
	}()
	b.Cleanup(func() {
		close(s.stop)
		<-s.done
		s.srv.Close()
	})
}

func (s *stubLSPM) readTokens() {
	f, err := os.Open(filepath.Join(s.simDir, sim.File))
	if err != nil {
		return
	}
	defer f.Close()
	recs, _ := sim.ReadRecords(f)
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, r := range recs {
		if r.Deleted {
			delete(s.byToken, s.tokens[r.MachineID])
			delete(s.tokens, r.MachineID)
			delete(s.live, r.MachineID)
			continue
		}
		s.byToken[r.Token], s.tokens[r.MachineID] = r.MachineID, r.Token
		if s.live[r.MachineID] == nil {
			s.live[r.MachineID] = map[string]api.Process{}
		}
	}
}

type stubReport struct {
	st    api.Status
	token string
	body  []byte
}

// reports are every machine's next status report.
func (s *stubLSPM) reports() []stubReport {
	s.mu.Lock()
	var out []stubReport
	now := time.Now().UTC()
	for id, procs := range s.live {
		s.seq[id]++
		st := api.Status{MachineID: id, State: api.LoadPartial, Seq: s.seq[id], MaxProcesses: 500,
			Processes: []api.Process{}, Ended: s.ended[id], Hardware: api.Hardware{CPUModel: "stub", CPUs: 1, Hostname: id},
			StartedAt: now, At: now}
		if len(procs) == 0 {
			st.State = api.LoadEmpty
		}
		for _, p := range procs {
			st.Processes = append(st.Processes, p)
		}
		delete(s.ended, id)
		out = append(out, stubReport{st: st, token: s.tokens[id]})
	}
	s.mu.Unlock()
	// Encoded outside the lock, as an LSPM encodes its report off its
	// loop: spawns must not wait behind the encoding of 500 processes.
	for i := range out {
		out[i].body, _ = json.Marshal(out[i].st)
	}
	return out
}

func (s *stubLSPM) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	machine := s.byToken[strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")]
	if machine == "" {
		http.Error(w, `{"code":"unauthorized"}`, http.StatusUnauthorized)
		return
	}
	reply := func(code int, v any) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(code)
		_ = json.NewEncoder(w).Encode(v)
	}
	id := strings.TrimPrefix(r.URL.Path, "/v1/processes/")
	switch {
	case r.Method == "POST" && r.URL.Path == "/v1/processes":
		var req api.SpawnRequest
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil || req.ID == "" {
			reply(http.StatusBadRequest, api.Problem{Code: "bad_request"})
			return
		}
		p := api.Process{ID: req.ID, Fleet: req.Fleet, MachineID: machine, State: api.StateStarting, PID: 1,
			Command: req.Command, Params: req.Params, Labels: req.Labels, Address: sim.Address,
			Ports: map[string]int{}, CreatedAt: time.Now().UTC()}
		s.live[machine][p.ID] = p
		reply(http.StatusCreated, p)
	case r.Method == "DELETE" && id != r.URL.Path:
		p, ok := s.live[machine][id]
		if !ok {
			reply(http.StatusNotFound, api.Problem{Code: "not_found"})
			return
		}
		now := time.Now().UTC()
		p.State, p.EndedAt, p.Exit = api.StateKilled, &now, &api.Exit{Reason: api.ReasonKilled, LogTail: []string{}}
		delete(s.live[machine], id)
		s.ended[machine] = append(s.ended[machine], p)
		s.endedAll[id] = p
		reply(http.StatusAccepted, p)
	case r.Method == "GET" && id != r.URL.Path:
		if p, ok := s.live[machine][id]; ok {
			reply(http.StatusOK, p)
		} else if p, ok := s.endedAll[id]; ok {
			reply(http.StatusOK, p)
		} else {
			reply(http.StatusNotFound, api.Problem{Code: "not_found"})
		}
	default:
		reply(http.StatusNotFound, api.Problem{Code: "not_found"})
	}
}

// BenchmarkColdStartLocal: POST /v1/processes?wait=ready with no machine
// up, until the 201: the local provider starts a machine (an LSPM), it
// reports, the echo example is spawned on it and is ready. Between
// iterations, outside the timer, the process and the machine are deleted
// and the benchmark waits until the machine is terminated. The time per op
// is the figure.
func BenchmarkColdStartLocal(b *testing.B) {
	v := startVMM(b)
	v.fleet(b, api.Fleet{Name: "cold", Scaling: api.Scaling{MaxMachines: 2, IdleShutdownSeconds: 3600}})
	b.Run("echo", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			p := v.start1(b, "cold", true)
			b.StopTimer()
			if p.State != api.StateReady {
				b.Fatalf("process %s is %s", p.ID, p.State)
			}
			call(b, "DELETE", v.url+"/v1/processes/"+p.ID+"?grace=0s", v.token, nil, nil)
			call(b, "DELETE", v.url+"/v1/machines/"+p.MachineID, v.token, nil, nil)
			eventually(b, 60*time.Second, "machine "+p.MachineID+" terminated", func() bool {
				for _, m := range v.machines(b, "cold") {
					if m.State != api.MachineTerminated && m.State != api.MachineLost {
						return false
					}
				}
				return true
			})
			b.StartTimer()
		}
	})
}

// BenchmarkStatusIngest: the VMM's CPU (vmm-cores) and peak RSS
// (vmm-rss-MiB) while test/loadgen simulates LSPMs of the sim provider
// reporting over HTTP, measured for -duration after the warm-up (the
// processes appearing over the first reports, then one interval); with
// the reports answered per second, their p99, and the signs of a VMM that
// does not keep up (reports skipped, cut, not applied). Run it with
// -benchtime 1x; at full size it takes about 2.5 minutes. The loadgen's
// flags are "-machines 10000 -processes 32 -interval 5s -duration 30s",
// then DEDI_BENCH_INGEST's (for example "-machines 1000 -churn 1").
func BenchmarkStatusIngest(b *testing.B) {
	loadgen := filepath.Join(b.TempDir(), "loadgen")
	if out, err := exec.Command("go", "build", "-o", loadgen, "dedi.dev/dedi/test/loadgen").CombinedOutput(); err != nil {
		b.Fatalf("build loadgen: %v\n%s", err, out)
	}
	args := []string{"-machines", "10000", "-processes", "32", "-interval", "5s", "-duration", "30s"}
	args = append(args, strings.Fields(os.Getenv("DEDI_BENCH_INGEST"))...)
	interval := "5s"
	for i, a := range args {
		if (a == "-interval" || a == "--interval") && i+1 < len(args) {
			interval = args[i+1]
		}
	}
	for i := 0; i < b.N; i++ {
		simDir := filepath.Join(b.TempDir(), "sim")
		// The VMM's report interval is the loadgen's: a machine silent
		// for three of them is lost.
		// DEDI_BENCH_VMM_ARGS adds VMM flags (--pprof-listen 127.0.0.1:6060, say).
		v := startVMM(b, append([]string{"--sim-provider-dir", simDir, "--report-interval", interval, "--boot-timeout", "10m"},
			strings.Fields(os.Getenv("DEDI_BENCH_VMM_ARGS"))...)...)
		cmd := exec.Command(loadgen, append([]string{"-vmm", v.url, "-token", v.token, "-sim-dir", simDir,
			"-fleet", "ingest", "-pid", strconv.Itoa(v.cmd.Process.Pid)}, args...)...)
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Run(); err != nil {
			b.Fatalf("loadgen %v: %v\n%s", args, err, out.String())
		}
		metrics := map[string]float64{}
		sc := bufio.NewScanner(&out)
		for sc.Scan() {
			line := sc.Text()
			if rest, ok := strings.CutPrefix(line, "RESULT "); ok {
				for _, kv := range strings.Fields(rest) {
					k, val, _ := strings.Cut(kv, "=")
					if x, err := strconv.ParseFloat(val, 64); err == nil {
						metrics[k] = x
					}
				}
			} else if !strings.Contains(line, " t=") {
				b.Log(line)
			}
		}
		if _, ok := metrics["vmm-cores"]; !ok {
			b.Fatalf("no RESULT line from loadgen:\n%s", out.String())
		}
		for _, k := range []string{"vmm-cores", "vmm-rss-MiB", "reports/s", "target-reports/s", "p99-ms", "failed", "cut", "skipped", "not-applied",
			"vmm-ms-per-report", "vmm-cores-at-target", "loadgen-cores"} {
			b.ReportMetric(metrics[k], k)
		}
		v.kill9()
	}
}
