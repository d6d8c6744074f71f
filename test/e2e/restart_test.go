package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
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
)

// An LSPM killed with -9 leaves its game servers running; a new LSPM on the
// same data dir adopts them: it serves their state and logs, keeps checking
// their heartbeats, and sees their exit with its code.
func TestLSPMKill9LeavesGamesAndRestartAdopts(t *testing.T) {
	t.Parallel()
	l := startLSPM(t, lspmOpts{})
	echo := l.spawn(t, api.SpawnRequest{Health: &api.Health{PeriodSeconds: 0.2, FailureThreshold: 5}})
	crasher := l.spawn(t, fake("-crash-after", "1500ms", "-exit-code", "42", "-log-every", "50ms"))
	hanger := fake("-hang-after", "2s")
	hanger.Health = &api.Health{PeriodSeconds: 0.2, FailureThreshold: 3}
	hang := l.spawn(t, hanger)
	for _, id := range []string{echo.ID, crasher.ID, hang.ID} {
		l.waitState(t, id, 10*time.Second, api.StateReady)
	}

	l.kill9()
	// The games do not notice: the echo still answers while no LSPM runs.
	if got := udpEcho(t, echo.Address, echo.Ports["game"], "still here"); got != "still here" {
		t.Fatalf("echo = %q", got)
	}
	for _, p := range []api.Process{echo, crasher, hang} {
		if !alive(p.PID) {
			t.Fatalf("process %s (pid %d) died with its LSPM", p.ID, p.PID)
		}
	}
	time.Sleep(300 * time.Millisecond) // longer than the echo's heartbeat period: the SDK must ride it out

	l.start()
	if p := l.get(t, echo.ID); p.State != api.StateReady || p.PID != echo.PID {
		t.Fatalf("after restart %+v", p)
	}
	// The crash after the restart is seen with its exit code and logs.
	end := l.waitState(t, crasher.ID, 10*time.Second, api.StateCrashed)
	if end.Exit.Code == nil || *end.Exit.Code != 42 || len(end.Exit.LogTail) == 0 {
		t.Fatalf("crasher exit %+v", end.Exit)
	}
	// Heartbeats are still checked: the hanger goes unhealthy.
	l.waitState(t, hang.ID, 10*time.Second, api.StateUnhealthy)
	// The echo's heartbeats reach the new LSPM: it stays ready, with fresh heartbeats.
	time.Sleep(1500 * time.Millisecond)
	p := l.get(t, echo.ID)
	if p.State != api.StateReady || p.LastHeartbeatAt == nil || time.Since(*p.LastHeartbeatAt) > time.Second {
		t.Fatalf("echo after restart: state %s last heartbeat %v", p.State, p.LastHeartbeatAt)
	}
	code, raw := call(t, "GET", l.url+"/v1/processes/"+echo.ID+"/logs", l.token, nil, nil)
	if code != 200 || !strings.Contains(string(raw), "echo: ready") {
		t.Fatalf("logs after restart: %d %q", code, raw)
	}
}

// A game server that ends while no LSPM runs is found ended, with its exit
// code, by the next LSPM: the shim kept the evidence.
func TestExitWhileLSPMIsDownIsRecorded(t *testing.T) {
	t.Parallel()
	l := startLSPM(t, lspmOpts{})
	p := l.spawn(t, fake("-crash-after", "300ms", "-crash-signal", "ABRT"))
	l.waitState(t, p.ID, 10*time.Second, api.StateReady)
	// Its crash clock starts when its ready call is answered, which is
	// once the ready state is on disk.
	l.waitLog(t, p.ID, "fakegame: ready", 10*time.Second)
	l.kill9()
	waitDead(t, p.PID, 10*time.Second)
	l.start()
	// The game is dead; its shim may still be writing the exit record when
	// the LSPM comes back, and is then watched until it has.
	end := l.waitState(t, p.ID, 5*time.Second, api.StateCrashed)
	if end.State != api.StateCrashed || end.Exit == nil || end.Exit.Signal != "SIGABRT" {
		t.Fatalf("after restart: %s %+v", end.State, end.Exit)
	}
	if st := l.status(t); st.State != api.LoadEmpty {
		t.Fatalf("state %s", st.State)
	}
}

