package lspm

import (
	"context"
	"crypto/rand"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"dedi.dev/dedi/api"
	"dedi.dev/dedi/internal/rest"
)

// table is the LSPM's state machine: every process, the port map, the
// machine state and the report sequence. It is owned by the Agent's loop
// goroutine; nothing else touches it. Other goroutines send it commands
// (func(*table) closures run on the loop) and get copies back.
//
// A process moves through
//
//	(reserved, in flight) --shim started--> starting --ready--> ready --allocate--> allocated
//	     |                                     |                  |                    |
//	     +-- spawn failed: forgotten           +------------------+--------------------+--> exited | crashed | unhealthy | killed | lost
//
// and the machine through empty <-> partial <-> full, then shutting_down
// once the handshake was accepted (never back).
type table struct {
	a *Agent

	live      map[string]*proc // reserved, starting, ready, allocated (also while being stopped)
	ended     []*proc          // history, oldest first, at most cfg.History
	unacked   []*proc          // ended processes the VMM has not acknowledged, oldest first
	endedByID map[string]*proc
	byToken   map[string]string // process token hash -> id
	ports     map[int]string    // port -> id
	nextPort  int
	nextUID   int          // where allocUID looks first, from --game-uids' start
	dirtyUIDs map[int]bool // game users a sweep could not empty: never handed out again

	shuttingDown bool
	shutdownAt   *time.Time
	seq          uint64
	seqReserved  uint64
	ackedSeq     uint64         // the highest report the VMM acknowledged
	delivered    []deliveryWait // handshakes waiting for their report
}

// deliveryWait is a handshake waiting until the VMM acknowledged a report
// numbered seq or later and every end the LSPM recorded.
type deliveryWait struct {
	seq  uint64
	done chan struct{}
}

// proc is one game server process as the table keeps it.
type proc struct {
	view api.Process // the wire object; maps and slices in it are never mutated

	tokenHash string
	dir       string
	inflight  bool // reserved, shim not started yet
	shimPID   int
	shimStart uint64
	start     uint64 // the game process's start time, to tell a reused pid

	period       time.Duration
	threshold    int
	startTimeout time.Duration
	lastBeat     time.Time
	startClock   time.Time // the start timeout runs from here
	adopted      bool      // found live by a restarted LSPM

	stopReason  string // set once the LSPM decided to end it
	stopDetail  string
	announcedAt *time.Time // the process called shutdown
	reportedIn  uint64     // seq of the first report that carried its end
	bootID      string     // the kernel boot it was started in
	uid         int        // the game's own user and group (--game-uids), or 0
	home        string     // with uid: the game's own HOME and TMPDIR, removed when it ends
	done        chan struct{}

	agones *agonesState // with "sdk": "agones" (agones.go), else nil
}

// record is a proc as persisted in DIR/record.json.
type record struct {
	Process     api.Process  `json:"process"`
	TokenHash   string       `json:"tokenHash"`
	ShimPID     int          `json:"shimPid"`
	ShimStart   uint64       `json:"shimStart"`
	Start       uint64       `json:"start"`
	StopReason  string       `json:"stopReason,omitempty"`
	StopDetail  string       `json:"stopDetail,omitempty"`
	AnnouncedAt *time.Time   `json:"announcedAt,omitempty"`
	BootID      string       `json:"bootId,omitempty"` // the kernel boot the process ran in
	Agones      *agonesState `json:"agones,omitempty"`
	GameUID     int          `json:"gameUid,omitempty"`  // the game's own user (--game-uids)
	GameHome    string       `json:"gameHome,omitempty"` // the game's own HOME and TMPDIR, with GameUID
}

const recordFile = "record.json"

func (p *proc) record() record {
	return record{Process: p.view, TokenHash: p.tokenHash, ShimPID: p.shimPID, ShimStart: p.shimStart,
		Start: p.start, StopReason: p.stopReason, StopDetail: p.stopDetail, AnnouncedAt: p.announcedAt,
		BootID: p.bootID, Agones: p.agones, GameUID: p.uid, GameHome: p.home}
}

