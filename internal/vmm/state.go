package vmm

import (
	"encoding/json"
	"fmt"
	"sort"
	"time"

	"github.com/google/uuid"

	"dedi.dev/dedi/api"
	"dedi.dev/dedi/internal/rest"
	"dedi.dev/dedi/internal/store"
)

// state is the VMM's state machine, owned by the loop goroutine. Others
// send it closures and get copies back; it never does I/O itself: store
// writes go to the committer, provider and LSPM calls run in goroutines
// that post their results back.
//
// A machine moves through
//
//	provisioning --created--> booting --first report--> ready --idle--> draining --handshake 200--> shutting_down --deleted--> terminated
//	     |                       |                        ^                 |
//	     |                       +--boot timeout--> (deleted, replaced)    +--409 busy--> ready
//	     +--create failed--> terminated            any live state --no reports--> lost
type state struct {
	v *VMM

	fleets    map[string]*fleetState
	machines  map[string]*machineState
	processes map[string]*api.Process
	eventSeq  int64
	ops       []store.Op // writes of the command being run, committed as one batch
	events    []api.Event
	waiters   map[string][]chan api.Process // ?wait=ready requests by process
	byToken   map[string]string             // machine token hash -> machine id
	asking    map[string]bool               // processes being asked for at their LSPM
	sums      map[string]uint64             // live process -> hash of its fixed members as last reported (see report)
	seen      map[string]struct{}           // applyReport's scratch set, kept to spare an allocation per report
	interned  interner                      // commands and label sets shared between processes
	procOrder int64                         // insertion order of process rows
	// lostFrom holds lost detection back after a start, until the LSPMs
	// have had LostAfter to reach the new VMM.
	lostFrom time.Time
	ticks    int
	lastTick time.Time // when tick last ran: a long gap is the VMM's own stall
}

// pruneMachines forgets the oldest machines that are gone for good
// (terminated, or lost with nothing left at the provider) beyond the newest
// KeepEndedMachines, in memory and in the store: a fleet that scales up and
// down every hour would otherwise grow the VMM's state without bound.
func (s *state) pruneMachines() {
	var gone []*machineState
	for _, m := range s.machines {
		if !m.busy && (m.m.State == api.MachineTerminated || (m.m.State == api.MachineLost && m.released)) {
			gone = append(gone, m)
		}
	}
	extra := len(gone) - s.v.cfg.KeepEndedMachines
	if extra <= 0 {
		return
	}
	sort.Slice(gone, func(i, j int) bool { return gone[i].m.CreatedAt.Before(gone[j].m.CreatedAt) })
	for _, m := range gone[:extra] {
		delete(s.machines, m.m.ID)
		if s.byToken[m.tokenTH] == m.m.ID {
			delete(s.byToken, m.tokenTH)
		}
		s.ops = append(s.ops, store.Op{Table: store.Machines, Key: m.m.ID, Delete: true})
	}
}

// pruneEnded keeps the newest KeepEnded ended processes in memory (the
// committer prunes the store alike).
func (s *state) pruneEnded() {
	var ended []*api.Process
	for _, p := range s.processes {
		if api.IsTerminal(p.State) {
			ended = append(ended, p)
		}
	}
	extra := len(ended) - s.v.cfg.KeepEnded
	if extra <= 0 {
		return
	}
	sort.Slice(ended, func(i, j int) bool { return endedAt(ended[i]).Before(endedAt(ended[j])) })
	for _, p := range ended[:extra] {
		delete(s.processes, p.ID)
		delete(s.sums, p.ID)
	}
}

func endedAt(p *api.Process) time.Time {
	if p.EndedAt != nil {
		return *p.EndedAt
	}
	return p.CreatedAt
}

// wakeReady answers the requests waiting for a process to leave starting.
func (s *state) wakeReady(p *api.Process) {
	if p.State == api.StateStarting {
		return
	}
	for _, c := range s.waiters[p.ID] {
		c <- *p // buffered, one each
	}
	delete(s.waiters, p.ID)
}

type fleetState struct {
	spec     api.Fleet
	deleting bool
	// After the provider failed to create a machine, no new one is asked
	// for until createAfter (backoff doubling up to 5 minutes).
	createAfter   time.Time
	createBackoff time.Duration
	createErr     string
}