// SIGTERM to the LSPM leaves the games running by default; with --drain it
// stops them first.
func TestSIGTERMLeavesGamesUnlessDrain(t *testing.T) {
	t.Parallel()
	l := startLSPM(t, lspmOpts{})
	p := l.spawn(t, api.SpawnRequest{})
	l.waitState(t, p.ID, 10*time.Second, api.StateReady)
	l.stop()
	time.Sleep(200 * time.Millisecond)
	if !alive(p.PID) {
		t.Fatal("SIGTERM to the LSPM killed its game server")
	}

	d := startLSPM(t, lspmOpts{extra: []string{"--drain", "--grace", "2s"}})
	q := d.spawn(t, api.SpawnRequest{})
	d.waitState(t, q.ID, 10*time.Second, api.StateReady)
	d.stop()
	waitDead(t, q.PID, 5*time.Second)
	rec, err := os.ReadFile(filepath.Join(d.dataDir, "processes", q.ID, "record.json"))
	if err != nil || !strings.Contains(string(rec), `"state":"killed"`) {
		t.Fatalf("drained record: %s %v", rec, err)
	}
}

// The handshake race: hundreds of spawns race handshakes. Once a handshake
// is accepted, no process was started after it and none is alive.
func TestHandshakeRaceNeverKillsARunningGame(t *testing.T) {
	t.Parallel()
	// A round races only when the handshake wins while spawns still come;
	// a round in which the handshake won only after the last spawn (a
	// loaded machine where games overlapped all along) is run again.
	raced := 0
	for round := 0; round < 8 && raced < 2; round++ {
		t.Run(strconv.Itoa(round), func(t *testing.T) {
			if handshakeRace(t) {
				raced++
			}
		})
	}
	if raced < 2 {
		t.Fatalf("only %d of 8 rounds raced spawns against an accepted handshake", raced)
	}
}

