package lspm

import (
	"context"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"dedi.dev/dedi/api"
	"dedi.dev/dedi/internal/clock"
	"dedi.dev/dedi/internal/procstat"
	"dedi.dev/dedi/internal/rest"
)

// newTestTable builds a table on a fake clock, without a loop: the test is
// its single owner.
func newTestTable(t *testing.T) (*table, *clock.Fake) {
	t.Helper()
	clk := clock.NewFake(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	cfg := Config{DataDir: t.TempDir(), MachineID: "m", Token: "0123456789abcdef", MaxProcesses: 2,
		PortMin: 40000, PortMax: 40009, StartTimeout: 10 * time.Second, HealthPeriod: time.Second,
		FailureThreshold: 3, Grace: 50 * time.Millisecond}.withDefaults()
	a := &Agent{cfg: cfg, log: slog.New(slog.NewTextHandler(io.Discard, nil)), clock: clk,
		changed: make(chan struct{}, 1), persist: newPersister(nil)}
	ctx, cancel := context.WithCancel(context.Background())
	a.runCtx = ctx
	t.Cleanup(func() { cancel(); a.wg.Wait() })
	if err := os.MkdirAll(a.procsDir(), 0o700); err != nil {
		t.Fatal(err)
	}
	tb := &table{a: a, live: map[string]*proc{}, endedByID: map[string]*proc{}, byToken: map[string]string{}, ports: map[int]string{}}
	a.table = tb
	return tb, clk
}

// sleeper is a real process for the table to signal.
func sleeper(t *testing.T) launched {
	t.Helper()
	cmd := exec.Command("sleep", "60")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	start, err := procstat.StartTime(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	return launched{pid: cmd.Process.Pid, start: start, cmd: cmd}
}

func spawnIn(t *testing.T, tb *table, id string, h *api.Health) (*proc, launched) {
	t.Helper()
	if _, err := tb.reserve(id, api.SpawnRequest{Health: h}, []string{"sleep"}, "hash-"+id, []string{"game"}); err != nil {
		t.Fatal(err)
	}
	l := sleeper(t)
	tb.commit(id, l)
	return tb.live[id], l
}

func waitExit(t *testing.T, l launched) syscall.WaitStatus {
	t.Helper()
	done := make(chan struct{})
	go func() { _ = l.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("process not stopped")
	}
	return l.cmd.ProcessState.Sys().(syscall.WaitStatus)
}

func TestStartTimeoutStopsProcess(t *testing.T) {
	tb, clk := newTestTable(t)
	p, l := spawnIn(t, tb, "a", &api.Health{StartTimeoutSeconds: 5})
	clk.Advance(4 * time.Second)
	tb.checkHealth()
	if p.stopReason != "" {
		t.Fatalf("stopped before the start timeout: %s", p.stopDetail)
	}
	clk.Advance(2 * time.Second)
	tb.checkHealth()
	if p.stopReason != api.ReasonUnhealthy || !strings.Contains(p.stopDetail, "start timeout") {
		t.Fatalf("reason %q detail %q", p.stopReason, p.stopDetail)
	}
	if ws := waitExit(t, l); ws.Signal() != syscall.SIGTERM {
		t.Fatalf("ended by %v, want SIGTERM", ws)
	}
}

func TestHeartbeatsKeepAliveAndSilenceKills(t *testing.T) {
	tb, clk := newTestTable(t)
	p, l := spawnIn(t, tb, "a", &api.Health{PeriodSeconds: 1, FailureThreshold: 3})
	tb.ready(p)
	players := 7
	for i := 0; i < 10; i++ { // 10 s of heartbeats every second
		clk.Advance(time.Second)
		tb.heartbeat(p, api.Heartbeat{Players: &players})
		tb.checkHealth()
	}
	if p.stopReason != "" || p.view.Players != 7 {
		t.Fatalf("stopped while heartbeating (%s), players %d", p.stopDetail, p.view.Players)
	}
	clk.Advance(3 * time.Second)
	tb.checkHealth()
	if p.stopReason != "" {
		t.Fatal("stopped at exactly the threshold")
	}
	clk.Advance(10 * time.Millisecond)
	tb.checkHealth()
	if p.stopReason != api.ReasonUnhealthy {
		t.Fatalf("not stopped after threshold × period of silence")
	}
	waitExit(t, l)
}

func TestMemorySampleOverLimitKills(t *testing.T) {
	tb, _ := newTestTable(t)
	p, l := spawnIn(t, tb, "a", nil)
	p.view.MemoryLimitBytes = 1000
	tb.sample(map[string]int64{"a": 999})
	if p.stopReason != "" {
		t.Fatal("stopped under the limit")
	}
	tb.sample(map[string]int64{"a": 1001})
	if p.stopReason != api.ReasonMemoryLimit {
		t.Fatalf("reason %q", p.stopReason)
	}
	if ws := waitExit(t, l); ws.Signal() != syscall.SIGKILL {
		t.Fatalf("ended by %v, want SIGKILL at once", ws)
	}
}

func TestEndMapsExitToStateAndReason(t *testing.T) {
	code := func(c int) *int { return &c }
	cases := []struct {
		name        string
		stop        string
		exit        *exitRecord
		state, reas string
	}{
		{"clean exit", "", &exitRecord{Code: code(0)}, api.StateExited, api.ReasonExited},
		{"exit code", "", &exitRecord{Code: code(3)}, api.StateCrashed, api.ReasonCrashed},
		{"signal", "", &exitRecord{Signal: "SIGSEGV"}, api.StateCrashed, api.ReasonCrashed},
		{"stopped on request", api.ReasonKilled, &exitRecord{Code: code(0)}, api.StateKilled, api.ReasonKilled},
		{"hung", api.ReasonUnhealthy, &exitRecord{Signal: "SIGKILL"}, api.StateUnhealthy, api.ReasonUnhealthy},
		{"leak", api.ReasonMemoryLimit, &exitRecord{Signal: "SIGKILL"}, api.StateCrashed, api.ReasonMemoryLimit},
		{"supervisor vanished", "", nil, api.StateLost, api.ReasonLost},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tb, _ := newTestTable(t)
			p, _ := spawnIn(t, tb, "a", nil)
			port := p.view.Ports["game"]
			p.stopReason = c.stop
			tb.end("a", c.exit, []string{"last line"}, "gone")
			if p.view.State != c.state || p.view.Exit.Reason != c.reas {
				t.Fatalf("state %s reason %s, want %s %s", p.view.State, p.view.Exit.Reason, c.state, c.reas)
			}
			if _, held := tb.ports[port]; held || tb.live["a"] != nil || tb.endedByID["a"] != p {
				t.Fatal("an ended process still holds its place")
			}
			if p.view.Exit.LogTail[0] != "last line" || p.view.EndedAt == nil {
				t.Fatalf("evidence %+v", p.view.Exit)
			}
		})
	}
}

