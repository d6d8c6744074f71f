// Command loadgen measures the VMM's status-report ingest: it simulates
// many LSPMs, each reporting its live processes to the VMM at a fixed
// interval, and samples the VMM process's CPU and RSS.
//
// The VMM must run with the simulated provider and the report interval of
// the run (a machine silent for 3 intervals is lost), and a boot timeout
// that covers the machines' creation:
//
//	DEDI_TOKEN=$ADMIN dedi vmm --data-dir /tmp/vmm-load --sim-provider-dir /tmp/vmm-load/sim \
//	    --report-interval 5s --boot-timeout 5m --log-level warn &
//	go run ./test/loadgen -vmm http://127.0.0.1:7700 -token $ADMIN -sim-dir /tmp/vmm-load/sim \
//	    -machines 10000 -processes 32 -interval 5s -duration 60s -pid $!
//
// (-duration is the measured window; the warm-up comes before it.)
//
// It creates the fleet (provider "sim") unless it exists, creates the
// machines through POST /v1/machines, learns their tokens from the sim
// provider's machines.jsonl, then sends every machine's report once per
// interval, spread evenly over it, over keep-alive connections. The first
// report of a process makes the VMM adopt it (a store write and an event),
// so processes appear over the first reports (-adopt-rate), and figures
// are taken after a warm-up: that ramp and one more interval. A report "not
// applied" has a stale seq or is of a machine the VMM has found lost (not
// reported for 3 of its intervals): a sign it did not keep up. The last
// line, "RESULT k=v ...", is for scripts (test/e2e's BenchmarkStatusIngest).
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"dedi.dev/dedi/api"
	"dedi.dev/dedi/internal/provider/sim"
)

type config struct {
	vmm, token, fleet, simDir string
	machines, processes       int
	interval, duration        time.Duration
	warmup                    time.Duration
	adoptRate                 float64
	rampRounds                int // reports over which a machine's processes appear (0: all at once)
	concurrency, creators     int
	churn                     float64
	pid                       int
}

func main() {
	var c config
	flag.StringVar(&c.vmm, "vmm", "http://127.0.0.1:7700", "the VMM's base URL")
	flag.StringVar(&c.token, "token", os.Getenv(api.EnvAdminToken), "admin token (default env "+api.EnvAdminToken+")")
	flag.StringVar(&c.fleet, "fleet", "sim", "fleet to create (provider sim) or reuse")
	flag.StringVar(&c.simDir, "sim-dir", "", "the VMM's --sim-provider-dir (required)")
	flag.IntVar(&c.machines, "machines", 10000, "simulated machines")
	flag.IntVar(&c.processes, "processes", 32, "live processes per machine")
	flag.DurationVar(&c.interval, "interval", 5*time.Second, "report interval of each machine")
	flag.DurationVar(&c.duration, "duration", 60*time.Second, "how long to measure, after the warm-up")
	flag.DurationVar(&c.warmup, "warmup", 0, "reports before this are not measured (default: the ramp, then one interval)")
	flag.Float64Var(&c.adoptRate, "adopt-rate", 4000, "processes per second the VMM is shown for the first time during the ramp (0: all in the first report)")
	flag.IntVar(&c.concurrency, "concurrency", 64, "reports in flight at most (and keep-alive connections)")
	flag.IntVar(&c.creators, "create-concurrency", 16, "machine creations in flight at most")
	flag.Float64Var(&c.churn, "churn", 0.1, "fraction of processes whose player count changes in each report")
	flag.IntVar(&c.pid, "pid", 0, "sample this process's CPU and RSS every second (the VMM)")
	flag.Parse()
	// The VMM adopts each process it first hears of in a report (a store
	// write and an event); all at once, a large run's first interval would
	// take it far longer than the lost timeout. So processes appear over
	// the ramp's first reports, at about adoptRate per second.
	if c.adoptRate > 0 {
		c.rampRounds = int(math.Ceil(float64(c.machines*c.processes) / (c.adoptRate * c.interval.Seconds())))
		if c.rampRounds <= 1 {
			c.rampRounds = 0
		}
	}
	if c.warmup == 0 {
		c.warmup = time.Duration(c.rampRounds+1) * c.interval
	}
	switch {
	case c.simDir == "":
		fatalf("-sim-dir is required: the VMM's --sim-provider-dir")
	case c.token == "":
		fatalf("-token (or env %s) is required", api.EnvAdminToken)
	case c.machines < 1 || c.processes < 1 || c.processes > 1000 || c.interval <= 0 || c.concurrency < 1 || c.creators < 1:
		fatalf("machines, processes (1-1000), interval and concurrency must be positive")
	case c.duration <= 0:
		fatalf("-duration must be positive")
	}
	ctx := context.Background()
	if err := run(ctx, c); err != nil {
		fatalf("%v", err)
	}
}