type machineState struct {
	m         api.Machine
	token     string
	tokenTH   string // its hash, compared with a caller's
	lspmURL   string
	reserved  int                 // slots held by placements in flight (len of pending)
	pending   map[string]bool     // ids of the placements in flight
	procs     map[string]struct{} // live processes placed here
	idleAt    time.Time           // when it last became empty
	bootBy    time.Time           // first report due by
	busy      bool                // a provider call or handshake is in flight
	retryAt   time.Time           // when a failed provider delete is tried again
	removing  bool                // deletion asked (DELETE or fleet deletion)
	fromStore bool                // recorded by an earlier run (reconcile judges it)
	released  bool                // lost, and nothing of it left at the provider
	createErr string              // why the provider could not create it
	ready     chan struct{}       // closed when it leaves provisioning/booting
}

// storedMachine is a machine's row in the store.
type storedMachine struct {
	Machine  api.Machine `json:"machine"`
	Token    string      `json:"token"`
	LSPMURL  string      `json:"lspmUrl"`
	Removing bool        `json:"removing,omitempty"`
	// Released: the provider holds nothing of this lost machine any more
	// (deleted, or found gone); its providerId stays as evidence.
	Released bool `json:"released,omitempty"`
}

func (s *state) now() time.Time { return s.v.clock.Now().UTC() }

func (s *state) live(m *machineState) bool {
	switch m.m.State {
	case api.MachineTerminated, api.MachineLost:
		return false
	}
	return true
}

// event records a change for the store and the event stream.
func (s *state) event(typ, fleet, machine, process, st, detail string) {
	s.eventSeq++
	e := api.Event{Seq: s.eventSeq, Type: typ, At: s.now(), Fleet: fleet, MachineID: machine, ProcessID: process, State: st, Detail: detail}
	s.events = append(s.events, e)
	s.ops = append(s.ops, store.Op{Table: store.Events, Seq: e.Seq, Body: mustJSON(e)})
}

func (s *state) saveFleet(f *fleetState) {
	spec := f.spec
	if f.deleting {
		spec.State = "deleting"
	}
	s.ops = append(s.ops, store.Op{Table: store.Fleets, Key: spec.Name, Body: mustJSON(spec)})
}

func (s *state) saveMachine(m *machineState) {
	m.m.ProcessCount = len(m.procs)
	s.ops = append(s.ops, store.Op{Table: store.Machines, Key: m.m.ID, Fleet: m.m.Fleet, State: m.m.State,
		Body: mustJSON(storedMachine{Machine: m.m, Token: m.token, LSPMURL: m.lspmURL, Removing: m.removing, Released: m.released})})
}

func (s *state) saveProcess(p *api.Process) {
	s.procOrder++
	s.ops = append(s.ops, store.Op{Table: store.Processes, Key: p.ID, Fleet: p.Fleet, Machine: p.MachineID,
		State: p.State, Ended: api.IsTerminal(p.State), Order: s.procOrder, Body: mustJSON(p)})
}

// setMachineState moves a machine and records the event.
func (s *state) setMachineState(m *machineState, st, detail string) {
	if m.m.State == st {
		return
	}
	m.m.State = st
	if st != api.MachineProvisioning && st != api.MachineBooting {
		select {
		case <-m.ready:
		default:
			close(m.ready)
		}
	}
	s.saveMachine(m)
	s.event("machine."+st, m.m.Fleet, m.m.ID, "", st, detail)
}

// --- fleets

func (s *state) createFleet(f api.Fleet) (api.Fleet, error) {
	if _, ok := s.fleets[f.Name]; ok {
		return api.Fleet{}, rest.Errorf(rest.Conflict, api.CodeExists, "fleet %q exists", f.Name)
	}
	if _, ok := s.v.cfg.Providers[f.Provider]; !ok {
		return api.Fleet{}, rest.Errorf(rest.Invalid, "", "provider %q is not configured on this VMM", f.Provider)
	}
	f.CreatedAt = s.now()
	f.State = "active"
	fs := &fleetState{spec: f}
	s.fleets[f.Name] = fs
	s.saveFleet(fs)
	s.event("fleet.created", f.Name, "", "", "active", "")
	return f, nil
}