func TestHandshakeAndReserveExcludeEachOther(t *testing.T) {
	tb, _ := newTestTable(t)
	if _, err := tb.reserve("a", api.SpawnRequest{}, []string{"x"}, "h", nil); err != nil {
		t.Fatal(err)
	}
	err := tb.shutdown()
	if e, ok := err.(*rest.Error); !ok || e.Code != api.CodeBusy {
		t.Fatalf("handshake with a spawn in flight: %v", err)
	}
	tb.abort("a")
	if err := tb.shutdown(); err != nil {
		t.Fatalf("handshake on an empty machine: %v", err)
	}
	_, err = tb.reserve("b", api.SpawnRequest{}, []string{"x"}, "h", nil)
	if e, ok := err.(*rest.Error); !ok || e.Code != api.CodeShuttingDown || e.Kind.Status() != 503 {
		t.Fatalf("spawn after the handshake: %v", err)
	}
}

func TestFullAndPortsReleased(t *testing.T) {
	tb, _ := newTestTable(t)
	spawnIn(t, tb, "a", nil)
	spawnIn(t, tb, "b", nil)
	if tb.loadState() != api.LoadFull {
		t.Fatalf("state %s", tb.loadState())
	}
	_, err := tb.reserve("c", api.SpawnRequest{}, []string{"x"}, "h", []string{"game"})
	if e, ok := err.(*rest.Error); !ok || e.Code != api.CodeFull {
		t.Fatalf("third spawn: %v", err)
	}
	if _, err := tb.reserve("a", api.SpawnRequest{}, []string{"x"}, "h", nil); err == nil {
		t.Fatal("an id in use was reserved again")
	}
}