// persist queues the process record for the persister, which writes it off
// the loop (records of one process reach the disk in order).
func (t *table) persist(p *proc) {
	t.agonesChanged(p)
	if p.inflight || p.dir == "" {
		return
	}
	t.a.persist.write(p.dir, mustJSON(p.record()))
}

func (t *table) now() time.Time { return t.a.clock.Now().UTC() }

// load reads the table back from the data dir after a restart.
func (t *table) load() ([]*proc, error) {
	// Report numbers start at the reserved block or the wall clock in
	// milliseconds, whichever is higher: even a lost seq file cannot make
	// them go back, as reports are far rarer than one a millisecond.
	if raw, err := os.ReadFile(filepath.Join(t.a.cfg.DataDir, "seq")); err == nil {
		t.seq, _ = strconv.ParseUint(strings.TrimSpace(string(raw)), 10, 64)
	}
	t.seq = max(t.seq, uint64(t.a.clock.Now().UnixMilli()))
	t.seqReserved = t.seq
	if _, err := os.Stat(filepath.Join(t.a.cfg.DataDir, "shutdown")); err == nil {
		now := t.now()
		t.shuttingDown, t.shutdownAt = true, &now
	}
	entries, err := os.ReadDir(t.a.procsDir())
	if err != nil {
		return nil, err
	}
	var adopted []*proc
	for _, e := range entries {
		dir := filepath.Join(t.a.procsDir(), e.Name())
		raw, err := os.ReadFile(filepath.Join(dir, recordFile))
		var rec record
		if err == nil {
			if err = jsonUnmarshal(raw, &rec); err == nil && rec.Process.ID != e.Name() {
				err = fmt.Errorf("record names process %q", rec.Process.ID)
			}
		}
		if err != nil {
			// A spawn the previous LSPM died in before its record was
			// written, or a record it cannot read. A game server it
			// started must not run unseen: the machine would look empty.
			t.a.orphaned(dir, err)
			continue
		}
		p := &proc{view: rec.Process, tokenHash: rec.TokenHash, dir: dir, shimPID: rec.ShimPID,
			shimStart: rec.ShimStart, start: rec.Start, stopReason: rec.StopReason,
			stopDetail: rec.StopDetail, announcedAt: rec.AnnouncedAt, bootID: rec.BootID, done: make(chan struct{}),
			agones: rec.Agones, uid: rec.GameUID, home: rec.GameHome}
		if p.agones != nil {
			p.agones.watch = make(chan struct{})
			p.agones.awaitPing = true // agones.go
		}
		p.period, p.threshold, p.startTimeout = t.a.healthOf(p.view.Health)
		if api.IsTerminal(p.view.State) {
			close(p.done)
			t.ended = append(t.ended, p)
			t.endedByID[p.view.ID] = p
			continue
		}
		if rec.BootID != "" && t.a.bootID != "" && rec.BootID != t.a.bootID {
			// The machine rebooted: the process is gone, and its pid may
			// name another process now. Signal nothing.
			now := t.now()
			p.view.State, p.view.EndedAt = api.StateLost, &now
			p.view.Exit = &api.Exit{Reason: api.ReasonLost, Detail: "the machine restarted while the process ran", LogTail: capLines(tailLines(filepath.Join(dir, logFile), 50))}
			close(p.done)
			t.ended = append(t.ended, p)
			t.endedByID[p.view.ID] = p
			t.persist(p)
			continue
		}
		// Live when we died: heartbeats count from now, so a restart never
		// makes a healthy game look hung.
		p.lastBeat = t.now()
		p.startClock, p.adopted = p.lastBeat, true
		t.live[p.view.ID] = p
		t.byToken[p.tokenHash] = p.view.ID
		for _, port := range p.view.Ports {
			t.ports[port] = p.view.ID
		}
		if p.agones != nil {
			t.ports[p.agones.HTTPPort], t.ports[p.agones.GRPCPort] = p.view.ID, p.view.ID
		}
		adopted = append(adopted, p)
	}
	sort.Slice(t.ended, func(i, j int) bool { return endedAt(t.ended[i]).Before(endedAt(t.ended[j])) })
	t.trimHistory()
	if err := t.sweepFreeUIDs(adopted); err != nil {
		return nil, err
	}
	return adopted, nil
}