func fatalf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "loadgen: "+format+"\n", args...)
	os.Exit(1)
}

func logf(format string, args ...any) {
	fmt.Printf("%s "+format+"\n", append([]any{time.Now().Format("15:04:05.000")}, args...)...)
}

func run(ctx context.Context, c config) error {
	admin := &http.Client{Timeout: 30 * time.Second}
	if err := ensureFleet(admin, c); err != nil {
		return err
	}
	t0 := time.Now()
	ids, err := createMachines(admin, c)
	if err != nil {
		return err
	}
	logf("created %d machines in %s", len(ids), time.Since(t0).Round(time.Millisecond))
	tokens, err := waitTokens(ctx, filepath.Join(c.simDir, sim.File), ids, 2*time.Minute)
	if err != nil {
		return err
	}
	ms := make([]*machine, len(ids))
	for i, id := range ids {
		ms[i] = &machine{id: id, token: tokens[id], players: make([]int, c.processes)}
		for j := range ms[i].players {
			ms[i].players[j] = rand.IntN(33)
		}
	}
	tpls := &templates{fleet: c.fleet, max: c.processes, byCount: map[int]*template{}}
	if _, err := tpls.get(c.processes); err != nil {
		return err
	}
	return report(c, ms, tpls)
}

// --- setup

func adminCall(hc *http.Client, c config, method, path string, body, out any) (int, []byte, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return 0, nil, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, strings.TrimSuffix(c.vmm, "/")+path, rd)
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("Authorization", "Bearer "+c.token)
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := hc.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err == nil && out != nil && resp.StatusCode < 300 {
		err = json.Unmarshal(raw, out)
	}
	return resp.StatusCode, raw, err
}

func ensureFleet(hc *http.Client, c config) error {
	var f api.Fleet
	code, raw, err := adminCall(hc, c, "GET", "/v1/fleets/"+c.fleet, nil, &f)
	if err != nil {
		return err
	}
	if code == http.StatusOK {
		if f.Provider != "sim" || f.Scaling.MaxMachines < c.machines || f.ProcessesPerMachine < c.processes {
			return fmt.Errorf("fleet %s exists with provider %q, maxMachines %d, processesPerMachine %d: want sim, >= %d, >= %d",
				c.fleet, f.Provider, f.Scaling.MaxMachines, f.ProcessesPerMachine, c.machines, c.processes)
		}
		logf("fleet %s exists", c.fleet)
		return nil
	}
	if code != http.StatusNotFound {
		return fmt.Errorf("GET fleet %s: %d %s", c.fleet, code, raw)
	}
	f = api.Fleet{Name: c.fleet, Provider: "sim", Command: []string{"/opt/game/server"}, ProcessesPerMachine: c.processes,
		Scaling: api.Scaling{MaxMachines: c.machines, IdleShutdownSeconds: 3600}}
	code, raw, err = adminCall(hc, c, "POST", "/v1/fleets", f, nil)
	if err != nil {
		return err
	}
	if code != http.StatusCreated {
		return fmt.Errorf("create fleet %s: %d %s", c.fleet, code, raw)
	}
	logf("created fleet %s (provider sim, %d processes per machine, up to %d machines)", c.fleet, c.processes, c.machines)
	return nil
}

// createMachines creates c.machines machines, c.creators at a time, and
// returns their ids.
func createMachines(hc *http.Client, c config) ([]string, error) {
	ids := make([]string, c.machines)
	var next atomic.Int64
	var firstErr error
	var mu sync.Mutex
	var wg sync.WaitGroup
	for w := 0; w < c.creators; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= c.machines {
					return
				}
				var m api.Machine
				code, raw, err := adminCall(hc, c, "POST", "/v1/machines", api.CreateMachineRequest{Fleet: c.fleet}, &m)
				if err == nil && code != http.StatusAccepted {
					err = fmt.Errorf("POST /v1/machines: %d %s", code, bytes.TrimSpace(raw))
					if code == http.StatusServiceUnavailable {
						err = fmt.Errorf("%w (machines of an earlier run still live? use another -fleet, or wait until they are lost)", err)
					}
				}
				if err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					next.Store(int64(c.machines)) // stop the others
					return
				}
				ids[i] = m.ID
			}
		}()
	}
	wg.Wait()
	return ids, firstErr
}