func (s *state) fleetView(f *fleetState) api.Fleet {
	v := f.spec
	v.State = "active"
	if f.deleting {
		v.State = "deleting"
	}
	return v
}

func (s *state) deleteFleet(name string) (api.Fleet, error) {
	f, ok := s.fleets[name]
	if !ok {
		return api.Fleet{}, rest.Errorf(rest.NotFound, "", "no fleet %q", name)
	}
	if !f.deleting {
		f.deleting = true
		for _, m := range s.machines {
			if m.m.Fleet == name && s.live(m) {
				m.removing = true
				s.saveMachine(m)
			}
		}
		s.saveFleet(f)
		s.event("fleet.deleting", name, "", "", "deleting", "")
	}
	s.maybeRemoveFleet(name)
	return s.fleetView(f), nil
}

// maybeRemoveFleet forgets a deleting fleet once its machines are gone.
func (s *state) maybeRemoveFleet(name string) {
	f := s.fleets[name]
	if f == nil || !f.deleting {
		return
	}
	for _, m := range s.machines {
		if m.m.Fleet == name && s.live(m) {
			return
		}
	}
	delete(s.fleets, name)
	s.ops = append(s.ops, store.Op{Table: store.Fleets, Key: name, Delete: true})
	s.event("fleet.deleted", name, "", "", "deleted", "")
}

// --- machines

// newMachine records a machine to provision and returns it; the caller
// starts the provider call.
func (s *state) newMachine(f *fleetState) *machineState {
	m := &machineState{
		m: api.Machine{ID: s.newMachineID(), Fleet: f.spec.Name, Provider: f.spec.Provider,
			State: api.MachineProvisioning, Load: api.LoadEmpty, MaxProcesses: f.spec.ProcessesPerMachine, CreatedAt: s.now()},
		token: newToken(), procs: map[string]struct{}{}, ready: make(chan struct{}), busy: true,
		bootBy: s.now().Add(s.v.cfg.BootTimeout),
	}
	m.tokenTH = rest.TokenHash(m.token)
	s.machines[m.m.ID] = m
	s.byToken[m.tokenTH] = m.m.ID
	s.saveMachine(m)
	s.event("machine.provisioning", m.m.Fleet, m.m.ID, "", api.MachineProvisioning, "")
	s.v.provision(m.m.ID, f.spec, m.token)
	return m
}

func (s *state) newMachineID() string {
	for {
		id := "m-" + uuid.NewString()
		if _, taken := s.machines[id]; !taken {
			return id
		}
	}
}

// created records the provider's answer to a create.
func (s *state) created(id string, providerID, address, lspmURL string, err error) {
	m := s.machines[id]
	if m == nil {
		return
	}
	m.busy = false
	f := s.fleets[m.m.Fleet]
	if err != nil {
		m.createErr = err.Error()
		if f != nil {
			f.createBackoff = min(max(2*f.createBackoff, 5*time.Second), 5*time.Minute)
			f.createAfter = s.now().Add(f.createBackoff)
			f.createErr = err.Error()
		}
		s.setMachineState(m, api.MachineTerminated, "provider: "+err.Error())
		return
	}
	if f != nil {
		f.createBackoff, f.createErr = 0, ""
	}
	m.m.ProviderID, m.m.Address, m.lspmURL = providerID, address, lspmURL
	switch {
	case m.m.State == api.MachineProvisioning && m.m.LastReportAt != nil:
		s.setMachineState(m, api.MachineReady, "") // its first report came before the provider's answer
	case m.m.State == api.MachineProvisioning:
		m.bootBy = s.now().Add(s.v.cfg.BootTimeout)
		s.setMachineState(m, api.MachineBooting, "")
	default:
		s.saveMachine(m)
	}
}

// unreserve gives back the slot held for a placement, once: a report that
// adopted the process first has already turned the slot into it.
func (m *machineState) unreserve(id string) bool {
	if !m.pending[id] {
		return false
	}
	delete(m.pending, id)
	m.reserved--
	return true
}

// room is how many more processes the machine takes.
func (s *state) room(m *machineState) int {
	return m.m.MaxProcesses - len(m.procs) - m.reserved
}