func endedAt(p *proc) time.Time {
	if p.view.EndedAt != nil {
		return *p.view.EndedAt
	}
	return p.view.CreatedAt
}

// loadState is the machine state of the Status object.
func (t *table) loadState() string {
	switch {
	case t.shuttingDown:
		return api.LoadShuttingDown
	case len(t.live) == 0:
		return api.LoadEmpty
	case len(t.live) >= t.a.cfg.MaxProcesses:
		return api.LoadFull
	}
	return api.LoadPartial
}

// changed tells the reporter that the state moved.
func (t *table) changed() {
	select {
	case t.a.changed <- struct{}{}:
	default:
	}
}

// spawnPlan is what reserve hands the spawning goroutine.
type spawnPlan struct {
	id     string
	dir    string
	ports  map[string]int
	record []byte       // the first record, for the shim to complete and write
	agones *agonesState // a copy of the Agones SDK ports, or nil
	uid    int          // the game's own user and group, or 0
	home   string       // with uid: the game's own HOME, to create
}

// reserve admits a spawn: it is the single point where the handshake, the
// capacity and port allocation are decided, so a spawn and a handshake can
// never both succeed against each other.
func (t *table) reserve(id string, req api.SpawnRequest, argv []string, tokenHash string, portNames []string) (spawnPlan, error) {
	if t.shuttingDown {
		return spawnPlan{}, rest.Errorf(rest.Unavailable, api.CodeShuttingDown, "machine %s is shutting down and takes no new processes", t.a.cfg.MachineID)
	}
	if len(t.live) >= t.a.cfg.MaxProcesses {
		return spawnPlan{}, rest.Errorf(rest.Conflict, api.CodeFull, "machine %s runs %d of %d processes", t.a.cfg.MachineID, len(t.live), t.a.cfg.MaxProcesses)
	}
	if _, ok := t.live[id]; ok {
		return spawnPlan{}, rest.Errorf(rest.Conflict, api.CodeExists, "process %s exists", id)
	}
	if _, ok := t.endedByID[id]; ok {
		return spawnPlan{}, rest.Errorf(rest.Conflict, api.CodeExists, "process %s exists (ended)", id)
	}
	ports := make(map[string]int, len(portNames))
	for _, name := range portNames {
		port, ok := t.allocPort(id)
		if !ok {
			for _, p := range ports {
				delete(t.ports, p)
			}
			return spawnPlan{}, rest.Errorf(rest.Conflict, api.CodeFull, "no free port left in %d-%d", t.a.cfg.PortMin, t.a.cfg.PortMax)
		}
		ports[name] = port
	}
	var agones *agonesState
	if req.SDK == api.SDKAgones {
		httpPort, ok1 := t.allocPort(id)
		grpcPort, ok2 := t.allocPort(id)
		if !ok1 || !ok2 {
			for _, p := range ports {
				delete(t.ports, p)
			}
			for _, p := range []int{httpPort, grpcPort} {
				if p != 0 {
					delete(t.ports, p)
				}
			}
			return spawnPlan{}, rest.Errorf(rest.Conflict, api.CodeFull, "no free port left in %d-%d for the Agones SDK", t.a.cfg.PortMin, t.a.cfg.PortMax)
		}
		agones = newAgonesState(httpPort, grpcPort)
	}
	uid := 0
	if t.a.cfg.GameUIDMin != 0 {
		var ok bool
		if uid, ok = t.allocUID(); !ok { // only if the range is smaller than --max-processes
			for _, p := range ports {
				delete(t.ports, p)
			}
			if agones != nil {
				delete(t.ports, agones.HTTPPort)
				delete(t.ports, agones.GRPCPort)
			}
			return spawnPlan{}, rest.Errorf(rest.Conflict, api.CodeFull, "no free game user left in %d-%d", t.a.cfg.GameUIDMin, t.a.cfg.GameUIDMax)
		}
	}
	h := req.Health
	if h == nil {
		h = &api.Health{}
	}
	p := &proc{
		view: api.Process{
			ID: id, Fleet: req.Fleet, MachineID: t.a.cfg.MachineID, State: api.StateStarting,
			Command: argv, Params: req.Params, Labels: req.Labels, Address: t.a.address,
			Ports: ports, SDK: req.SDK, CreatedAt: t.now(),
			MemoryLimitBytes: req.MemoryLimitBytes,
		},
		tokenHash: tokenHash,
		dir:       filepath.Join(t.a.procsDir(), id),
		inflight:  true,
		bootID:    t.a.bootID,
		done:      make(chan struct{}),
		agones:    agones,
		uid:       uid,
	}
	if uid != 0 {
		// Its own HOME: a game of its own user can write nowhere else but
		// /tmp. The name cannot be guessed, so no other game can plant it.
		p.home = filepath.Join(os.TempDir(), "dedi-game-"+rand.Text())
	}
	p.startClock = p.view.CreatedAt
	if p.view.Params == nil {
		p.view.Params = map[string]any{}
	}
	if p.view.Labels == nil {
		p.view.Labels = map[string]string{}
	}
	if p.view.SDK == "" {
		p.view.SDK = api.SDKDedi
	}
	if p.view.MemoryLimitBytes == 0 {
		p.view.MemoryLimitBytes = t.a.cfg.MemoryLimit
	} else if p.view.MemoryLimitBytes < 0 {
		p.view.MemoryLimitBytes = 0
	}
	p.period, p.threshold, p.startTimeout = t.a.healthOf(*h)
	p.view.Health = api.Health{PeriodSeconds: p.period.Seconds(), FailureThreshold: p.threshold, StartTimeoutSeconds: p.startTimeout.Seconds()}
	t.live[id] = p
	t.byToken[tokenHash] = id
	t.changed()
	plan := spawnPlan{id: id, dir: p.dir, ports: ports, record: mustJSON(p.record()), uid: uid, home: p.home}
	if agones != nil {
		plan.agones = &agonesState{HTTPPort: agones.HTTPPort, GRPCPort: agones.GRPCPort}
	}
	return plan, nil
}