// waitTokens follows the sim provider's machine log until it has named
// every machine of ids, and returns their tokens.
func waitTokens(ctx context.Context, path string, ids []string, timeout time.Duration) (map[string]string, error) {
	want := make(map[string]bool, len(ids))
	for _, id := range ids {
		want[id] = true
	}
	tokens := make(map[string]string, len(ids))
	var off int64
	deadline := time.Now().Add(timeout)
	for {
		f, err := os.Open(path)
		if err == nil {
			_, err = f.Seek(off, io.SeekStart)
			var raw []byte
			if err == nil {
				raw, err = io.ReadAll(f)
			}
			f.Close()
			if err != nil {
				return nil, err
			}
			end := bytes.LastIndexByte(raw, '\n') + 1 // whole lines only
			recs, _ := sim.ReadRecords(bytes.NewReader(raw[:end]))
			off += int64(end)
			for _, r := range recs {
				if want[r.MachineID] && !r.Deleted {
					tokens[r.MachineID] = r.Token
				}
			}
		} else if !errors.Is(err, os.ErrNotExist) {
			return nil, err
		}
		if len(tokens) == len(want) {
			return tokens, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("%s names %d of the %d machines after %s: is it the VMM's --sim-provider-dir?", path, len(tokens), len(want), timeout)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// --- the report body

// template is a status report cut where the values of one report go: the
// machine id, seq, the report's time and each process's players. It is
// made by json.Marshal of an api.Status, so its fields are the API's.
type template struct {
	parts [][]byte // len(slots)+1 pieces of fixed text
	slots []slot
}

type slot struct {
	kind    int // slotMachine, slotSeq, slotAt, slotPlayers
	process int // for slotPlayers
}

const (
	slotMachine = iota
	slotSeq
	slotAt
	slotPlayers
)

const (
	sentinelMachine = "m-SENTINEL"
	sentinelSeq     = 987654321012345
	playersBase     = 77700000 // + process index, 8 digits for up to 1000 processes
)

var sentinelAt = time.Date(2000, 1, 2, 3, 4, 5, 123456789, time.UTC)

// status is the report of machine id: processes 0..n-1 of max, all ready.
func status(fleet, id string, n, max int, seq uint64, at time.Time, players func(j int) int) api.Status {
	start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	hb := at
	ps := make([]api.Process, n)
	for j := range ps {
		ps[j] = api.Process{
			ID: fmt.Sprintf("%s-p%03d", id, j), Fleet: fleet, MachineID: id, State: api.StateReady, PID: 100000 + j,
			Command: []string{"/opt/game/server", "--map", "arena"}, Params: map[string]any{"mode": "ranked"},
			Labels: map[string]string{"region": "eu"}, Address: sim.Address, Ports: map[string]int{"game": 30000 + j},
			Players: players(j), SDK: api.SDKDedi, Health: api.Health{PeriodSeconds: 2, FailureThreshold: 3, StartTimeoutSeconds: 60},
			RSSBytes: 200 << 20, CreatedAt: start, ReadyAt: &start, LastHeartbeatAt: &hb,
		}
	}
	load := api.LoadFull
	if n < max {
		load = api.LoadPartial
	}
	return api.Status{MachineID: id, State: load, Seq: seq, MaxProcesses: max, Processes: ps,
		Hardware:  api.Hardware{CPUModel: "Simulated CPU @ 3.00GHz", CPUs: 16, MemoryBytes: 64 << 30, Kernel: "6.1.0-sim", Hostname: id},
		StartedAt: start, At: at}
}

// templates are the report templates by live process count.
type templates struct {
	fleet   string
	max     int
	mu      sync.Mutex
	byCount map[int]*template
}

func (ts *templates) get(n int) (*template, error) {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	if t := ts.byCount[n]; t != nil {
		return t, nil
	}
	t, err := newTemplate(ts.fleet, n, ts.max)
	if err == nil {
		ts.byCount[n] = t
	}
	return t, err
}

func newTemplate(fleet string, n, max int) (*template, error) {
	st := status(fleet, sentinelMachine, n, max, sentinelSeq, sentinelAt, func(j int) int { return playersBase + j })
	raw, err := json.Marshal(st)
	if err != nil {
		return nil, err
	}
	type hit struct {
		at, len int
		s       slot
	}
	var hits []hit
	find := func(needle string, s slot, want int) error {
		count := 0
		for i := 0; ; {
			k := bytes.Index(raw[i:], []byte(needle))
			if k < 0 {
				break
			}
			hits = append(hits, hit{i + k, len(needle), s})
			i += k + len(needle)
			count++
		}
		if want > 0 && count != want {
			return fmt.Errorf("template: %q found %d times, want %d", needle, count, want)
		}
		return nil
	}
	atJSON, _ := json.Marshal(sentinelAt)
	if err := find(sentinelMachine, slot{kind: slotMachine}, 0); err != nil {
		return nil, err
	}
	if err := find(`"seq":`+strconv.Itoa(sentinelSeq), slot{kind: slotSeq}, 1); err != nil {
		return nil, err
	}
	if err := find(string(atJSON), slot{kind: slotAt}, n+1); err != nil {
		return nil, err
	}
	for j := 0; j < n; j++ {
		if err := find(`"players":`+strconv.Itoa(playersBase+j), slot{kind: slotPlayers, process: j}, 1); err != nil {
			return nil, err
		}
	}
	sort.Slice(hits, func(i, j int) bool { return hits[i].at < hits[j].at })
	t := &template{}
	prev := 0
	for _, h := range hits {
		if h.at < prev {
			return nil, errors.New("template: overlapping slots")
		}
		t.parts = append(t.parts, raw[prev:h.at])
		t.slots = append(t.slots, h.s)
		prev = h.at + h.len
	}
	t.parts = append(t.parts, raw[prev:])

	// The cut template renders exactly what json.Marshal makes.
	at := time.Now().UTC()
	players := func(j int) int { return j % 7 }
	got := t.render(nil, "m-12345678", 42, at, players)
	var back, want api.Status
	if err := json.Unmarshal(got, &back); err != nil {
		return nil, fmt.Errorf("template renders bad JSON: %w", err)
	}
	wantRaw, _ := json.Marshal(status(fleet, "m-12345678", n, max, 42, at, players))
	_ = json.Unmarshal(wantRaw, &want)
	if !reflect.DeepEqual(back, want) {
		return nil, errors.New("template renders a report other than json.Marshal's")
	}
	return t, nil
}

func (t *template) render(buf []byte, id string, seq uint64, at time.Time, players func(j int) int) []byte {
	for i, s := range t.slots {
		buf = append(buf, t.parts[i]...)
		switch s.kind {
		case slotMachine:
			buf = append(buf, id...)
		case slotSeq:
			buf = append(buf, `"seq":`...)
			buf = strconv.AppendUint(buf, seq, 10)
		case slotAt:
			buf = append(buf, '"')
			buf = at.AppendFormat(buf, time.RFC3339Nano)
			buf = append(buf, '"')
		case slotPlayers:
			buf = append(buf, `"players":`...)
			buf = strconv.AppendInt(buf, int64(players(s.process)), 10)
		}
	}
	return append(buf, t.parts[len(t.parts)-1]...)
}

// --- reporting

type machine struct {
	id, token string
	mu        sync.Mutex // one report built at a time
	seq       uint64
	players   []int
}

// body builds the machine's next report: seq up, a churn fraction of its
// processes with a new player count; during the ramp, its live processes
// are the first ceil(max*seq/rampRounds).
func (m *machine) body(buf []byte, ts *templates, churn float64, rampRounds int) ([]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.seq++
	n := len(m.players)
	if rampRounds > 0 {
		n = min(n, (len(m.players)*int(m.seq)+rampRounds-1)/rampRounds)
	}
	t, err := ts.get(n)
	if err != nil {
		return buf, err
	}
	if m.seq > 1 {
		for j := range m.players {
			if rand.Float64() < churn {
				m.players[j] = rand.IntN(33)
			}
		}
	}
	return t.render(buf, m.id, m.seq, time.Now().UTC(), func(j int) int { return m.players[j] }), nil
}

// counts are the outcomes of the reports of one phase. A report still
// queued or in flight when the run's grace after -duration ends is cut.
type counts struct {
	sent, ok, stale, failed, cut atomic.Int64 // stale: answered, not applied
}

type worker struct {
	lat []time.Duration // measured phase only
}

func report(c config, ms []*machine, tpls *templates) error {
	tr := &http.Transport{MaxIdleConns: c.concurrency, MaxIdleConnsPerHost: c.concurrency, MaxConnsPerHost: c.concurrency,
		IdleConnTimeout: time.Minute}
	hc := &http.Client{Transport: tr, Timeout: 30 * time.Second}
	base := strings.TrimSuffix(c.vmm, "/") + "/v1/machines/"
	var warm, measured counts
	var firstErr atomic.Value
	var maxLag atomic.Int64 // how late the dispatcher handed a report out (ns)

	n := len(ms)
	start := time.Now()
	measureFrom := start.Add(c.warmup)
	end := measureFrom.Add(c.duration)
	// A report sent in [measureFrom, end) is measured; none is sent after.
	jobs := make(chan *machine, c.concurrency)
	// Reports still queued or in flight one interval after the end are
	// cut: a VMM that does not keep up does not stretch the run.
	stopCtx, stop := context.WithCancel(context.Background())
	defer stop()
	workers := make([]*worker, c.concurrency)
	var wg sync.WaitGroup
	for w := range workers {
		workers[w] = &worker{}
		wg.Add(1)
		go func(wk *worker) {
			defer wg.Done()
			var buf []byte
			for m := range jobs {
				t0 := time.Now()
				cnt, measure := &warm, !t0.Before(measureFrom)
				if measure {
					cnt = &measured
				}
				if stopCtx.Err() != nil || !t0.Before(end) {
					cnt.cut.Add(1)
					continue
				}
				var err error
				if buf, err = m.body(buf[:0], tpls, c.churn, c.rampRounds); err != nil {
					cnt.failed.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
					continue
				}
				req, _ := http.NewRequestWithContext(stopCtx, "POST", base+m.id+"/status", bytes.NewReader(buf))
				req.Header.Set("Authorization", "Bearer "+m.token)
				req.Header.Set("Content-Type", "application/json")
				cnt.sent.Add(1)
				resp, err := hc.Do(req)
				if err != nil && stopCtx.Err() != nil {
					cnt.cut.Add(1)
					continue
				}
				if err != nil {
					cnt.failed.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
					continue
				}
				raw, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				d := time.Since(t0)
				var ans api.ReportAnswer
				switch {
				case err != nil || resp.StatusCode != http.StatusOK || json.Unmarshal(raw, &ans) != nil:
					cnt.failed.Add(1)
					firstErr.CompareAndSwap(nil, fmt.Sprintf("machine %s: %d %s %v", m.id, resp.StatusCode, bytes.TrimSpace(raw), err))
					continue
				case ans.Applied:
					cnt.ok.Add(1)
				default:
					cnt.stale.Add(1)
				}
				if measure {
					wk.lat = append(wk.lat, d)
				}
			}
		}(workers[w])
	}

	// Sample the VMM while the reports flow.
	sampleDone := make(chan struct{})
	var sm *sampler
	// The load generator samples itself too: it shares the machine with
	// the VMM, and what it takes the VMM cannot have.
	self, err := newSampler(os.Getpid())
	if err != nil {
		return err
	}
	selfMark := time.AfterFunc(time.Until(measureFrom), self.mark)
	defer selfMark.Stop()
	if c.pid > 0 {
		var err error
		if sm, err = newSampler(c.pid); err != nil {
			return err
		}
		go sm.run(sampleDone)
		markTimer := time.AfterFunc(time.Until(measureFrom), sm.mark)
		defer markTimer.Stop()
	}
	logf("reporting: %d machines x %d processes every %s (%.0f reports/s); processes appear over %d reports; warm-up %s, then measured %s; churn %.2f, %d in flight at most",
		n, c.processes, c.interval, float64(n)/c.interval.Seconds(), max(c.rampRounds, 1), c.warmup, c.duration, c.churn, c.concurrency)
	progress := time.NewTicker(c.interval)
	defer progress.Stop()
	endTimer := time.NewTimer(c.warmup + c.duration)
	defer endTimer.Stop()
	dueAt := func(k, i int) time.Time {
		return start.Add(time.Duration(k)*c.interval + time.Duration(int64(i)*int64(c.interval)/int64(n)))
	}
	// Reports due before the end: those a VMM that does not keep up
	// (the workers all waiting on it) never gets are skipped.
	var scheduled, dispatched int64
	for k := 0; dueAt(k, 0).Before(end); k++ {
		for i := 0; i < n && dueAt(k, i).Before(end); i++ {
			scheduled++
		}
	}
dispatch:
	for k := 0; ; k++ {
		for i := 0; i < n; i++ {
			due := dueAt(k, i)
			if !due.Before(end) || !time.Now().Before(end) {
				break dispatch
			}
			if d := time.Until(due); d > 0 {
				time.Sleep(d)
			} else if -d > time.Duration(maxLag.Load()) {
				maxLag.Store(int64(-d))
			}
			select {
			case jobs <- ms[i]:
				dispatched++
			case <-endTimer.C:
				break dispatch
			}
			select {
			case <-progress.C:
				line := fmt.Sprintf("t=%s sent=%d applied=%d not-applied=%d failed=%d", time.Since(start).Round(time.Second),
					warm.sent.Load()+measured.sent.Load(), warm.ok.Load()+measured.ok.Load(),
					warm.stale.Load()+measured.stale.Load(), warm.failed.Load()+measured.failed.Load())
				if sm != nil {
					cpu, rss := sm.last()
					line += fmt.Sprintf(" vmm-cpu=%.2f vmm-rss=%.0fMiB", cpu, rss)
				}
				logf("%s", line)
			default:
			}
		}
	}
	var cores, rssMax, rssEnd float64
	if sm != nil {
		cores, rssMax, rssEnd = sm.result()
		close(sampleDone)
	}
	selfCores, _, _ := self.result()
	close(jobs)
	cutTimer := time.AfterFunc(max(c.interval, 2*time.Second), stop)
	wg.Wait()
	cutTimer.Stop()

	var lat []time.Duration
	for _, w := range workers {
		lat = append(lat, w.lat...)
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	pct := func(p float64) float64 {
		if len(lat) == 0 {
			return 0
		}
		return float64(lat[min(len(lat)-1, int(float64(len(lat))*p))].Microseconds()) / 1000
	}
	window := c.duration.Seconds()
	rate := float64(measured.ok.Load()+measured.stale.Load()) / window // answered
	fmt.Println()
	target := float64(n) / c.interval.Seconds()
	skipped := scheduled - dispatched
	fmt.Printf("warm-up:  sent %d, applied %d, not applied %d, failed %d, cut %d\n", warm.sent.Load(), warm.ok.Load(), warm.stale.Load(), warm.failed.Load(), warm.cut.Load())
	fmt.Printf("measured: sent %d, applied %d, not applied %d, failed %d, cut %d over %.1fs: %.0f answered/s (target %.0f/s)\n",
		measured.sent.Load(), measured.ok.Load(), measured.stale.Load(), measured.failed.Load(), measured.cut.Load(), window, rate, target)
	if skipped > 0 {
		fmt.Printf("skipped: %d of the %d reports due were never sent: the VMM did not keep up\n", skipped, scheduled)
	}
	fmt.Printf("latency ms: p50 %.2f, p90 %.2f, p99 %.2f, p99.9 %.2f, max %.2f; dispatcher at most %s late\n",
		pct(0.50), pct(0.90), pct(0.99), pct(0.999), pct(1), time.Duration(maxLag.Load()).Round(time.Millisecond))
	if e := firstErr.Load(); e != nil {
		fmt.Printf("first failure: %s\n", e)
	}
	result := fmt.Sprintf("RESULT reports/s=%.1f target-reports/s=%.1f p50-ms=%.3f p99-ms=%.3f failed=%d cut=%d skipped=%d not-applied=%d", rate, target,
		pct(0.5), pct(0.99), warm.failed.Load()+measured.failed.Load(), warm.cut.Load()+measured.cut.Load(), skipped, measured.stale.Load())
	if sm != nil {
		fmt.Printf("vmm pid %d over the measured window: %.3f cores on average, RSS at most %.0f MiB (%.0f MiB at the end)\n", c.pid, cores, rssMax, rssEnd)
		result += fmt.Sprintf(" vmm-cores=%.3f vmm-rss-MiB=%.1f", cores, rssMax)
		if rate > 0 {
			// CPU per report, and what the target rate costs at that price:
			// comparable between runs that kept up and runs that did not.
			perReport := cores / rate
			fmt.Printf("vmm CPU per report: %.3f ms; at the target %.0f reports/s: %.2f cores\n", perReport*1000, target, perReport*target)
			result += fmt.Sprintf(" vmm-ms-per-report=%.4f vmm-cores-at-target=%.3f", perReport*1000, perReport*target)
		}
	}
	fmt.Printf("load generator over the measured window: %.3f cores\n", selfCores)
	result += fmt.Sprintf(" loadgen-cores=%.3f", selfCores)
	fmt.Println(result)
	return nil
}

// --- sampling /proc/PID

const clockTicks = 100 // USER_HZ, 100 on every Linux this runs on

type sampler struct {
	pid int

	mu               sync.Mutex
	markTicks        uint64
	markAt           time.Time
	marked           bool
	rssMax           float64 // MiB, since mark
	lastCPU, lastRSS float64
	prevTicks        uint64
	prevAt           time.Time
}

func newSampler(pid int) (*sampler, error) {
	ticks, err := cpuTicks(pid)
	if err != nil {
		return nil, err
	}
	if _, err := rssMiB(pid); err != nil {
		return nil, err
	}
	rss, _ := rssMiB(pid)
	// Until mark, the window is the whole run.
	now := time.Now()
	return &sampler{pid: pid, prevTicks: ticks, prevAt: now, markTicks: ticks, markAt: now, rssMax: rss}, nil
}

// mark starts the measured window.
func (s *sampler) mark() {
	ticks, err := cpuTicks(s.pid)
	rss, _ := rssMiB(s.pid)
	s.mu.Lock()
	defer s.mu.Unlock()
	if err == nil {
		s.markTicks, s.markAt, s.marked, s.rssMax = ticks, time.Now(), true, rss
	}
}

func (s *sampler) run(done chan struct{}) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-done:
			return
		case <-t.C:
		}
		ticks, err1 := cpuTicks(s.pid)
		rss, err2 := rssMiB(s.pid)
		if err1 != nil || err2 != nil {
			continue // gone; the result says what was seen
		}
		now := time.Now()
		s.mu.Lock()
		s.lastCPU = float64(ticks-s.prevTicks) / clockTicks / now.Sub(s.prevAt).Seconds()
		s.lastRSS = rss
		s.prevTicks, s.prevAt = ticks, now
		if rss > s.rssMax {
			s.rssMax = rss
		}
		s.mu.Unlock()
	}
}

// last is the CPU (cores) of the last second and the RSS (MiB).
func (s *sampler) last() (float64, float64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lastCPU, s.lastRSS
}

// result is the average CPU from mark to now, and the RSS peak since mark
// and now.
func (s *sampler) result() (cores, rssMax, rssEnd float64) {
	ticks, err := cpuTicks(s.pid)
	rss, _ := rssMiB(s.pid)
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		return 0, s.rssMax, s.lastRSS
	}
	if rss > s.rssMax {
		s.rssMax = rss
	}
	return float64(ticks-s.markTicks) / clockTicks / time.Since(s.markAt).Seconds(), s.rssMax, rss
}

// cpuTicks is utime+stime of /proc/PID/stat.
func cpuTicks(pid int) (uint64, error) {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	s := string(raw)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected %q", pid, s)
	}
	f := strings.Fields(s[i+1:]) // f[0] is field 3 (state)
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected %q", pid, s)
	}
	utime, err1 := strconv.ParseUint(f[11], 10, 64) // field 14
	stime, err2 := strconv.ParseUint(f[12], 10, 64) // field 15
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected %q", pid, s)
	}
	return utime + stime, nil
}

// rssMiB is VmRSS of /proc/PID/status.
func rssMiB(pid int) (float64, error) {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(raw), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.Atoi(strings.Fields(rest)[0])
			return float64(kb) / 1024, err
		}
	}
	return 0, fmt.Errorf("/proc/%d/status has no VmRSS", pid)
}
