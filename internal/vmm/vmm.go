package vmm

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"dedi.dev/dedi/api"
	"dedi.dev/dedi/internal/clock"
	"dedi.dev/dedi/internal/provider"
	"dedi.dev/dedi/internal/rest"
	"dedi.dev/dedi/internal/store"
)

// VMM is one control plane.
type VMM struct {
	cfg     Config
	log     *slog.Logger
	clock   clock.Clock
	store   *store.Store
	adminTH string // hash of the admin token
	url     string // the VMM as machines reach it
	ln      net.Listener
	metrics *metrics
	events  *broker
	lspm    *http.Client

	cmds     chan func(*state)
	loopDone chan struct{}
	commits  chan batch
	st       *state // handed to the loop in Run
	runCtx   context.Context
	wg       sync.WaitGroup
}

// batch is the writes of one loop command, committed together.
type batch struct {
	ops    []store.Op
	events []api.Event
	done   chan error // nil when nobody waits
}

// New opens the store, reads the state back and binds the listener.
func New(cfg Config, log *slog.Logger, clk clock.Clock) (*VMM, error) {
	cfg = cfg.withDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if clk == nil {
		clk = clock.Real{}
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, err
	}
	token := cfg.AdminToken
	if token == "" {
		var err error
		if token, err = LoadOrCreateToken(filepath.Join(cfg.DataDir, "admin-token")); err != nil {
			return nil, err
		}
	}
	st, err := store.Open(filepath.Join(cfg.DataDir, "vmm.db"))
	if err != nil {
		return nil, err
	}
	v := &VMM{
		cfg: cfg, log: log, clock: clk, store: st, adminTH: rest.TokenHash(token),
		cmds: make(chan func(*state), 256), loopDone: make(chan struct{}), commits: make(chan batch, 1024),
		events: newBroker(), lspm: &http.Client{Timeout: 30 * time.Second, Transport: lspmTransport()},
	}
	v.metrics = newMetrics(v)
	if v.st, err = v.load(); err != nil {
		st.Close()
		return nil, err
	}
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		st.Close()
		return nil, fmt.Errorf("listen %s: %w", cfg.Listen, err)
	}
	v.ln = ln
	v.url = cfg.URL
	if v.url == "" {
		host, port, _ := net.SplitHostPort(ln.Addr().String())
		if ip := net.ParseIP(host); ip == nil || ip.IsUnspecified() {
			host = "127.0.0.1"
		}
		v.url = "http://" + net.JoinHostPort(host, port)
	}
	return v, nil
}

// Addr is the address the API listens on.
func (v *VMM) Addr() string { return v.ln.Addr().String() }

// URL is the VMM's base URL as machines reach it.
func (v *VMM) URL() string { return v.url }