// handshakeRace runs one round and reports whether spawns were refused
// after the handshake, i.e. whether it raced.
func handshakeRace(t *testing.T) bool {
	l := startLSPM(t, lspmOpts{maxProcesses: 64, ports: 200, extra: []string{"--allow", "/bin/sh"}})
	marker := filepath.Join(t.TempDir(), "started")
	var (
		mu        sync.Mutex
		spawned   []api.Process
		accepted  atomic.Bool
		afterWins atomic.Int32 // 201s whose request was sent after the 200 arrived
		wg        sync.WaitGroup
		firstWin  = make(chan struct{})
		once      sync.Once
	)
	const spawners, perSpawner = 6, 50
	var refused atomic.Int32
	for i := 0; i < spawners; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			refusedHere := 0
			for j := 0; j < perSpawner && refusedHere < 3; j++ {
				// In the first half spawns come densely and handshakes are
				// refused busy. In the second half longer pauses let the
				// machine run empty now and then while spawns keep coming,
				// so a handshake wins mid-stream even on a loaded machine
				// where a game lives tens of milliseconds.
				pause := 25
				if j >= perSpawner/2 {
					pause = 200
				}
				time.Sleep(time.Duration(rand.IntN(pause)) * time.Millisecond)
				sentAfter := accepted.Load()
				// A game that lives a few milliseconds and notes when it started.
				req := api.SpawnRequest{Ports: []string{}, Command: []string{"/bin/sh", "-c", `echo $$ $(date +%s%N) >> "$1"`, "game", marker}}
				var p api.Process
				code, raw := call(t, "POST", l.url+"/v1/processes", l.token, req, &p)
				switch code {
				case http.StatusCreated:
					if sentAfter {
						afterWins.Add(1)
					}
					mu.Lock()
					spawned = append(spawned, p)
					mu.Unlock()
					once.Do(func() { close(firstWin) })
				case http.StatusServiceUnavailable:
					refused.Add(1)
					refusedHere++
					if pr := problemOf(t, raw); pr.Code != api.CodeShuttingDown {
						t.Errorf("503 with code %s", pr.Code)
					}
				case http.StatusConflict:
				default:
					t.Errorf("spawn: %d %s", code, raw)
				}
			}
		}()
	}
	// Handshakes start once spawns are flowing, so the two really race.
	select {
	case <-firstWin:
	case <-time.After(20 * time.Second):
		t.Fatal("no spawn succeeded")
	}
	busy := 0
	for !accepted.Load() {
		code, raw := call(t, "POST", l.url+"/v1/shutdown", l.token, nil, nil)
		switch code {
		case http.StatusOK:
			accepted.Store(true)
		case http.StatusConflict:
			busy++
			if pr := problemOf(t, raw); pr.Code != api.CodeBusy {
				t.Fatalf("409 with code %s", pr.Code)
			}
			time.Sleep(time.Duration(busy%3) * time.Millisecond)
		default:
			t.Fatalf("handshake: %d %s", code, raw)
		}
	}
	wg.Wait()
	st := l.status(t)
	if st.State != api.LoadShuttingDown || st.ShutdownAt == nil {
		t.Fatalf("status %+v", st)
	}
	if afterWins.Load() > 0 {
		t.Fatalf("%d spawns sent after the handshake was accepted succeeded", afterWins.Load())
	}
	// Every process that started wrote a marker before the handshake time.
	raw, _ := os.ReadFile(marker)
	starts := strings.Fields(string(raw))
	for i := 0; i+1 < len(starts); i += 2 {
		ns, _ := strconv.ParseInt(starts[i+1], 10, 64)
		if at := time.Unix(0, ns); at.After(*st.ShutdownAt) {
			t.Fatalf("process %s started at %s, after the handshake at %s", starts[i], at, st.ShutdownAt)
		}
	}
	for _, p := range spawned {
		if alive(p.PID) {
			t.Fatalf("process %s (pid %d) is alive after the handshake", p.ID, p.PID)
		}
	}
	if len(st.Processes) != 0 {
		t.Fatalf("%d live processes after the handshake", len(st.Processes))
	}
	t.Logf("%d spawned, %d handshakes refused busy, then accepted; %d spawns refused shutting_down", len(spawned), busy, refused.Load())
	return len(spawned) > 0 && refused.Load() > 0
}

func TestHandshakeBusyThenShuttingDown(t *testing.T) {
	t.Parallel()
	l := startLSPM(t, lspmOpts{})
	p := l.spawn(t, api.SpawnRequest{})
	code, raw := call(t, "POST", l.url+"/v1/shutdown", l.token, nil, nil)
	if pr := problemOf(t, raw); code != http.StatusConflict || pr.Code != api.CodeBusy {
		t.Fatalf("handshake with a live process: %d %s", code, raw)
	}
	if !alive(p.PID) || l.status(t).State == api.LoadShuttingDown {
		t.Fatal("a refused handshake changed something")
	}
	call(t, "DELETE", l.url+"/v1/processes/"+p.ID, l.token, nil, nil)
	l.waitState(t, p.ID, 10*time.Second, api.StateKilled)
	var ans api.ShutdownAnswer
	if code, raw := call(t, "POST", l.url+"/v1/shutdown", l.token, nil, &ans); code != http.StatusOK || !ans.Accepted {
		t.Fatalf("handshake: %d %s", code, raw)
	}
	req, _ := http.NewRequest("POST", l.url+"/v1/processes", strings.NewReader(`{}`))
	req.Header.Set("Authorization", "Bearer "+l.token)
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if pr := problemOf(t, body); resp.StatusCode != 503 || pr.Code != api.CodeShuttingDown || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("spawn after handshake: %d %s (Retry-After %q)", resp.StatusCode, body, resp.Header.Get("Retry-After"))
	}
	// A restarted LSPM stays shutting down.
	l.stop()
	l.start()
	if st := l.status(t); st.State != api.LoadShuttingDown {
		t.Fatalf("after restart: %s", st.State)
	}
}