// allocUID hands out the next user of --game-uids that no live process
// holds, going round the range so that a user is taken again as late as
// possible. A game's user is free again once its game has ended and the
// LSPM has swept every process of the user (finish); a user the sweep
// could not empty is never handed out again.
func (t *table) allocUID() (int, bool) {
	lo, n := t.a.cfg.gameUIDs()
	used := make(map[int]bool, len(t.live))
	for _, p := range t.live {
		used[p.uid] = true
	}
	for i := range n {
		k := (t.nextUID + i) % n
		if !used[lo+k] && !t.dirtyUIDs[lo+k] {
			t.nextUID = (k + 1) % n
			return lo + k, true
		}
	}
	return 0, false
}

// sweepFreeUIDs runs at start, before any game is spawned: every game user
// of --game-uids that no adopted game holds is swept, and what it left in
// shared places removed, as a previous run may have died between a game's
// end and its sweep, or left a process whose record it could not read.
// Users are then handed out after the highest one adopted, so a restart
// does not bring the just-freed ones back first.
//
// A sweep kills whatever runs as the sweeper (--game-uids' first user)
// too, so the LSPM does not start while something does: a game an earlier
// LSPM started as that user (before it was the sweeper, or with another
// range) would die.
func (t *table) sweepFreeUIDs(adopted []*proc) error {
	lo, n := t.a.cfg.gameUIDs()
	if n == 0 {
		return nil
	}
	sweeper := t.a.cfg.GameUIDMin
	for _, p := range adopted {
		if p.uid == sweeper {
			return fmt.Errorf("--game-uids %d-%d: game %s runs as user %d, the range's first, which the LSPM keeps for itself (it sweeps games' users as it): stop that game or move the range",
				sweeper, t.a.cfg.GameUIDMax, p.view.ID, sweeper)
		}
	}
	if anyRunsAs(sweeper) {
		return fmt.Errorf("--game-uids %d-%d: a process runs as user %d, the range's first, which the LSPM keeps for itself (it sweeps games' users as it, which would kill it): stop it or move the range",
			sweeper, t.a.cfg.GameUIDMax, sweeper)
	}
	held := map[int]bool{}
	top := -1
	for _, p := range adopted {
		if p.uid >= lo && p.uid < lo+n {
			held[p.uid] = true
			top = max(top, p.uid-lo)
		}
	}
	free := make([]int, 0, n)
	for uid := lo; uid < lo+n; uid++ {
		if !held[uid] {
			free = append(free, uid)
		}
	}
	clean := make(map[int]bool, len(free))
	for _, uid := range free {
		clean[uid] = true
	}
	for _, uid := range sweepUsers(t.a.cfg.GameUIDMin, free...) {
		t.markDirtyUID(uid)
		delete(clean, uid)
	}
	removeUserLeftovers(clean)
	t.nextUID = (top + 1) % n
	return nil
}