func (s *state) requestMachineRemoval(id string) (api.Machine, error) {
	m := s.machines[id]
	if m == nil {
		return api.Machine{}, rest.Errorf(rest.NotFound, "", "no machine %q", id)
	}
	if s.live(m) && !m.removing {
		m.removing = true
		s.saveMachine(m)
		s.event("machine.removal_requested", m.m.Fleet, id, "", m.m.State, "")
	}
	return m.m, nil
}

// --- placement

// placement is a slot held on a machine for one process.
type placement struct {
	processID string
	machineID string
	ready     <-chan struct{} // closed when the machine can take the spawn
}

// place holds a slot for a new process of the fleet: on the ready machine
// that the fleet's policy picks, else on a booting machine with room, else
// on a new machine; never more machines than the demand needs.
func (s *state) place(req api.StartRequest, processID string) (placement, error) {
	f := s.fleets[req.Fleet]
	if f == nil {
		return placement{}, rest.Errorf(rest.NotFound, "", "no fleet %q", req.Fleet)
	}
	if f.deleting {
		return placement{}, rest.Errorf(rest.Conflict, "fleet_deleting", "fleet %q is being deleted", req.Fleet)
	}
	var best, booting *machineState
	liveCount := 0
	for _, m := range s.machines {
		if m.m.Fleet != req.Fleet || !s.live(m) {
			continue
		}
		liveCount++
		if m.removing || s.room(m) <= 0 {
			continue
		}
		switch m.m.State {
		case api.MachineReady:
			if m.lspmURL == "" || m.busy {
				continue
			}
			if best == nil || s.better(f.spec.Placement, m, best) {
				best = m
			}
		case api.MachineProvisioning, api.MachineBooting:
			if booting == nil || m.m.CreatedAt.Before(booting.m.CreatedAt) {
				booting = m
			}
		}
	}
	target := best
	if target == nil {
		target = booting
	}
	if target == nil {
		if now := s.now(); now.Before(f.createAfter) {
			e := rest.Errorf(rest.Unavailable, "provision_failed", "the provider could not create a machine for fleet %q: %s (next try in %s)",
				req.Fleet, f.createErr, f.createAfter.Sub(now).Round(time.Second))
			e.RetryAfter = int(f.createAfter.Sub(now).Seconds()) + 1
			return placement{}, e
		}
		if liveCount >= f.spec.Scaling.MaxMachines {
			e := rest.Errorf(rest.Unavailable, api.CodeNoCapacity, "fleet %q runs %d of %d machines and none has room", req.Fleet, liveCount, f.spec.Scaling.MaxMachines)
			e.RetryAfter = 2
			return placement{}, e
		}
		target = s.newMachine(f)
	}
	if target.pending == nil {
		target.pending = map[string]bool{}
	}
	target.pending[processID] = true
	target.reserved++
	target.idleAt = time.Time{}
	return placement{processID: processID, machineID: target.m.ID, ready: target.ready}, nil
}

// better tells whether a beats b under the policy.
func (s *state) better(policy string, a, b *machineState) bool {
	la, lb := len(a.procs)+a.reserved, len(b.procs)+b.reserved
	if la == lb {
		return a.m.ID < b.m.ID
	}
	if policy == api.PlacementDistributed {
		return la < lb
	}
	return la > lb // packed: the busiest that has room
}

// spawnTarget tells where to send a held placement, once its machine is
// ready: the LSPM and the spawn request.
type spawnTarget struct {
	lspmURL string
	token   string
	req     api.SpawnRequest
}

// target also reports whether the machine failed to be created.
func (s *state) target(pl placement, start api.StartRequest) (spawnTarget, bool, error) {
	m := s.machines[pl.machineID]
	if m == nil || m.m.State != api.MachineReady {
		if m != nil && m.createErr != "" {
			return spawnTarget{}, true, fmt.Errorf("machine %s could not be created: %s", pl.machineID, m.createErr)
		}
		st := "gone"
		if m != nil {
			st = m.m.State
		}
		return spawnTarget{}, false, fmt.Errorf("machine %s is %s", pl.machineID, st)
	}
	f := s.fleets[m.m.Fleet]
	if f == nil {
		return spawnTarget{}, false, fmt.Errorf("fleet %s is gone", m.m.Fleet)
	}
	h := f.spec.Health
	ports := f.spec.Ports
	if ports == nil {
		ports = []string{}
	}
	return spawnTarget{lspmURL: m.lspmURL, token: m.token, req: api.SpawnRequest{
		ID: pl.processID, Fleet: f.spec.Name, Command: f.spec.Command, Params: start.Params, Labels: start.Labels,
		Ports: ports, Health: &h, SDK: f.spec.SDK,
	}}, false, nil
}