// A 200 to the shutdown handshake lets the machine be powered off, so it
// comes only once the VMM has the report that shows the machine shutting
// down, with the ends of the processes that ran on it: a slow VMM (as
// through a qemu guest's emulated network) must not lose a game's end.
func TestHandshakeWaitsForTheLastReport(t *testing.T) {
	t.Parallel()
	vmm := &fakeVMM{}
	srv := httptest.NewServer(vmm)
	defer srv.Close()
	l := startLSPM(t, lspmOpts{extra: []string{"--vmm-url", srv.URL, "--report-interval", "1s"}})
	vmm.waitFor(t, "at start", func(api.Status) bool { return true })
	p := l.spawn(t, api.SpawnRequest{})
	l.waitState(t, p.ID, 10*time.Second, api.StateReady)
	vmm.delay.Store(int64(400 * time.Millisecond)) // each report now takes 0.4 s to be answered
	call(t, "DELETE", l.url+"/v1/processes/"+p.ID+"?grace=0s", l.token, nil, nil)
	deadline := time.Now().Add(10 * time.Second)
	for {
		code, raw := call(t, "POST", l.url+"/v1/shutdown", l.token, nil, nil)
		if code == http.StatusOK {
			break
		}
		if code != http.StatusConflict || time.Now().After(deadline) {
			t.Fatalf("handshake: %d %s", code, raw)
		}
		time.Sleep(20 * time.Millisecond)
	}
	var last api.Status
	if reps := vmm.snapshot(); len(reps) > 0 {
		last = reps[len(reps)-1]
	}
	ended := false
	for _, st := range vmm.snapshot() {
		for _, e := range st.Ended {
			ended = ended || (e.ID == p.ID && e.State == api.StateKilled)
		}
	}
	if last.State != api.LoadShuttingDown || len(last.Processes) != 0 || !ended {
		t.Fatalf("at the handshake's 200 the VMM had: state %q, %d live, the game's end reported %v", last.State, len(last.Processes), ended)
	}
}

// fakeVMM records the status reports an LSPM sends.
type fakeVMM struct {
	mu      sync.Mutex
	reports []api.Status
	auth    []string
	down    atomic.Bool
	delay   atomic.Int64 // before each answer, nanoseconds; the report counts once answered
}

func (v *fakeVMM) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if v.down.Load() {
		http.Error(w, "down", http.StatusServiceUnavailable)
		return
	}
	time.Sleep(time.Duration(v.delay.Load()))
	var st api.Status
	if r.URL.Path != "/v1/machines/m-test/status" || json.NewDecoder(r.Body).Decode(&st) != nil {
		http.Error(w, "bad", http.StatusBadRequest)
		return
	}
	v.mu.Lock()
	v.reports = append(v.reports, st)
	v.auth = append(v.auth, r.Header.Get("Authorization"))
	v.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	fmt.Fprint(w, `{"applied":true}`)
}

func (v *fakeVMM) snapshot() []api.Status {
	v.mu.Lock()
	defer v.mu.Unlock()
	return append([]api.Status(nil), v.reports...)
}