// load reads the state back from the store.
func (v *VMM) load() (*state, error) {
	snap, err := v.store.Load()
	if err != nil {
		return nil, err
	}
	s := &state{v: v, fleets: map[string]*fleetState{}, machines: map[string]*machineState{},
		processes: map[string]*api.Process{}, eventSeq: snap.LastEventSeq, waiters: map[string][]chan api.Process{},
		byToken: map[string]string{}, asking: map[string]bool{}, sums: map[string]uint64{}, seen: map[string]struct{}{}, procOrder: snap.LastProcessOrder,
		lostFrom: v.clock.Now().UTC().Add(v.cfg.LostAfter)}
	for _, r := range snap.Fleets {
		var f api.Fleet
		if err := json.Unmarshal(r.Body, &f); err != nil {
			return nil, fmt.Errorf("fleet %s: %w", r.Key, err)
		}
		s.fleets[f.Name] = &fleetState{spec: f, deleting: f.State == "deleting"}
	}
	now := v.clock.Now().UTC()
	for _, r := range snap.Machines {
		var sm storedMachine
		if err := json.Unmarshal(r.Body, &sm); err != nil {
			return nil, fmt.Errorf("machine %s: %w", r.Key, err)
		}
		m := &machineState{fromStore: true, m: sm.Machine, token: sm.Token, lspmURL: sm.LSPMURL, removing: sm.Removing, released: sm.Released || (sm.Machine.State == api.MachineLost && sm.Machine.ProviderID == ""),
			procs: map[string]struct{}{}, ready: make(chan struct{}), bootBy: now.Add(v.cfg.BootTimeout)}
		if m.m.State != api.MachineProvisioning && m.m.State != api.MachineBooting {
			close(m.ready)
		}
		// Reports count from now: a VMM restart never makes machines lost.
		if m.m.LastReportAt != nil {
			t := now
			m.m.LastReportAt = &t
		}
		m.tokenTH = rest.TokenHash(m.token)
		s.machines[m.m.ID] = m
		s.byToken[m.tokenTH] = m.m.ID
	}
	for _, r := range snap.Processes {
		var p api.Process
		if err := json.Unmarshal(r.Body, &p); err != nil {
			return nil, fmt.Errorf("process %s: %w", r.Key, err)
		}
		s.processes[p.ID] = &p
		if m := s.machines[p.MachineID]; m != nil && !api.IsTerminal(p.State) {
			m.procs[p.ID] = struct{}{}
		}
	}
	return s, nil
}

// Run serves until ctx is done. Machines keep running when it returns: a
// restarted VMM finds them again.
func (v *VMM) Run(ctx context.Context) error {
	runCtx, cancel := context.WithCancel(context.Background())
	v.runCtx = runCtx
	commitDone := make(chan struct{})
	go func() {
		defer close(commitDone)
		v.commitLoop()
	}()
	loopCtx, stopLoop := context.WithCancel(context.Background())
	loopExited := make(chan struct{})
	go func() {
		defer close(loopExited)
		v.loop(loopCtx)
	}()
	defer func() {
		stopLoop()
		<-loopExited
		cancel()
		v.wg.Wait()
		close(v.commits)
		<-commitDone
		v.events.close()
		v.store.Close()
	}()
	srv := &http.Server{Handler: v.Handler(), ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute,
		ErrorLog: slog.NewLogLogger(v.log.Handler(), slog.LevelWarn)}
	gw := rest.Serve(srv, v.ln)
	// Reports are served from now on: lost detection counts from here, and
	// the providers are reconciled in the background.
	v.post(func(s *state) { s.lostFrom = s.now().Add(v.cfg.LostAfter) })
	v.goOwned(v.reconcile)
	v.log.Info("vmm listening", "addr", v.Addr(), "url", v.url)
	var err error
	select {
	case <-ctx.Done():
	case err = <-gw.Failed():
	}
	// Event streams, waits for ready and followed logs end at once; other
	// calls get apiStopWait to answer. No handler runs once Run returns.
	v.events.close()
	gw.Stop(apiStopWait)
	return err
}

// apiStopWait is how long a stopping VMM lets the API requests in flight
// finish before it closes their connections.
const apiStopWait = 2 * time.Second