func TestSeqRisesAcrossRestart(t *testing.T) {
	tb, _ := newTestTable(t)
	var last uint64
	for i := 0; i < 5; i++ {
		st := tb.status(true)
		if st.Seq <= last {
			t.Fatalf("seq %d after %d", st.Seq, last)
		}
		last = st.Seq
	}
	// A new table on the same data dir, as after kill -9.
	again := &table{a: tb.a, live: map[string]*proc{}, endedByID: map[string]*proc{}, byToken: map[string]string{}, ports: map[int]string{}}
	if _, err := again.load(); err != nil {
		t.Fatal(err)
	}
	if st := again.status(true); st.Seq <= last {
		t.Fatalf("seq %d after restart, last before %d", st.Seq, last)
	}
}

// Each live process holds a user of --game-uids of its own; a freed user
// is handed out again only after the rest of the range, and a record keeps
// its process's user across an LSPM restart.
func TestGameUIDsRotate(t *testing.T) {
	tb, _ := newTestTable(t)
	tb.a.cfg.GameUIDMin, tb.a.cfg.GameUIDMax = 61000, 61003 // 61000: the sweeper
	p1, _ := spawnIn(t, tb, "p-1", nil)
	p2, _ := spawnIn(t, tb, "p-2", nil)
	if p1.uid != 61001 || p2.uid != 61002 {
		t.Fatalf("users %d and %d, want 61001 and 61002", p1.uid, p2.uid)
	}
	var rec record
	if err := jsonUnmarshal(mustJSON(p1.record()), &rec); err != nil || rec.GameUID != 61001 {
		t.Fatalf("record's user %d (%v), want 61001", rec.GameUID, err)
	}
	delete(tb.live, "p-1") // as an end does
	if uid, ok := tb.allocUID(); !ok || uid != 61003 {
		t.Fatalf("next user %d %v, want 61003: a freed user waits its turn", uid, ok)
	}
	if uid, ok := tb.allocUID(); !ok || uid != 61001 {
		t.Fatalf("then %d %v, want 61001", uid, ok)
	}
	tb.live["p-3"] = &proc{uid: 61001}
	tb.live["p-4"] = &proc{uid: 61003}
	if uid, ok := tb.allocUID(); ok {
		t.Fatalf("a user %d handed out while all are held", uid)
	}
}

// A user a sweep could not empty is never handed out again; a restarted
// LSPM sweeps every user no adopted game holds and goes on after the
// highest one adopted.
func TestGameUIDsDirtyAndRestart(t *testing.T) {
	tb, _ := newTestTable(t)
	tb.a.cfg.GameUIDMin, tb.a.cfg.GameUIDMax = 2000000010, 2000000014 // 2000000010: the sweeper
	tb.markDirtyUID(2000000012)
	tb.markDirtyUID(2000000012) // logged once
	a, _ := tb.allocUID()
	tb.live["p-1"] = &proc{uid: a}
	b, _ := tb.allocUID()
	if a != 2000000011 || b != 2000000013 {
		t.Fatalf("users %d and %d, want 2000000011 and 2000000013 (2000000012 is dirty)", a, b)
	}
	if os.Geteuid() != 0 {
		t.Skipf("the sweep at start needs root; these tests run as user %d", os.Geteuid())
	}
	left := exec.Command("/bin/sleep", "60") // what a dead LSPM's game left
	left.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 2000000012, Gid: 2000000012, Groups: []uint32{}}}
	if err := left.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- left.Wait() }()
	tb2 := &table{a: tb.a, live: map[string]*proc{}, endedByID: map[string]*proc{}, byToken: map[string]string{}, ports: map[int]string{}}
	if err := tb2.sweepFreeUIDs([]*proc{{uid: 2000000013}}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-exited:
	case <-time.After(5 * time.Second):
		_ = left.Process.Kill()
		t.Fatal("the sweep at start left a process of a free user running")
	}
	if len(tb2.dirtyUIDs) != 0 {
		t.Fatalf("dirty after the sweep: %v", tb2.dirtyUIDs)
	}
	if uid, _ := tb2.allocUID(); uid != 2000000014 {
		t.Fatalf("first user after a restart %d, want 2000000014 (after the adopted 2000000013)", uid)
	}
}