// release gives a held slot back.
func (s *state) release(pl placement) {
	if m := s.machines[pl.machineID]; m != nil && m.unreserve(pl.processID) {
		if len(m.procs) == 0 && m.reserved == 0 {
			m.idleAt = s.now()
		}
	}
}

// placed records a process the LSPM accepted, turning the slot into it.
func (s *state) placed(pl placement, p api.Process) api.Process {
	m := s.machines[pl.machineID]
	if m != nil {
		m.unreserve(pl.processID)
	}
	if old := s.processes[p.ID]; old != nil && old.State != api.StateStarting {
		return *old // a report got here first
	}
	p.MachineID = pl.machineID
	if m != nil {
		p.Fleet = m.m.Fleet
	}
	s.processes[p.ID] = &p
	if m == nil || !s.live(m) {
		// The machine went away between the LSPM's answer and now.
		s.markProcessLost(&p, "its machine was lost while the process was placed")
		return p
	}
	if !api.IsTerminal(p.State) {
		m.procs[p.ID] = struct{}{}
	}
	// The machine's row is not written: its process count is rebuilt
	// from the process rows at start.
	s.saveProcess(&p)
	s.event("process."+p.State, p.Fleet, p.MachineID, p.ID, p.State, "")
	return p
}

// --- status reports

// applyReport applies an LSPM report in seq order; it returns whether it
// was applied and the live processes the VMM expected but the report did
// not mention (the caller asks the LSPM about them). A report whose
// processes do not decode changes nothing.
func (s *state) applyReport(id string, st *report) (bool, []string, error) {
	m := s.machines[id]
	if m == nil {
		return false, nil, rest.Errorf(rest.NotFound, "", "no machine %q", id)
	}
	if st.Seq <= m.m.Seq || !s.live(m) {
		// Stale, or from a machine already lost or gone: a lost machine
		// stays lost (its processes were ended and its deletion begun).
		return false, nil, nil
	}
	// The fixed members of processes new to the VMM, or changed, are
	// decoded first, so that a bad one rejects the report whole.
	var fixed map[int]api.Process
	live := st.Processes.All()
	for i := range live {
		lp := &live[i]
		if sum, ok := s.sums[lp.ID]; ok && sum == lp.sum && s.processes[lp.ID] != nil {
			continue
		}
		f, err := lp.decodeFixed()
		if err != nil {
			return false, nil, rest.Errorf(rest.Invalid, "", "body: %v", err)
		}
		s.interned.process(&f)
		if fixed == nil {
			fixed = map[int]api.Process{}
		}
		fixed[i] = f
	}
	now := s.now()
	m.m.Seq = st.Seq
	m.m.LastReportAt = &now
	dirty := m.m.Hardware == nil || *m.m.Hardware != st.Hardware
	if dirty {
		hw := st.Hardware
		m.m.Hardware = &hw
	}
	load := st.State
	if load == api.LoadShuttingDown { // API.md's load is empty, partial or full
		load = api.LoadEmpty
		if len(live) > 0 {
			load = api.LoadPartial
		}
	}
	dirty = dirty || m.m.Load != load
	m.m.Load = load
	if st.MaxProcesses > 0 && st.MaxProcesses != m.m.MaxProcesses {
		m.m.MaxProcesses, dirty = st.MaxProcesses, true
	}
	s.v.metrics.reportLag(now.Sub(st.At))
	if m.m.State == api.MachineBooting || (m.m.State == api.MachineProvisioning && m.lspmURL != "") {
		if st.State != api.LoadShuttingDown {
			s.setMachineState(m, api.MachineReady, "")
		}
	}
	seen := s.seen
	clear(seen)
	for i := range live {
		lp := &live[i]
		seen[lp.ID] = struct{}{}
		if f, ok := fixed[i]; ok {
			s.updateProcess(m, lp.process(f))
			if p := s.processes[lp.ID]; p != nil && !api.IsTerminal(p.State) {
				s.sums[lp.ID] = lp.sum
			}
			continue
		}
		s.moveProcess(m, lp)
	}
	for _, rp := range st.Ended {
		seen[rp.ID] = struct{}{}
		s.updateProcess(m, rp)
	}
	var missing []string
	for pid := range m.procs {
		if _, ok := seen[pid]; !ok && !s.asking[pid] {
			s.asking[pid] = true
			missing = append(missing, pid)
		}
	}
	if len(m.procs) == 0 && m.reserved == 0 && m.idleAt.IsZero() {
		m.idleAt = now
	}
	// Seq, report time and process count live in memory (the count is
	// rebuilt from the process rows at start): the row is written when
	// something a restarted VMM needs changed, not 2,000 times a second.
	if dirty {
		s.saveMachine(m)
	}
	return true, missing, nil
}

