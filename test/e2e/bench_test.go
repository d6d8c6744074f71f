package e2e

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"dedi.dev/dedi/api"
)

// Benchmarks of the LSPM's figures (docs/BENCHMARKS.md). Run them with
// scripts/bench.sh, which takes medians of several runs; each compares
// against a baseline measured in the same run where one exists.

// readySink is a stand-in LSPM for the fork/exec baseline: it answers the
// SDK's ready and heartbeat calls and signals each ready.
type readySink struct {
	mu    sync.Mutex
	ready map[string]chan struct{}
}

func (s *readySink) expect(id string) chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	c := make(chan struct{})
	s.ready[id] = c
	return c
}

func (s *readySink) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	parts := strings.Split(r.URL.Path, "/") // /v1/processes/{id}/{verb}
	if len(parts) != 5 {
		http.NotFound(w, r)
		return
	}
	id, verb := parts[3], parts[4]
	state := api.StateReady
	if verb == "ready" {
		s.mu.Lock()
		if c, ok := s.ready[id]; ok {
			close(c)
			delete(s.ready, id)
		}
		s.mu.Unlock()
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(api.Process{ID: id, State: state})
}

// forkExecEcho starts the echo example directly, as a bare fork/exec, with
// the environment the LSPM would give it.
func forkExecEcho(b *testing.B, sinkURL, id string, port int) *exec.Cmd {
	cmd := exec.Command(echoBin)
	cmd.Env = []string{
		"PATH=" + os.Getenv("PATH"),
		api.EnvProcessID + "=" + id, api.EnvProcessToken + "=t", api.EnvSDKURL + "=" + sinkURL,
		api.EnvParams + "={}", api.EnvMachineID + "=m", api.EnvFleet + "=",
		api.EnvPortPrefix + "GAME=" + strconv.Itoa(port), api.EnvHeartbeatMS + "=2000",
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	return cmd
}

// waitReadyPoll polls the LSPM until the process is ready.
func (l *lspm) waitReadyPoll(b *testing.B, id string) {
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		var p api.Process
		call(b, "GET", l.url+"/v1/processes/"+id, l.token, nil, &p)
		if p.State == api.StateReady {
			return
		}
		if api.IsTerminal(p.State) {
			b.Fatalf("process %s ended: %+v", id, p.Exit)
		}
		time.Sleep(200 * time.Microsecond)
	}
	b.Fatalf("process %s not ready", id)
}

// benchSpacing separates single spawns, as spawns in a fleet come apart;
// both sides of a comparison get the same.
var benchSpacing = 100 * time.Millisecond

// BenchmarkSpawnToReady: POST /v1/processes until the echo example is
// ready, against the same binary started by a bare fork/exec that waits for
// the same readiness signal.
func BenchmarkSpawnToReady(b *testing.B) {
	b.Run("forkexec", func(b *testing.B) {
		sink := &readySink{ready: map[string]chan struct{}{}}
		srv := httptest.NewServer(sink)
		defer srv.Close()
		port := 39000
		for i := 0; i < b.N; i++ {
			id := fmt.Sprintf("b-%d", i)
			ready := sink.expect(id)
			cmd := forkExecEcho(b, srv.URL, id, port)
			<-ready
			b.StopTimer()
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			_ = cmd.Wait()
			time.Sleep(benchSpacing)
			b.StartTimer()
		}
	})
	b.Run("lspm", func(b *testing.B) {
		// Readiness is seen as the control plane sees it: in the status
		// report the LSPM pushes on the change, not by polling.
		vmm := newReadyVMM()
		srv := httptest.NewServer(vmm)
		defer srv.Close()
		l := startLSPM(b, lspmOpts{maxProcesses: 4, extra: append([]string{"--vmm-url", srv.URL}, strings.Fields(os.Getenv("DEDI_BENCH_LSPM_FLAGS"))...)})
		for i := 0; i < b.N; i++ {
			id := fmt.Sprintf("b-%d", i)
			ready := vmm.expect(id)
			l.spawn(b, api.SpawnRequest{ID: id})
			<-ready
			b.StopTimer()
			p := l.get(b, id)
			call(b, "DELETE", l.url+"/v1/processes/"+id+"?grace=0s", l.token, nil, nil)
			waitDead(b, p.PID, 10*time.Second)
			time.Sleep(benchSpacing) // spawns come apart, as in a fleet
			b.StartTimer()
		}
	})
}