// markDirtyUID keeps a game user that may still run processes out of
// allocUID for the rest of this run; the next run sweeps it again.
func (t *table) markDirtyUID(uid int) {
	if t.dirtyUIDs == nil {
		t.dirtyUIDs = map[int]bool{}
	}
	if !t.dirtyUIDs[uid] {
		t.dirtyUIDs[uid] = true
		t.a.log.Error("processes of a game user survived SIGKILL; the user is not given to another game until the LSPM restarts", "uid", uid)
	}
}

// allocPort hands out the next port of the range that no live process holds
// and that nothing else on the host has bound.
func (t *table) allocPort(id string) (int, bool) {
	n := t.a.cfg.PortMax - t.a.cfg.PortMin + 1
	for i := 0; i < n; i++ {
		port := t.a.cfg.PortMin + (t.nextPort+i)%n
		if _, used := t.ports[port]; used || !portFree(port) {
			continue
		}
		t.ports[port] = id
		t.nextPort = (port - t.a.cfg.PortMin + 1) % n
		return port, true
	}
	return 0, false
}

// portFree checks that both TCP and UDP can bind the port on all addresses.
func portFree(port int) bool {
	addr := ":" + strconv.Itoa(port)
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return false
	}
	l.Close()
	c, err := net.ListenPacket("udp", addr)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

// commit records a started game server.
func (t *table) commit(id string, l launched) api.Process {
	p := t.live[id]
	p.inflight = false
	p.shimPID, p.shimStart, p.start = l.shimPID, l.shimStart, l.start
	p.view.PID = l.pid
	p.lastBeat = t.now()
	t.persist(p)
	t.changed()
	return p.view
}

// abort forgets a reservation whose shim could not start the game.
func (t *table) abort(id string) {
	p := t.live[id]
	if p == nil {
		return
	}
	t.release(p)
	delete(t.live, id)
	t.changed()
}

func (t *table) release(p *proc) {
	for _, port := range p.view.Ports {
		if t.ports[port] == p.view.ID {
			delete(t.ports, port)
		}
	}
	if p.agones != nil {
		for _, port := range []int{p.agones.HTTPPort, p.agones.GRPCPort} {
			if t.ports[port] == p.view.ID {
				delete(t.ports, port)
			}
		}
	}
	delete(t.byToken, p.tokenHash)
}

// end records the end of a game server from its shim's exit record (nil
// when the shim vanished without one).
func (t *table) end(id string, ex *exitRecord, tail []string, detail string) {
	p := t.live[id]
	if p == nil || p.inflight {
		return
	}
	now := t.now()
	exit := &api.Exit{Reason: api.ReasonCrashed, LogTail: tail, Detail: p.stopDetail}
	if exit.LogTail == nil {
		exit.LogTail = []string{}
	}
	if ex == nil {
		exit.Reason, exit.Detail = api.ReasonLost, detail
		p.view.State = api.StateLost
	} else {
		exit.Code, exit.Signal = ex.Code, ex.Signal
		now = ex.At
		clean := ex.Code != nil && *ex.Code == 0
		switch {
		case p.stopReason == api.ReasonKilled:
			exit.Reason, p.view.State = api.ReasonKilled, api.StateKilled
		case p.stopReason == api.ReasonUnhealthy:
			exit.Reason, p.view.State = api.ReasonUnhealthy, api.StateUnhealthy
		case p.stopReason == api.ReasonMemoryLimit:
			exit.Reason, p.view.State = api.ReasonMemoryLimit, api.StateCrashed
		case clean || p.agones != nil && p.agones.Shutdown && ex.Signal == "SIGTERM":
			// After an Agones Shutdown, the SIGTERM that follows it
			// (agonesTick) is the expected end.
			exit.Reason, p.view.State = api.ReasonExited, api.StateExited
		default:
			p.view.State = api.StateCrashed
			if exit.Detail == "" {
				exit.Detail = describeExit(ex)
			}
		}
	}
	p.view.EndedAt = &now
	p.view.Exit = exit
	t.release(p)
	delete(t.live, id)
	t.ended = append(t.ended, p)
	t.endedByID[id] = p
	if t.a.cfg.VMMURL != "" {
		t.unacked = append(t.unacked, p)
		if len(t.unacked) > maxUnacked {
			t.unacked = t.unacked[1:]
		}
	}
	close(p.done)
	t.persist(p)
	t.trimHistory()
	t.changed()
	t.a.log.Info("process ended", "process", id, "state", p.view.State, "reason", exit.Reason,
		"code", codeString(exit.Code), "signal", exit.Signal)
}