// moveProcess applies the moving fields of a live process whose fixed
// members are as the VMM last saw them: the steady path of a report.
func (s *state) moveProcess(m *machineState, lp *liveProcess) {
	p := s.processes[lp.ID]
	if api.IsTerminal(p.State) && p.State != api.StateLost {
		return // final; a late report cannot undo an end
	}
	changed := p.State != lp.State
	if p.State == api.StateLost {
		// The machine came back before it was given up: the process lives.
		p.EndedAt, p.Exit = nil, nil
	}
	p.State, p.PID, p.Players, p.Instances, p.RSSBytes = lp.State, lp.PID, lp.Players, lp.Instances, lp.RSSBytes
	p.MachineID = m.m.ID
	// Copies handed out share these pointers: a moved time gets a new one.
	if !lp.ReadyAt.IsZero() && (p.ReadyAt == nil || !p.ReadyAt.Equal(lp.ReadyAt)) {
		t := lp.ReadyAt
		p.ReadyAt = &t
	}
	if !lp.LastHeartbeatAt.IsZero() && (p.LastHeartbeatAt == nil || !p.LastHeartbeatAt.Equal(lp.LastHeartbeatAt)) {
		t := lp.LastHeartbeatAt
		p.LastHeartbeatAt = &t
	}
	m.procs[p.ID] = struct{}{}
	if changed {
		s.saveProcess(p)
		s.event("process."+p.State, p.Fleet, m.m.ID, p.ID, p.State, "")
		s.wakeReady(p)
	}
	// A changed player count is kept in memory only: it comes back with the
	// next report, and writing it would cost a row per heartbeat.
}

// updateProcess applies what an LSPM says of one process, whole.
func (s *state) updateProcess(m *machineState, rp api.Process) {
	p := s.processes[rp.ID]
	if p == nil {
		// Accepted by the LSPM but never recorded here (the VMM died in
		// between), or a process started on the LSPM directly: adopt it.
		cp := rp
		cp.MachineID, cp.Fleet = m.m.ID, m.m.Fleet
		p = &cp
		m.unreserve(p.ID) // its placement's slot becomes the process
		s.processes[p.ID] = p
		if !api.IsTerminal(p.State) {
			m.procs[p.ID] = struct{}{}
		}
		s.saveProcess(p)
		s.event("process."+p.State, p.Fleet, m.m.ID, p.ID, p.State, "adopted from the machine's report")
		s.wakeReady(p)
		return
	}
	if api.IsTerminal(p.State) && p.State != api.StateLost {
		return // final; a late report cannot undo an end
	}
	changed := p.State != rp.State
	fixedChanged := !changed && !sameFixed(p, &rp)
	keepFleet := p.Fleet
	*p = rp
	p.MachineID, p.Fleet = m.m.ID, keepFleet
	if api.IsTerminal(p.State) {
		delete(m.procs, p.ID)
		delete(s.sums, p.ID)
		if len(m.procs) == 0 && m.reserved == 0 {
			m.idleAt = s.now()
		}
	} else {
		m.procs[p.ID] = struct{}{}
	}
	if changed {
		detail := ""
		if p.Exit != nil {
			detail = p.Exit.Reason
			if p.Exit.Detail != "" {
				detail += ": " + p.Exit.Detail
			}
		}
		s.saveProcess(p)
		s.event("process."+p.State, p.Fleet, m.m.ID, p.ID, p.State, detail)
		s.wakeReady(p)
	} else if fixedChanged {
		s.saveProcess(p) // labels set by the game (Agones' SetLabel), for one
	}
}