// readyVMM is a stand-in VMM that signals when a status report first shows
// a process ready.
type readyVMM struct {
	mu    sync.Mutex
	ready map[string]chan struct{}
}

func newReadyVMM() *readyVMM { return &readyVMM{ready: map[string]chan struct{}{}} }

func (v *readyVMM) expect(id string) chan struct{} {
	v.mu.Lock()
	defer v.mu.Unlock()
	c := make(chan struct{})
	v.ready[id] = c
	return c
}

func (v *readyVMM) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	var st api.Status
	if err := json.NewDecoder(r.Body).Decode(&st); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	v.mu.Lock()
	for _, p := range st.Processes {
		if c, ok := v.ready[p.ID]; ok && p.State == api.StateReady {
			close(c)
			delete(v.ready, p.ID)
		}
	}
	v.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write([]byte(`{"applied":true}`))
}

// BenchmarkSpawn100: 100 echo servers started at once until all are ready.
func BenchmarkSpawn100(b *testing.B) {
	const n = 100
	b.Run("forkexec", func(b *testing.B) {
		sink := &readySink{ready: map[string]chan struct{}{}}
		srv := httptest.NewServer(sink)
		defer srv.Close()
		for i := 0; i < b.N; i++ {
			cmds := make([]*exec.Cmd, n)
			readies := make([]chan struct{}, n)
			for j := 0; j < n; j++ {
				id := fmt.Sprintf("b-%d-%d", i, j)
				readies[j] = sink.expect(id)
				cmds[j] = forkExecEcho(b, srv.URL, id, 39100+j)
			}
			for _, r := range readies {
				<-r
			}
			b.StopTimer()
			for _, c := range cmds {
				_ = syscall.Kill(-c.Process.Pid, syscall.SIGKILL)
				_ = c.Wait()
			}
			b.StartTimer()
		}
	})
	b.Run("lspm", func(b *testing.B) {
		l := startLSPM(b, lspmOpts{maxProcesses: n, ports: 200})
		for i := 0; i < b.N; i++ {
			var wg sync.WaitGroup
			ps := make([]api.Process, n)
			for j := 0; j < n; j++ {
				wg.Add(1)
				go func(j int) {
					defer wg.Done()
					ps[j] = l.spawn(b, api.SpawnRequest{})
				}(j)
			}
			wg.Wait()
			// Ready is polled through the list: one request for all.
			deadline := time.Now().Add(30 * time.Second)
			for {
				st := l.status(b)
				ready := 0
				for _, p := range st.Processes {
					if p.State == api.StateReady {
						ready++
					}
				}
				if ready == n {
					break
				}
				if time.Now().After(deadline) {
					b.Fatalf("%d of %d ready", ready, n)
				}
				time.Sleep(time.Millisecond)
			}
			b.StopTimer()
			for _, p := range ps {
				call(b, "DELETE", l.url+"/v1/processes/"+p.ID+"?grace=0s", l.token, nil, nil)
			}
			for _, p := range ps {
				waitDead(b, p.PID, 10*time.Second)
			}
			// Wait until the LSPM has recorded every end (ports free again).
			for len(l.status(b).Processes) > 0 {
				time.Sleep(time.Millisecond)
			}
			b.StartTimer()
		}
	})
}

// BenchmarkCrashDetection: kill -9 of a game server until crashed is
// visible over REST.
func BenchmarkCrashDetection(b *testing.B) {
	l := startLSPM(b, lspmOpts{maxProcesses: 4})
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		p := l.spawn(b, api.SpawnRequest{})
		l.waitReadyPoll(b, p.ID)
		b.StartTimer()
		_ = syscall.Kill(p.PID, syscall.SIGKILL)
		for {
			var got api.Process
			call(b, "GET", l.url+"/v1/processes/"+p.ID, l.token, nil, &got)
			if got.State == api.StateCrashed {
				break
			}
			time.Sleep(100 * time.Microsecond)
		}
	}
}