func (v *fakeVMM) waitFor(t *testing.T, what string, ok func(api.Status) bool) api.Status {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		rs := v.snapshot()
		for i := len(rs) - 1; i >= 0; i-- {
			if ok(rs[i]) {
				return rs[i]
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("no report %s", what)
	return api.Status{}
}

func TestStatusReportsAreNumberedAcrossRestartsAndRetried(t *testing.T) {
	t.Parallel()
	vmm := &fakeVMM{}
	srv := httptest.NewServer(vmm)
	defer srv.Close()
	l := startLSPM(t, lspmOpts{extra: []string{"--vmm-url", srv.URL, "--report-interval", "1s"}})
	vmm.waitFor(t, "at start", func(api.Status) bool { return true })

	// A change is reported at once, not at the next interval.
	before := time.Now()
	p := l.spawn(t, api.SpawnRequest{})
	vmm.waitFor(t, "of the new process", func(st api.Status) bool { return len(st.Processes) == 1 && st.Processes[0].ID == p.ID })
	if d := time.Since(before); d > 500*time.Millisecond {
		t.Fatalf("change reported after %s", d)
	}
	l.waitState(t, p.ID, 10*time.Second, api.StateReady)
	vmm.waitFor(t, "of ready", func(st api.Status) bool { return len(st.Processes) == 1 && st.Processes[0].State == api.StateReady })

	// The VMM goes away; reports are retried and arrive when it is back.
	vmm.down.Store(true)
	call(t, "DELETE", l.url+"/v1/processes/"+p.ID, l.token, nil, nil)
	l.waitState(t, p.ID, 10*time.Second, api.StateKilled)
	time.Sleep(500 * time.Millisecond)
	vmm.down.Store(false)
	vmm.waitFor(t, "of the end after the VMM came back", func(st api.Status) bool {
		return len(st.Processes) == 0 && len(st.Ended) > 0 && st.Ended[0].ID == p.ID && st.Ended[0].State == api.StateKilled
	})

	// Restart: numbers keep rising.
	l.kill9()
	last := vmm.snapshot()
	l.start()
	vmm.waitFor(t, "after the restart", func(st api.Status) bool { return st.Seq > last[len(last)-1].Seq })
	time.Sleep(1200 * time.Millisecond)

	rs := vmm.snapshot()
	seqs := make([]uint64, len(rs))
	for i, r := range rs {
		seqs[i] = r.Seq
		if vmm.auth[i] != "Bearer "+machineToken {
			t.Fatalf("report %d carried %q", i, vmm.auth[i])
		}
		if r.MachineID != "m-test" || r.Hardware.CPUs == 0 {
			t.Fatalf("report %+v", r)
		}
	}
	if !sort.SliceIsSorted(seqs, func(i, j int) bool { return seqs[i] < seqs[j] }) {
		t.Fatalf("seq not increasing: %v", seqs)
	}
	for i := 1; i < len(seqs); i++ {
		if seqs[i] == seqs[i-1] {
			t.Fatalf("seq repeated: %v", seqs)
		}
	}
}

func TestLogsTailFollowAndCap(t *testing.T) {
	t.Parallel()
	l := startLSPM(t, lspmOpts{extra: []string{"--log-max-bytes", "4KiB"}})
	p := l.spawn(t, fake("-log-lines", "2000", "-log-every", "20ms", "-exit-after", "1s"))
	l.waitState(t, p.ID, 10*time.Second, api.StateReady)

	// The shim copies the game's output from its pipe a moment after the
	// game wrote it: wait for it, never more than 3 lines.
	eventually(t, 5*time.Second, "3 lines of tail", func() bool {
		code, raw := call(t, "GET", l.url+"/v1/processes/"+p.ID+"/logs?tail=3", l.token, nil, nil)
		lines := strings.Split(strings.TrimSpace(string(raw)), "\n")
		if code != 200 || len(lines) > 3 {
			t.Fatalf("tail=3: %d %q", code, raw)
		}
		return len(lines) == 3 && lines[0] != ""
	})
	// follow streams new lines as they are written and ends with the process.
	req, _ := http.NewRequest("GET", l.url+"/v1/processes/"+p.ID+"/logs?tail=0&follow=true", nil)
	req.Header.Set("Authorization", "Bearer "+l.token)
	resp, err := (&http.Client{Timeout: 20 * time.Second}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(body), "tick") || !strings.Contains(string(body), "fakegame: exiting") {
		t.Fatalf("follow got %q", body)
	}
	l.waitState(t, p.ID, 10*time.Second, api.StateExited)
	// Two files of at most 4 KiB each, whatever the game wrote.
	dir := filepath.Join(l.dataDir, "processes", p.ID)
	for _, f := range []string{"output.log", "output.log.1"} {
		st, err := os.Stat(filepath.Join(dir, f))
		if err != nil || st.Size() > 4096 {
			t.Fatalf("%s: %v size %d", f, err, st.Size())
		}
	}
}

func TestHistoryIsBounded(t *testing.T) {
	t.Parallel()
	l := startLSPM(t, lspmOpts{extra: []string{"--history", "3"}})
	var ids []string
	for i := 0; i < 6; i++ {
		p := l.spawn(t, noPorts(fake("-no-sdk", "-exit-after", "1ms")))
		l.waitState(t, p.ID, 10*time.Second, api.StateExited)
		ids = append(ids, p.ID)
	}
	var list api.List[api.Process]
	call(t, "GET", l.url+"/v1/processes", l.token, nil, &list)
	if len(list.Items) != 3 || list.Items[0].ID != ids[5] {
		t.Fatalf("history has %d items", len(list.Items))
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		dirs, _ := os.ReadDir(filepath.Join(l.dataDir, "processes"))
		if len(dirs) == 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d process dirs on disk, want 3", len(dirs))
		}
		time.Sleep(10 * time.Millisecond)
	}
	code, _ := call(t, "GET", l.url+"/v1/processes/"+ids[0], l.token, nil, nil)
	if code != http.StatusNotFound {
		t.Fatalf("dropped process: %d", code)
	}
}

// A game server whose record is unreadable after a crash must not run
// unseen: the machine would look empty and accept the handshake.
func TestUnrecordedGameIsStoppedNotHidden(t *testing.T) {
	t.Parallel()
	l := startLSPM(t, lspmOpts{})
	p := l.spawn(t, api.SpawnRequest{})
	l.waitState(t, p.ID, 10*time.Second, api.StateReady)
	l.kill9()
	rec := filepath.Join(l.dataDir, "processes", p.ID, "record.json")
	if err := os.WriteFile(rec, []byte(`{"process": {"id": `), 0o600); err != nil {
		t.Fatal(err)
	}
	l.start()
	waitDead(t, p.PID, 5*time.Second)
	if st := l.status(t); st.State != api.LoadEmpty {
		t.Fatalf("state %s", st.State)
	}
	if _, err := os.Stat(filepath.Join(l.dataDir, "quarantine", p.ID, "output.log")); err != nil {
		t.Fatalf("evidence not kept aside: %v", err)
	}
}

func TestOneLSPMPerDataDir(t *testing.T) {
	t.Parallel()
	l := startLSPM(t, lspmOpts{})
	cmd := exec.Command(dediBin, "lspm", "--listen", "127.0.0.1:0", "--data-dir", l.dataDir, "--machine-id", "m-test", "--token", machineToken)
	out, err := cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(out), "in use by another LSPM") {
		t.Fatalf("second LSPM on the same data dir: %v %s", err, out)
	}
}

// Whatever a game prints, the evidence in reports stays small.
func TestHugeLogLineIsCappedInEvidence(t *testing.T) {
	t.Parallel()
	l := startLSPM(t, lspmOpts{extra: []string{"--allow", "/bin/sh"}})
	p := l.spawn(t, api.SpawnRequest{Ports: []string{}, Command: []string{"/bin/sh", "-c", `head -c 300000 /dev/zero | tr '\0' x; echo; exit 3`}})
	end := l.waitState(t, p.ID, 10*time.Second, api.StateCrashed)
	if len(end.Exit.LogTail) != 1 || len(end.Exit.LogTail[0]) > 520 {
		t.Fatalf("log tail of %d lines, first %d bytes", len(end.Exit.LogTail), len(end.Exit.LogTail[0]))
	}
}