func codeString(c *int) string {
	if c == nil {
		return ""
	}
	return strconv.Itoa(*c)
}

func describeExit(ex *exitRecord) string {
	if ex.Signal != "" {
		return "killed by " + ex.Signal
	}
	return fmt.Sprintf("exited with code %s", codeString(ex.Code))
}

// trimHistory keeps the newest cfg.History ended processes; older records
// and logs are removed from disk.
func (t *table) trimHistory() {
	for len(t.ended) > t.a.cfg.History {
		old := t.ended[0]
		t.ended = t.ended[1:]
		delete(t.endedByID, old.view.ID)
		t.a.persist.remove(old.dir)
	}
}

// stop asks a live process to end: SIGTERM to its group, SIGKILL after
// grace. The first reason given wins.
func (t *table) stop(p *proc, reason, detail string, grace time.Duration) {
	if p.inflight || p.stopReason != "" && reason != api.ReasonKilled {
		return
	}
	if p.stopReason == "" {
		p.stopReason, p.stopDetail = reason, detail
		t.persist(p)
		t.a.log.Info("stopping process", "process", p.view.ID, "reason", reason, "detail", detail)
	}
	t.a.kill(p.view.PID, p.start, grace, p.done)
}

// checkHealth is the health clock: start timeouts, missed heartbeats, and
// the grace of processes that announced their end.
func (t *table) checkHealth() {
	now := t.now()
	t.agonesTick(now)
	for _, p := range t.live {
		if p.inflight || p.stopReason != "" {
			continue
		}
		switch {
		case p.announcedAt != nil:
			if now.Sub(*p.announcedAt) > t.a.cfg.Grace {
				t.stop(p, api.ReasonKilled, fmt.Sprintf("announced shutdown but still running after the %s grace", t.a.cfg.Grace), 0)
			}
		case p.view.State == api.StateStarting:
			if now.Sub(p.startClock) > p.startTimeout {
				t.stop(p, api.ReasonUnhealthy, fmt.Sprintf("not ready within the start timeout of %s", p.startTimeout), t.a.cfg.Grace)
			}
		case p.agones != nil && p.agones.awaitPing:
			// Adopted, and no Agones ping since: its stream may be gone
			// for good (agones.go).
		default:
			limit := p.period * time.Duration(p.threshold)
			if silent := now.Sub(p.lastBeat); silent > limit {
				t.stop(p, api.ReasonUnhealthy, fmt.Sprintf("no heartbeat for %s (%d missed periods of %s)",
					silent.Round(time.Millisecond), p.threshold, p.period), t.a.cfg.Grace)
			}
		}
	}
}

// sample applies the memory sampler's readings.
func (t *table) sample(rss map[string]int64) {
	for id, bytes := range rss {
		p := t.live[id]
		if p == nil {
			continue
		}
		p.view.RSSBytes = bytes
		if limit := p.view.MemoryLimitBytes; limit > 0 && bytes > limit && p.stopReason == "" {
			t.stop(p, api.ReasonMemoryLimit, fmt.Sprintf("resident memory %d bytes passed the limit of %d", bytes, limit), 0)
		}
	}
}