// An LSPM does not start while a game it would adopt, or any process, runs
// as the sweeper (--game-uids' first user): its sweeps would kill it. (An
// older LSPM gave games that user.)
func TestGameUIDsSweeperBusy(t *testing.T) {
	tb, _ := newTestTable(t)
	tb.a.cfg.GameUIDMin, tb.a.cfg.GameUIDMax = 2000000020, 2000000024
	old := &proc{uid: 2000000020, view: api.Process{ID: "p-old"}}
	if err := tb.sweepFreeUIDs([]*proc{old}); err == nil || !strings.Contains(err.Error(), "p-old") {
		t.Fatalf("a game running as the sweeper: %v, want a refusal naming it", err)
	}
	if os.Geteuid() != 0 {
		t.Skipf("running a process as another user needs root; these tests run as user %d", os.Geteuid())
	}
	busy := exec.Command("/bin/sleep", "30")
	busy.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 2000000020, Gid: 2000000020, Groups: []uint32{}}}
	if err := busy.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = busy.Wait(); close(exited) }()
	t.Cleanup(func() { _ = busy.Process.Kill(); <-exited })
	if err := tb.sweepFreeUIDs(nil); err == nil || !strings.Contains(err.Error(), "a process runs as user 2000000020") {
		t.Fatalf("a process running as the sweeper: %v, want a refusal", err)
	}
	select {
	case <-exited:
		t.Fatal("the process running as the sweeper was killed")
	case <-time.After(100 * time.Millisecond):
	}
}

func TestGameUIDsConfig(t *testing.T) {
	for _, s := range []string{"61000", "999-2000", "61000-60000", "65000-66000", "x-y", "1000-2147483647"} {
		if _, _, err := ParseUIDRange(s); err == nil {
			t.Errorf("ParseUIDRange(%q) accepted", s)
		}
	}
	if lo, hi, err := ParseUIDRange("61000-61999"); err != nil || lo != 61000 || hi != 61999 {
		t.Fatalf("ParseUIDRange: %d %d %v", lo, hi, err)
	}
	cfg := Config{DataDir: "/d", MachineID: "m", Insecure: true, Listen: "127.0.0.1:0", MaxProcesses: 4,
		GameUIDMin: 61000, GameUIDMax: 61003}.withDefaults()
	if err := cfg.Validate(); err == nil || !strings.Contains(err.Error(), "fewer than --max-processes") {
		t.Errorf("3 game users (and the sweeper) for 4 processes: %v", err)
	}
	cfg.GameUIDMax = 61004
	err := cfg.Validate()
	if os.Geteuid() == 0 && err != nil {
		t.Errorf("as root: %v", err)
	}
	if os.Geteuid() != 0 && (err == nil || !strings.Contains(err.Error(), "root")) {
		t.Errorf("not root: %v", err)
	}
}

// A range that holds someone's user, group or subordinate ids, or
// systemd's dynamic users, is refused: the LSPM kills every process of a
// game's user.
func TestGameUIDsRangeFree(t *testing.T) {
	etc := t.TempDir()
	write := func(name, body string) {
		if err := os.WriteFile(filepath.Join(etc, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := uidRangeFree(200000, 200999, etc); err != nil {
		t.Fatalf("no files, nothing held: %v", err)
	}
	write("passwd", "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/sh\nbad line\n")
	write("group", "root:x:0:\nplayers:x:5000:alice\n")
	write("subuid", "alice:100000:65536\n")
	write("subgid", "alice:300000:65536\n")
	for _, c := range []struct {
		lo, hi int
		want   string
	}{
		{1000, 1999, `gives to "alice"`},
		{4000, 5000, `gives to "players"`},
		{165535, 170000, "subuid"},
		{365000, 366000, "subgid"},
		{61000, 61184, "dynamic users"},
		{65519, 66000, "dynamic users"},
		{60500, 60600, "homed"},
		{700000000, 700000999, "nspawn"},
		{2147352576, 2147352577, "foreign"},
	} {
		if err := uidRangeFree(c.lo, c.hi, etc); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%d-%d: %v, want %q", c.lo, c.hi, err, c.want)
		}
	}
	for _, r := range [][2]int{{1001, 4999}, {165536, 299999}, {61000, 61183}, {2000000000, 2000000999}} {
		if err := uidRangeFree(r[0], r[1], etc); err != nil {
			t.Errorf("%d-%d: %v", r[0], r[1], err)
		}
	}
}