func rssOf(b *testing.B, pid int) float64 {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(string(raw), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.Atoi(strings.Fields(rest)[0])
			return float64(kb) / 1024
		}
	}
	b.Fatal("no VmRSS")
	return 0
}

// BenchmarkLSPMMemory reports the LSPM's RSS idle and with 50 live
// processes (metrics idle-MiB and 50proc-MiB; the time per op is not a
// figure).
func BenchmarkLSPMMemory(b *testing.B) {
	var idle, busy []float64
	for i := 0; i < b.N; i++ {
		l := startLSPM(b, lspmOpts{maxProcesses: 50, ports: 100})
		time.Sleep(300 * time.Millisecond)
		idle = append(idle, rssOf(b, l.cmd.Process.Pid))
		var ps []api.Process
		for j := 0; j < 50; j++ {
			ps = append(ps, l.spawn(b, api.SpawnRequest{Health: &api.Health{PeriodSeconds: 0.5}}))
		}
		for _, p := range ps {
			l.waitReadyPoll(b, p.ID)
		}
		time.Sleep(2 * time.Second) // heartbeats and memory samples flowing
		busy = append(busy, rssOf(b, l.cmd.Process.Pid))
		l.cleanup()
	}
	b.ReportMetric(median(idle), "idle-MiB")
	b.ReportMetric(median(busy), "50proc-MiB")
}

func median(xs []float64) float64 {
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	return s[len(s)/2]
}

// BenchmarkHeartbeats: heartbeats one LSPM sustains from 50 processes,
// with the latency distribution (metrics hb/s and p50-ms, p99-ms). Each op
// is one heartbeat; 8 concurrent senders keep it loaded.
func BenchmarkHeartbeats(b *testing.B) {
	l := startLSPM(b, lspmOpts{maxProcesses: 50, ports: 100})
	type target struct{ id, token string }
	var targets []target
	for j := 0; j < 50; j++ {
		// The fake game server holds a token and sends nothing itself.
		p := l.spawn(b, noPorts(fake("-no-sdk")))
		tok := ""
		for k := 0; k < 500 && tok == ""; k++ {
			env, _ := os.ReadFile(fmt.Sprintf("/proc/%d/environ", p.PID))
			for _, kv := range strings.Split(string(env), "\x00") {
				if v, ok := strings.CutPrefix(kv, api.EnvProcessToken+"="); ok {
					tok = v
				}
			}
			if tok == "" {
				time.Sleep(10 * time.Millisecond)
			}
		}
		targets = append(targets, target{p.ID, tok})
	}
	const senders = 8
	tr := &http.Transport{MaxIdleConnsPerHost: senders}
	hc := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	lat := make([][]time.Duration, senders)
	var wg sync.WaitGroup
	per := b.N/senders + 1
	b.ResetTimer()
	start := time.Now()
	for s := 0; s < senders; s++ {
		wg.Add(1)
		go func(s int) {
			defer wg.Done()
			for i := 0; i < per; i++ {
				tg := targets[(s*per+i)%len(targets)]
				req, _ := http.NewRequest("POST", l.url+"/v1/processes/"+tg.id+"/heartbeat", strings.NewReader(`{"players":3}`))
				req.Header.Set("Authorization", "Bearer "+tg.token)
				t0 := time.Now()
				resp, err := hc.Do(req)
				if err != nil {
					b.Error(err)
					return
				}
				var discard [512]byte
				for {
					if _, err := resp.Body.Read(discard[:]); err != nil {
						break
					}
				}
				resp.Body.Close()
				if resp.StatusCode != 200 {
					b.Errorf("heartbeat: %d", resp.StatusCode)
					return
				}
				lat[s] = append(lat[s], time.Since(t0))
			}
		}(s)
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	var all []time.Duration
	for _, l := range lat {
		all = append(all, l...)
	}
	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	b.ReportMetric(float64(len(all))/elapsed.Seconds(), "hb/s")
	b.ReportMetric(float64(all[len(all)/2].Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(all[len(all)*99/100].Microseconds())/1000, "p99-ms")
}