// lookup finds a live or ended process.
func (t *table) lookup(id string) *proc {
	if p := t.live[id]; p != nil {
		return p
	}
	return t.endedByID[id]
}

// principal answers who a non-machine token is: the id of the process it
// belongs to, or "" for nobody.
func (t *table) principal(tokenHash string) string { return t.byToken[tokenHash] }

// processCall authorises a process-token call on id and returns the live
// process.
func (t *table) processCall(id, tokenHash string) (*proc, error) {
	owner := t.byToken[tokenHash]
	if owner == "" {
		if t.endedByID[id] != nil && t.endedByID[id].tokenHash == tokenHash {
			return t.endedByID[id], nil
		}
		return nil, rest.ErrUnauthorized()
	}
	if owner != id {
		return nil, rest.ErrForbidden("act on another process")
	}
	return t.live[id], nil
}

// ready may come before commit: a fast game server calls it before its
// shim has told the LSPM that it started.
func (t *table) ready(p *proc) {
	// A process being stopped (its start timeout ran out, or it was
	// killed) stays as it is: made ready in its grace, it would be
	// allocated and then killed under its players.
	if p.view.State != api.StateStarting || p.stopReason != "" {
		return
	}
	now := t.now()
	p.view.State = api.StateReady
	p.view.ReadyAt = &now
	p.view.LastHeartbeatAt = &now
	p.lastBeat = now
	t.persist(p)
	t.changed()
}

func (t *table) heartbeat(p *proc, hb api.Heartbeat) {
	if api.IsTerminal(p.view.State) {
		return
	}
	if p.view.State == api.StateStarting && p.adopted {
		// The SDKs heartbeat only once ready: the record of its ready was
		// still queued when the previous LSPM died.
		t.ready(p)
	}
	now := t.now()
	p.lastBeat = now
	p.view.LastHeartbeatAt = &now
	if hb.Players != nil && *hb.Players != p.view.Players {
		p.view.Players = *hb.Players
		t.changed()
	}
	if hb.Instances != nil {
		p.view.Instances = *hb.Instances
	}
}

func (t *table) allocate(p *proc) error {
	if p.agones.reservedAt(t.now()) {
		return rest.Errorf(rest.Conflict, "reserved", "process %s reserved itself through the Agones SDK", p.view.ID)
	}
	switch p.view.State {
	case api.StateReady:
		p.view.State = api.StateAllocated
		t.persist(p)
		t.changed()
		return nil
	case api.StateAllocated:
		return nil
	}
	return rest.Errorf(rest.Conflict, "not_ready", "process %s is %s; only a ready process can be allocated", p.view.ID, p.view.State)
}

// shutdown is the handshake (DESIGN.md): atomic with reserve because both
// run on the loop.
func (t *table) shutdown() error {
	if t.shuttingDown {
		return nil
	}
	if n := len(t.live); n > 0 {
		inflight := 0
		for _, p := range t.live {
			if p.inflight {
				inflight++
			}
		}
		return rest.Errorf(rest.Conflict, api.CodeBusy, "%d processes live, %d of them spawns in flight", n, inflight)
	}
	now := t.now()
	t.shuttingDown, t.shutdownAt = true, &now
	if err := writeFileAtomic(filepath.Join(t.a.cfg.DataDir, "shutdown"), []byte(now.Format(time.RFC3339Nano))); err != nil {
		t.a.log.Error("persist shutdown marker", "err", err)
	}
	t.changed()
	t.a.log.Info("shutdown handshake accepted")
	return nil
}