// reconcile matches the stored machines with what the providers hold: a
// machine the providers have that no record names (an earlier run died
// between create and record) is deleted; a recorded machine still being
// provisioned is found again or given up; a recorded machine the provider
// no longer has is lost.
//
// It runs while the VMM already serves, so machines are created while it
// lists: only machines recorded before this run are judged, and each
// decision is checked again on the loop against the machine as it is then.
func (v *VMM) reconcile(ctx context.Context) {
	type known struct{ id, state, provider string }
	var machines []known
	_ = v.doWait(func(s *state) {
		for _, m := range s.machines {
			if m.fromStore {
				machines = append(machines, known{m.m.ID, m.m.State, m.m.Provider})
			}
		}
	})
	for name, p := range v.cfg.Providers {
		lctx, cancel := context.WithTimeout(ctx, time.Minute)
		list, err := p.List(lctx, "")
		cancel()
		if err != nil {
			v.log.Warn("list machines", "provider", name, "err", err)
			continue
		}
		found := map[string]provider.Machine{}
		ours := map[string]bool{}
		if err := v.doWait(func(s *state) { // one trip to the loop for the whole list
			for _, pm := range list {
				m := s.machines[pm.MachineID]
				ours[pm.MachineID] = m != nil && m.m.State != api.MachineTerminated
			}
		}); err != nil {
			return // the VMM stops: judge nothing, delete nothing
		}
		for _, pm := range list {
			found[pm.MachineID] = pm
			if !ours[pm.MachineID] {
				v.log.Warn("deleting a machine no record names", "provider", name, "machine", pm.MachineID, "fleet", pm.Fleet)
				dctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
				_ = p.Delete(dctx, pm.ProviderID)
				cancel()
			}
		}
		for _, k := range machines {
			if k.provider != name {
				continue
			}
			id, was := k.id, k.state
			pm, ok := found[id]
			v.post(func(s *state) {
				m := s.machines[id]
				if m == nil || m.m.State != was {
					return // moved on since the list was taken: its own path judges it
				}
				switch {
				case was == api.MachineProvisioning && ok:
					s.created(id, pm.ProviderID, pm.Address, pm.LSPMURL, nil)
				case was == api.MachineProvisioning:
					s.created(id, "", "", "", errors.New("lost during a VMM restart"))
				case !ok && was != api.MachineTerminated && was != api.MachineLost:
					// Gone while no VMM ran (deleted by hand, host rebooted).
					s.machineLost(m, "its provider no longer has it")
					m.released = true
					s.saveMachine(m)
				}
			})
		}
	}
}

// lspmTransport is the VMM's connection pool to its LSPMs. Concurrent
// placements on one machine each need a connection: with net/http's
// default of two idle connections per host, the others were closed after
// use and dialled anew, a tenth of the VMM's CPU in the placement
// benchmark and a dial on the placement's path.
func lspmTransport() *http.Transport {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.MaxIdleConnsPerHost = 64
	t.MaxIdleConns = 1024
	return t
}

func (v *VMM) goOwned(f func(ctx context.Context)) {
	v.wg.Add(1)
	go func() {
		defer v.wg.Done()
		f(v.runCtx)
	}()
}

// loop owns the state.
func (v *VMM) loop(ctx context.Context) {
	defer close(v.loopDone)
	tick := v.clock.NewTicker(v.cfg.TickInterval)
	defer tick.Stop()
	s := v.st
	for {
		select {
		case fn := <-v.cmds:
			fn(s)
		case <-tick.C():
			s.tick()
			v.flush(s, nil)
		case <-ctx.Done():
			return
		}
	}
}

// flush hands the writes of the last command to the committer.
func (v *VMM) flush(s *state, done chan error) {
	if len(s.ops) == 0 && len(s.events) == 0 {
		if done != nil {
			done <- nil
		}
		return
	}
	v.commits <- batch{ops: s.ops, events: s.events, done: done}
	s.ops, s.events = nil, nil
}

var errStopped = rest.Errorf(rest.Unavailable, "stopping", "the VMM is stopping")

// doWait runs fn on the loop and waits until its writes are committed: an
// answer sent after doWait is durable.
func (v *VMM) doWait(fn func(s *state)) error {
	done := make(chan error, 1)
	select {
	case v.cmds <- func(s *state) { fn(s); v.flush(s, done) }:
	case <-v.loopDone:
		return errStopped
	}
	select {
	case err := <-done:
		if err != nil {
			return rest.Errorf(rest.Internal, "store", "store: %v", err)
		}
		return nil
	case <-v.loopDone:
		return errStopped
	}
}

// post queues fn on the loop without waiting.
func (v *VMM) post(fn func(s *state)) {
	select {
	case v.cmds <- func(s *state) { fn(s); v.flush(s, nil) }:
	case <-v.loopDone:
	}
}