// sameFixed reports whether two versions of a process agree on what a
// restarted VMM must know of it beyond its state.
func sameFixed(a, b *api.Process) bool {
	return mapsEqual(a.Labels, b.Labels) && a.Address == b.Address && mapsEqual(a.Ports, b.Ports) &&
		a.PID == b.PID && a.SDK == b.SDK
}

func mapsEqual[V comparable](a, b map[string]V) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

// markProcessLost ends a process whose machine went silent.
func (s *state) markProcessLost(p *api.Process, detail string) {
	now := s.now()
	p.State = api.StateLost
	p.EndedAt = &now
	p.Exit = &api.Exit{Reason: api.ReasonLost, Detail: detail, LogTail: []string{}}
	s.saveProcess(p)
	s.event("process.lost", p.Fleet, p.MachineID, p.ID, p.State, detail)
	s.wakeReady(p)
}

// --- the clock: lost machines, boot timeouts, idle shutdown, min machines

func (s *state) tick() {
	now := s.now()
	// A loop that could not tick for a report interval (a stalled disk, a
	// starved host) has not been reading reports either: the machines'
	// silence is the VMM's own. Lost detection waits one more interval, so
	// that a stall of the VMM never ends the games of machines that
	// reported all along.
	if !s.lastTick.IsZero() && now.Sub(s.lastTick) > s.v.cfg.TickInterval+s.v.cfg.ReportInterval {
		if hold := now.Add(s.v.cfg.ReportInterval); hold.After(s.lostFrom) {
			s.lostFrom = hold
		}
		s.v.log.Warn("the VMM's loop stalled; lost detection held back one report interval",
			"stall", now.Sub(s.lastTick).Round(time.Millisecond))
	}
	s.lastTick = now
	if s.ticks++; s.ticks%40 == 0 {
		s.pruneEnded()
		s.pruneMachines()
	}
	// The machines are looked over four times a report interval, not at
	// every tick: nothing they are judged on (lost after 3 intervals, boot
	// and idle timeouts in seconds) needs finer steps, and at 10,000
	// machines each look is a walk over all of them.
	if every := int(s.v.cfg.ReportInterval / (4 * s.v.cfg.TickInterval)); every > 1 && s.ticks%every != 0 {
		return
	}
	perFleet := map[string]int{} // machines that serve or will: min machines counts these
	for _, m := range s.machines {
		switch m.m.State {
		case api.MachineProvisioning, api.MachineBooting, api.MachineReady:
			perFleet[m.m.Fleet]++
		}
	}
	checkLost := !now.Before(s.lostFrom)
	for _, m := range s.machines {
		switch m.m.State {
		case api.MachineProvisioning, api.MachineBooting:
			if now.After(m.bootBy) && !m.busy {
				s.setMachineState(m, api.MachineShuttingDown, "no report within the boot timeout")
				m.busy = true
				s.v.deprovision(m.m.ID, m.m.Provider, m.m.ProviderID)
			}
		case api.MachineShuttingDown:
			// Resumed after a restart, or retried after a failed delete.
			if !m.busy && !now.Before(m.retryAt) {
				m.busy = true
				s.v.deprovision(m.m.ID, m.m.Provider, m.m.ProviderID)
			}
		case api.MachineReady, api.MachineDraining:
			if checkLost && m.m.LastReportAt != nil && now.Sub(*m.m.LastReportAt) > s.v.cfg.LostAfter {
				s.machineLost(m, fmt.Sprintf("no status report for %s", now.Sub(*m.m.LastReportAt).Round(time.Millisecond)))
				continue
			}
			if m.m.State == api.MachineDraining && !m.busy {
				m.busy = true // a handshake cut short by a restart: ask again
				s.v.handshake(m.m.ID, m.lspmURL, m.token)
				continue
			}
			if m.m.State == api.MachineReady && !m.busy && len(m.procs) == 0 && m.reserved == 0 {
				f := s.fleets[m.m.Fleet]
				idle := m.removing || f == nil || f.deleting
				if !idle && !m.idleAt.IsZero() && perFleet[m.m.Fleet] > f.spec.Scaling.MinMachines &&
					now.Sub(m.idleAt) >= time.Duration(f.spec.Scaling.IdleShutdownSeconds*float64(time.Second)) {
					idle = true
				}
				if idle {
					perFleet[m.m.Fleet]--
					m.busy = true
					s.setMachineState(m, api.MachineDraining, "")
					s.v.handshake(m.m.ID, m.lspmURL, m.token)
				}
			}
		case api.MachineLost:
			if !m.busy && m.m.ProviderID != "" && !m.released && !now.Before(m.retryAt) {
				// Clean up what the provider still holds; the machine stays
				// lost in the record.
				m.busy = true
				s.v.deprovision(m.m.ID, m.m.Provider, m.m.ProviderID)
			}
		}
	}
	for name, f := range s.fleets {
		if f.deleting {
			s.maybeRemoveFleet(name)
			continue
		}
		for n := perFleet[name]; n < f.spec.Scaling.MinMachines && n < f.spec.Scaling.MaxMachines && !now.Before(f.createAfter); n++ {
			s.newMachine(f)
		}
	}
}