// status returns the Status object; with next it takes a new report
// sequence number, persisted in blocks so it keeps rising across restarts.
func (t *table) status(next bool) api.Status {
	if next {
		t.seq++
		if t.seq > t.seqReserved {
			t.seqReserved = t.seq + 1000
			if err := writeFileAtomic(filepath.Join(t.a.cfg.DataDir, "seq"), []byte(strconv.FormatUint(t.seqReserved, 10))); err != nil {
				t.a.log.Error("persist report sequence", "err", err)
			}
		}
	}
	st := api.Status{
		MachineID: t.a.cfg.MachineID, State: t.loadState(), Seq: t.seq, MaxProcesses: t.a.cfg.MaxProcesses,
		Processes: t.liveViews(), Hardware: t.a.hardware, StartedAt: t.a.startedAt, ShutdownAt: t.shutdownAt, At: t.now(),
	}
	// Ended processes ride along until a report carrying them was
	// acknowledged, so the VMM learns every end with its evidence even
	// when it was down at the time.
	for i := 0; i < len(t.unacked) && len(st.Ended) < maxEndsPerReport; i++ {
		p := t.unacked[i]
		if next && p.reportedIn == 0 {
			p.reportedIn = t.seq
		}
		st.Ended = append(st.Ended, p.view)
	}
	return st
}

// jumpSeq moves the report numbers ahead after the VMM called ours stale.
func (t *table) jumpSeq() {
	t.seq = max(t.seq+1_000_000, uint64(t.a.clock.Now().UnixMilli()))
}

// maxUnacked bounds the ends kept for a VMM that does not answer;
// maxEndsPerReport keeps a report small (each end carries up to 50 log
// lines of at most 512 bytes); the rest follow in the next reports.
const (
	maxUnacked       = 256
	maxEndsPerReport = 16
)

// ack drops the ends that the report seq, now acknowledged, carried.
func (t *table) ack(seq uint64) {
	keep := t.unacked[:0]
	for _, p := range t.unacked {
		if p.reportedIn == 0 || p.reportedIn > seq {
			keep = append(keep, p)
		}
	}
	clear(t.unacked[len(keep):])
	t.unacked = keep
	t.ackedSeq = max(t.ackedSeq, seq)
	waiting := t.delivered[:0]
	for _, w := range t.delivered {
		if t.ackedSeq >= w.seq && len(t.unacked) == 0 {
			close(w.done)
		} else {
			waiting = append(waiting, w)
		}
	}
	clear(t.delivered[len(waiting):])
	t.delivered = waiting
}

// waitDelivered returns a channel closed once the VMM has acknowledged a
// report taken after now (so it shows the table as it is now) and every
// end recorded so far.
func (t *table) waitDelivered() <-chan struct{} {
	w := deliveryWait{seq: t.seq + 1, done: make(chan struct{})}
	if len(t.delivered) >= 64 { // a VMM that never answers, asked again and again
		close(t.delivered[0].done)
		t.delivered = t.delivered[1:]
	}
	t.delivered = append(t.delivered, w)
	t.changed()
	return w.done
}

func (t *table) liveViews() []api.Process {
	out := make([]api.Process, 0, len(t.live))
	for _, p := range t.live {
		if !p.inflight {
			out = append(out, p.view)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].CreatedAt.Before(out[j].CreatedAt) })
	return out
}

// all is GET /v1/processes: live first, then ended newest first.
func (t *table) all() []api.Process {
	out := t.liveViews()
	for i := len(t.ended) - 1; i >= 0; i-- {
		out = append(out, t.ended[i].view)
	}
	return out
}

// killTargets lists the live processes for a drain.
func (t *table) stopAll(grace time.Duration) []chan struct{} {
	var dones []chan struct{}
	for _, p := range t.live {
		if p.inflight {
			continue
		}
		t.stop(p, api.ReasonKilled, "the LSPM drained on exit", grace)
		dones = append(dones, p.done)
	}
	return dones
}

// kill sends SIGTERM to a process group and SIGKILL after grace unless done
// closes first; it runs off the loop.
func (a *Agent) kill(pid int, start uint64, grace time.Duration, done <-chan struct{}) {
	signal := func(sig syscall.Signal) {
		if pidAlive(pid, start) {
			_ = syscall.Kill(-pid, sig)
		}
	}
	if grace <= 0 {
		signal(syscall.SIGKILL)
		return
	}
	signal(syscall.SIGTERM)
	a.goOwned(func(ctx context.Context) {
		timer := time.NewTimer(grace)
		defer timer.Stop()
		select {
		case <-done:
		case <-ctx.Done():
		case <-timer.C:
			signal(syscall.SIGKILL)
		}
	})
}