// commitLoop writes batches in group commits: every batch waiting when a
// transaction starts goes into it.
func (v *VMM) commitLoop() {
	lastPrune, pruning := time.Now(), false
	for b := range v.commits {
		// History beyond what is kept goes a bounded step at a time,
		// between commits, so that no write waits long behind it.
		if pruning || time.Since(lastPrune) > time.Minute {
			lastPrune = time.Now()
			var err error
			if pruning, err = v.store.Prune(v.cfg.KeepEvents, v.cfg.KeepEnded, 2000); err != nil {
				v.log.Warn("prune the store", "err", err)
			}
		}
		group := []batch{b}
	more:
		for len(group) < 256 {
			select {
			case nb, ok := <-v.commits:
				if !ok {
					break more
				}
				group = append(group, nb)
			default:
				break more
			}
		}
		var ops []store.Op
		for _, g := range group {
			ops = append(ops, g.ops...)
		}
		err := v.store.Apply(ops)
		if err != nil {
			v.log.Error("store write failed", "err", err)
		}
		for _, g := range group {
			if err == nil {
				for _, e := range g.events {
					v.events.publish(e)
				}
			}
			if g.done != nil {
				g.done <- err
			}
		}
	}
}

// --- provider and LSPM calls, off the loop

func (v *VMM) provision(id string, f api.Fleet, token string) {
	p := v.cfg.Providers[f.Provider]
	v.goOwned(func(ctx context.Context) {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		defer cancel()
		m, err := p.Create(cctx, provider.Spec{MachineID: id, Fleet: f.Name, Token: token, VMMURL: v.url,
			Image: f.Image, Command: f.Command, MaxProcesses: f.ProcessesPerMachine, ReportInterval: v.cfg.ReportInterval})
		if err != nil {
			v.log.Warn("provision failed", "machine", id, "fleet", f.Name, "err", err)
		}
		v.post(func(s *state) { s.created(id, m.ProviderID, m.Address, m.LSPMURL, err) })
	})
}

func (v *VMM) deprovision(id, providerName, providerID string) {
	p := v.cfg.Providers[providerName]
	v.goOwned(func(ctx context.Context) {
		var err error
		if p == nil {
			err = fmt.Errorf("provider %q is not configured", providerName)
		} else if providerID != "" {
			cctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
			err = p.Delete(cctx, providerID)
			cancel()
		}
		v.post(func(s *state) { s.deprovisioned(id, err) })
	})
}

// handshake asks the machine's LSPM to shut down (DESIGN.md).
func (v *VMM) handshake(id, lspmURL, token string) {
	v.goOwned(func(ctx context.Context) {
		code, _, err := v.lspmCall(ctx, http.MethodPost, lspmURL+"/v1/shutdown", token, nil)
		accepted := err == nil && code == http.StatusOK
		if err == nil && !accepted {
			err = fmt.Errorf("lspm answered %d", code)
		}
		v.post(func(s *state) { s.handshakeDone(id, accepted, err) })
	})
}

// lspmCall makes one request to an LSPM and returns the status and body.
func (v *VMM) lspmCall(ctx context.Context, method, url, token string, body any) (int, []byte, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return 0, nil, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, url, rd)
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("Authorization", "Bearer "+token)
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := v.lspm.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	return resp.StatusCode, raw, err
}

// newToken returns 32 random bytes in hex.
func newToken() string {
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// LoadOrCreateToken reads a token file, or writes a new random token there
// (mode 0600).
func LoadOrCreateToken(path string) (string, error) {
	raw, err := os.ReadFile(path)
	if err == nil {
		tok := strings.TrimSpace(string(raw))
		if len(tok) < 16 {
			return "", fmt.Errorf("token file %s holds less than 16 characters", path)
		}
		return tok, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return "", err
	}
	tok := newToken()
	if err := os.WriteFile(path, []byte(tok+"\n"), 0o600); err != nil {
		return "", err
	}
	return tok, nil
}