func (s *state) machineLost(m *machineState, detail string) {
	s.setMachineState(m, api.MachineLost, detail)
	for pid := range m.procs {
		if p := s.processes[pid]; p != nil && !api.IsTerminal(p.State) {
			s.markProcessLost(p, "machine "+m.m.ID+" lost: "+detail)
		}
	}
	m.procs = map[string]struct{}{}
	s.saveMachine(m)
}

// handshakeDone applies the LSPM's answer to the shutdown handshake.
func (s *state) handshakeDone(id string, accepted bool, err error) {
	m := s.machines[id]
	if m == nil {
		return
	}
	m.busy = false
	if m.m.State != api.MachineDraining {
		return // lost meanwhile: the tick cleans it up
	}
	if !accepted {
		m.idleAt = s.now()
		detail := "busy"
		if err != nil {
			detail = err.Error()
		}
		s.setMachineState(m, api.MachineReady, "handshake refused: "+detail)
		return
	}
	s.setMachineState(m, api.MachineShuttingDown, "")
	m.busy = true
	s.v.deprovision(m.m.ID, m.m.Provider, m.m.ProviderID)
}

// deprovisioned applies the provider's answer to a delete.
func (s *state) deprovisioned(id string, err error) {
	m := s.machines[id]
	if m == nil {
		return
	}
	m.busy = false
	if err != nil {
		m.retryAt = s.now().Add(30 * time.Second)
		s.event("machine.delete_failed", m.m.Fleet, id, "", m.m.State, err.Error())
		return // the tick tries again
	}
	for pid := range m.procs { // none should be left: the handshake said so
		if p := s.processes[pid]; p != nil && !api.IsTerminal(p.State) {
			s.markProcessLost(p, "its machine was deleted")
		}
	}
	m.procs = map[string]struct{}{}
	if m.m.State == api.MachineLost {
		m.released = true
		s.saveMachine(m)
		return
	}
	s.setMachineState(m, api.MachineTerminated, "")
	s.maybeRemoveFleet(m.m.Fleet)
}

// --- views

func (s *state) machineList(fleet, st string) []api.Machine {
	out := []api.Machine{}
	for _, m := range s.machines {
		if (fleet == "" || m.m.Fleet == fleet) && (st == "" || m.m.State == st) {
			v := m.m
			v.ProcessCount = len(m.procs)
			out = append(out, v)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].CreatedAt.Before(out[j].CreatedAt) })
	return out
}

func (s *state) processList(fleet, machine, st string) []api.Process {
	out := []api.Process{}
	for _, p := range s.processes {
		if (fleet == "" || p.Fleet == fleet) && (machine == "" || p.MachineID == machine) && (st == "" || p.State == st) {
			out = append(out, *p)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].CreatedAt.Before(out[j].CreatedAt) })
	return out
}

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err) // only our own plain structs are marshalled
	}
	return b
}
