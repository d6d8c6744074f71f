package lspm

// Agones SDK compatibility (docs/AGONES.md). A process spawned with
// "sdk": "agones" gets, besides dedi's own SDK routes, Agones' game server
// SDK on two loopback ports of its own, announced in its environment as
// AGONES_SDK_HTTP_PORT (the REST gateway, agones_rest.go) and
// AGONES_SDK_GRPC_PORT (the gRPC service agones.dev.sdk.SDK and its alpha,
// agones_grpc.go). Both sides call the operations below, which run on the
// agent's loop and map Agones' calls onto dedi's process states:
//
//	Ready       starting -> ready (a reservation ends)
//	Allocate    starting|ready -> allocated
//	Health      a heartbeat
//	Shutdown    the process's announced end; SIGTERM to its group 1 s later
//	Reserve     ready, held out of the machine's allocate for N seconds
//	SetLabel    process label "agones.dev/sdk-KEY"
//	SetAnnotation  process annotation "agones.dev/sdk-KEY"
//	alpha player tracking: the process's player count and ids
//
// The ports are allocated from the LSPM's port range like game ports and
// kept in the process record, so a restarted LSPM serves them again where
// the game expects them. Only processes of the game's own session (its
// process tree) may use them (agones_peer.go).

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"
	"unicode/utf8"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"dedi.dev/dedi/api"
	"dedi.dev/dedi/internal/agonespb"
	"dedi.dev/dedi/internal/rest"
)

// Environment variables of an Agones-SDK process (Agones' own names).
const (
	EnvAgonesHTTPPort = "AGONES_SDK_HTTP_PORT"
	EnvAgonesGRPCPort = "AGONES_SDK_GRPC_PORT"
)

// Agones' prefix of labels and annotations set through the SDK.
const agonesMetaPrefix = "agones.dev/sdk-"

// agonesTermDelay is how long after an Agones Shutdown the game's group
// gets SIGTERM, as Kubernetes would send it once the pod is deleted: a game
// that exits by itself in that time ends with its own exit code.
const agonesTermDelay = time.Second

// Bounds of what a game keeps through the Agones SDK.
const (
	maxAgonesPlayers     = 4096
	maxAgonesPlayerID    = 128
	maxAgonesCapacity    = 1_000_000
	maxAgonesMeta        = 64      // labels, and annotations, set through the SDK
	maxAnnotationValue   = 4 << 10 // bytes
	maxAgonesReserveSecs = 366 * 24 * 3600
	// maxAgonesWatches bounds the WatchGameServer streams (REST and gRPC
	// together) open on one process: each change rebuilds the GameServer
	// on the loop once per stream.
	maxAgonesWatches = 32
)

// agonesState is what an Agones-SDK process has beyond a dedi one. It is
// owned by the loop like the rest of the proc and persisted in the record.
type agonesState struct {
	HTTPPort int `json:"httpPort"`
	GRPCPort int `json:"grpcPort"`
	// Players are the connected player ids (alpha player tracking), in
	// the order they connected; the process's player count is their number.
	Players     []string `json:"players,omitempty"`
	Capacity    int64    `json:"capacity,omitempty"`
	CapacitySet bool     `json:"capacitySet,omitempty"`
	// Reserved holds the process out of the machine's allocate until
	// ReservedUntil, or until Ready, Allocate or Shutdown when that is nil.
	Reserved      bool       `json:"reserved,omitempty"`
	ReservedUntil *time.Time `json:"reservedUntil,omitempty"`
	// Shutdown is set once the game called Agones' Shutdown.
	Shutdown bool `json:"shutdown,omitempty"`
	// Version is the GameServer's resource_version: it rises on every
	// change.
	Version int64 `json:"version"`

	termSent bool          // SIGTERM sent after Shutdown (by this LSPM run)
	watch    chan struct{} // closed and replaced on every change
	// awaitPing is set on a process this LSPM run adopted: its health is
	// not judged until its first ping. A gRPC Health stream breaks with
	// the old LSPM and the official SDKs (Go, Node.js, Rust) never reopen
	// it, so judging by it would kill every such game after each LSPM
	// restart; a game that pings again (REST, or a reopened stream) is
	// judged again from that ping.
	awaitPing bool
}

func newAgonesState(httpPort, grpcPort int) *agonesState {
	return &agonesState{HTTPPort: httpPort, GRPCPort: grpcPort, Version: 1, watch: make(chan struct{})}
}

// reservedAt reports whether the reservation holds at now.
func (s *agonesState) reservedAt(now time.Time) bool {
	return s != nil && s.Reserved && (s.ReservedUntil == nil || now.Before(*s.ReservedUntil))
}

// agonesChanged wakes the process's watchers; every persisted change of an
// Agones-SDK process passes here.
func (t *table) agonesChanged(p *proc) {
	if p.agones == nil {
		return
	}
	p.agones.Version++
	if p.agones.watch != nil {
		close(p.agones.watch)
	}
	p.agones.watch = make(chan struct{})
}

// agonesTick runs with the health clock: it ends reservations whose time
// is up and sends the SIGTERM that follows an Agones Shutdown.
func (t *table) agonesTick(now time.Time) {
	for _, p := range t.live {
		s := p.agones
		if s == nil || p.inflight {
			continue
		}
		if s.Reserved && s.ReservedUntil != nil && !now.Before(*s.ReservedUntil) {
			s.Reserved, s.ReservedUntil = false, nil
			t.persist(p)
		}
		if s.Shutdown && !s.termSent && p.stopReason == "" && p.announcedAt != nil &&
			now.Sub(*p.announcedAt) >= agonesTermDelay {
			s.termSent = true
			if pidAlive(p.view.PID, p.start) {
				_ = syscall.Kill(-p.view.PID, syscall.SIGTERM)
			}
		}
	}
}

// agonesGameState names the process's state as an Agones GameServer's.
func agonesGameState(p *proc, now time.Time) string {
	switch p.view.State {
	case api.StateStarting:
		switch {
		case p.agones != nil && p.agones.Shutdown:
			return "Shutdown"
		case p.stopReason == api.ReasonUnhealthy:
			return "Unhealthy" // its start timeout ran out
		case p.stopReason != "":
			return "Shutdown"
		}
		return "Scheduled"
	case api.StateExited, api.StateKilled:
		return "Shutdown"
	case api.StateUnhealthy:
		return "Unhealthy"
	case api.StateCrashed, api.StateLost:
		return "Error"
	}
	switch {
	case (p.agones != nil && p.agones.Shutdown) || p.announcedAt != nil:
		return "Shutdown"
	case p.stopReason == api.ReasonUnhealthy:
		return "Unhealthy"
	case p.stopReason != "":
		return "Shutdown"
	case p.view.State == api.StateAllocated:
		return "Allocated"
	case p.agones.reservedAt(now):
		return "Reserved"
	}
	return "Ready"
}

// gameServer builds the Agones GameServer object of a process.
func (t *table) gameServer(p *proc) *agonespb.GameServer {
	v := p.view
	labels := make(map[string]string, len(v.Labels)+1)
	for k, val := range v.Labels {
		labels[k] = val
	}
	if v.Fleet != "" {
		if _, ok := labels["agones.dev/fleet"]; !ok {
			labels["agones.dev/fleet"] = v.Fleet
		}
	}
	annotations := make(map[string]string, len(v.Annotations))
	for k, val := range v.Annotations {
		annotations[k] = val
	}
	meta := &agonespb.GameServer_ObjectMeta{
		Name: v.ID, Namespace: "default", Uid: v.ID, Generation: 1,
		CreationTimestamp: v.CreatedAt.Unix(), Labels: labels, Annotations: annotations,
	}
	if p.agones != nil {
		meta.ResourceVersion = strconv.FormatInt(p.agones.Version, 10)
	}
	if v.EndedAt != nil {
		meta.DeletionTimestamp = v.EndedAt.Unix()
	} else if p.announcedAt != nil {
		meta.DeletionTimestamp = p.announcedAt.Unix()
	}
	names := make([]string, 0, len(v.Ports))
	for name := range v.Ports {
		names = append(names, name)
	}
	sort.Strings(names)
	st := &agonespb.GameServer_Status{
		State: agonesGameState(p, t.now()), Address: v.Address,
		Addresses: []*agonespb.GameServer_Status_Address{{Type: "InternalIP", Address: v.Address}},
		Players:   &agonespb.GameServer_Status_PlayerStatus{Count: int64(v.Players), Ids: []string{}},
	}
	for _, name := range names {
		st.Ports = append(st.Ports, &agonespb.GameServer_Status_Port{Name: name, Port: int32(v.Ports[name])})
	}
	if s := p.agones; s != nil {
		st.Players.Capacity = s.Capacity
		st.Players.Ids = slices.Clone(s.Players)
		if st.Players.Ids == nil {
			st.Players.Ids = []string{}
		}
	}
	return &agonespb.GameServer{
		ObjectMeta: meta,
		Spec: &agonespb.GameServer_Spec{Health: &agonespb.GameServer_Spec_Health{
			PeriodSeconds:       int32(max(1, (p.period+time.Second-1)/time.Second)),
			FailureThreshold:    int32(p.threshold),
			InitialDelaySeconds: int32(p.startTimeout / time.Second),
		}},
		Status: st,
	}
}

// Errors of the Agones calls are gRPC statuses; the REST side turns them
// into the gateway's JSON errors.
var (
	errAgonesEnded = status.Error(codes.FailedPrecondition, "the game server process has ended")
	errAgonesStop  = status.Error(codes.Unavailable, "the LSPM is stopping")
)

// agonesOp is an Agones call's work on the loop, on the live process.
type agonesOp func(t *table, p *proc) error

// agonesServer serves the Agones SDK of one process, on its two ports.
type agonesServer struct {
	a     *Agent
	id    string
	log   *slog.Logger
	owner peerOwner

	watches atomic.Int32 // open WatchGameServer streams
}

// do runs op on the loop against the live process.
func (s *agonesServer) do(op agonesOp) error {
	var err error
	if derr := s.a.do(func(t *table) {
		p := t.live[s.id]
		if p == nil || p.agones == nil {
			err = errAgonesEnded
			return
		}
		err = op(t, p)
	}); derr != nil {
		return errAgonesStop
	}
	return err
}

// Ready is Agones' Ready: starting -> ready; it ends a reservation. On an
// allocated process it changes nothing (dedi has no way back to ready).
func (s *agonesServer) Ready() error {
	var synced <-chan struct{}
	err := s.do(func(t *table, p *proc) error {
		if p.agones.Shutdown {
			return nil
		}
		if p.agones.Reserved {
			p.agones.Reserved, p.agones.ReservedUntil = false, nil
			t.persist(p)
		}
		t.ready(p)
		synced = t.a.persist.synced()
		return nil
	})
	waitSynced(synced) // see syncedAnswer
	return err
}

// Allocate is Agones' Allocate: the process becomes allocated (through
// ready when it was starting).
func (s *agonesServer) Allocate() error {
	var synced <-chan struct{}
	err := s.do(func(t *table, p *proc) error {
		if p.agones.Shutdown || p.stopReason != "" {
			return status.Error(codes.FailedPrecondition, "the game server is shutting down")
		}
		if p.agones.Reserved {
			p.agones.Reserved, p.agones.ReservedUntil = false, nil
			t.persist(p)
		}
		t.ready(p)
		if err := t.allocate(p); err != nil {
			return status.Error(codes.FailedPrecondition, err.Error())
		}
		synced = t.a.persist.synced()
		return nil
	})
	waitSynced(synced) // see syncedAnswer
	return err
}

// Shutdown is Agones' Shutdown: the process announces its end; it has the
// LSPM's grace to exit, and gets SIGTERM after agonesTermDelay.
func (s *agonesServer) Shutdown() error {
	return s.do(func(t *table, p *proc) error {
		if p.agones.Shutdown {
			return nil
		}
		p.agones.Shutdown = true
		p.agones.Reserved, p.agones.ReservedUntil = false, nil
		if p.announcedAt == nil {
			now := t.now()
			p.announcedAt = &now
		}
		t.persist(p)
		t.changed()
		return nil
	})
}

// Health is one Agones health ping: a heartbeat. Agones games commonly
// ping from their start, before Ready, when dedi's start timeout rules and
// a heartbeat means nothing: such pings are taken and ignored (dedi's own
// SDKs heartbeat only once ready, so their heartbeat may stand in for a
// ready the LSPM lost in a crash; an Agones ping must not).
func (s *agonesServer) Health() error {
	return s.do(func(t *table, p *proc) error {
		t.agonesPing(p)
		return nil
	})
}

// agonesPing applies one Agones health ping on the loop.
func (t *table) agonesPing(p *proc) {
	if p.view.State != api.StateStarting {
		p.agones.awaitPing = false
		t.heartbeat(p, api.Heartbeat{})
	}
}

// GameServer returns the process's GameServer and a channel that closes at
// its next change (nil once the process has ended).
func (s *agonesServer) GameServer() (*agonespb.GameServer, <-chan struct{}, error) {
	var gs *agonespb.GameServer
	var next <-chan struct{}
	found := false
	if err := s.a.do(func(t *table) {
		p := t.lookup(s.id)
		if p == nil || p.inflight || p.agones == nil {
			return
		}
		found = true
		gs = t.gameServer(p)
		if !api.IsTerminal(p.view.State) {
			next = p.agones.watch
		}
	}); err != nil {
		return nil, nil, errAgonesStop
	}
	if !found {
		return nil, nil, errAgonesEnded
	}
	return gs, next, nil
}

// watch calls send with the GameServer now and after every change, until
// ctx ends, the process ends or send fails.
func (s *agonesServer) watch(ctx context.Context, send func(*agonespb.GameServer) error) error {
	if s.watches.Add(1) > maxAgonesWatches {
		s.watches.Add(-1)
		return status.Errorf(codes.ResourceExhausted, "at most %d WatchGameServer streams may be open at once", maxAgonesWatches)
	}
	defer s.watches.Add(-1)
	for {
		gs, next, err := s.GameServer()
		if err != nil {
			return err
		}
		if err := send(gs); err != nil {
			return err
		}
		if next == nil {
			return nil
		}
		select {
		case <-next:
		case <-ctx.Done():
			return nil
		case <-s.a.runCtx.Done():
			return nil
		}
	}
}

// SetLabel sets the process label "agones.dev/sdk-"+key.
func (s *agonesServer) SetLabel(key, value string) error {
	if err := validateAgonesLabel(key, value); err != nil {
		return err
	}
	return s.do(func(t *table, p *proc) error {
		k := agonesMetaPrefix + key
		if p.view.Labels[k] == value {
			return nil
		}
		if _, ok := p.view.Labels[k]; !ok && countPrefixed(p.view.Labels) >= maxAgonesMeta {
			return status.Errorf(codes.ResourceExhausted, "at most %d labels may be set through the SDK", maxAgonesMeta)
		}
		labels := make(map[string]string, len(p.view.Labels)+1)
		for lk, lv := range p.view.Labels {
			labels[lk] = lv
		}
		labels[k] = value
		p.view.Labels = labels // views handed out share the old map: replace, never mutate
		t.persist(p)
		t.changed()
		return nil
	})
}

// SetAnnotation sets the process annotation "agones.dev/sdk-"+key.
func (s *agonesServer) SetAnnotation(key, value string) error {
	if err := validateAgonesAnnotation(key, value); err != nil {
		return err
	}
	return s.do(func(t *table, p *proc) error {
		k := agonesMetaPrefix + key
		if old, ok := p.view.Annotations[k]; ok && old == value {
			return nil
		}
		if _, ok := p.view.Annotations[k]; !ok && len(p.view.Annotations) >= maxAgonesMeta {
			return status.Errorf(codes.ResourceExhausted, "at most %d annotations may be set through the SDK", maxAgonesMeta)
		}
		ann := make(map[string]string, len(p.view.Annotations)+1)
		for ak, av := range p.view.Annotations {
			ann[ak] = av
		}
		ann[k] = value
		p.view.Annotations = ann
		t.persist(p)
		t.changed()
		return nil
	})
}

// Reserve holds the process out of the machine's allocate for seconds (0:
// until Ready, Allocate or Shutdown). A starting process becomes ready; an
// allocated one stays allocated and is not reserved.
func (s *agonesServer) Reserve(seconds int64) error {
	if seconds < 0 || seconds > maxAgonesReserveSecs {
		return status.Errorf(codes.InvalidArgument, "seconds must be from 0 to %d", maxAgonesReserveSecs)
	}
	return s.do(func(t *table, p *proc) error {
		if p.agones.Shutdown || p.stopReason != "" {
			return status.Error(codes.FailedPrecondition, "the game server is shutting down")
		}
		t.ready(p)
		if p.view.State != api.StateReady {
			return nil
		}
		p.agones.Reserved, p.agones.ReservedUntil = true, nil
		if seconds > 0 {
			until := t.now().Add(time.Duration(seconds) * time.Second)
			p.agones.ReservedUntil = &until
		}
		t.persist(p)
		return nil
	})
}

// PlayerConnect adds a player id; it reports whether it was new.
func (s *agonesServer) PlayerConnect(id string) (bool, error) {
	if err := validatePlayerID(id); err != nil {
		return false, err
	}
	added := false
	err := s.do(func(t *table, p *proc) error {
		ag := p.agones
		if slices.Contains(ag.Players, id) {
			return nil
		}
		if ag.CapacitySet && int64(len(ag.Players)) >= ag.Capacity {
			return status.Errorf(codes.FailedPrecondition, "players are already at capacity (%d)", ag.Capacity)
		}
		if len(ag.Players) >= maxAgonesPlayers {
			return status.Errorf(codes.ResourceExhausted, "at most %d players are tracked per process", maxAgonesPlayers)
		}
		ag.Players = append(slices.Clip(ag.Players), id)
		added = true
		t.setPlayers(p, len(ag.Players))
		return nil
	})
	return added, err
}

// PlayerDisconnect removes a player id; it reports whether it was there.
func (s *agonesServer) PlayerDisconnect(id string) (bool, error) {
	if err := validatePlayerID(id); err != nil {
		return false, err
	}
	removed := false
	err := s.do(func(t *table, p *proc) error {
		ag := p.agones
		i := slices.Index(ag.Players, id)
		if i < 0 {
			return nil
		}
		ag.Players = slices.Delete(slices.Clone(ag.Players), i, i+1)
		removed = true
		t.setPlayers(p, len(ag.Players))
		return nil
	})
	return removed, err
}

// setPlayers applies a player count changed through the SDK.
func (t *table) setPlayers(p *proc, n int) {
	p.view.Players = n
	t.persist(p)
	t.changed()
}

// SetPlayerCapacity sets the player capacity.
func (s *agonesServer) SetPlayerCapacity(n int64) error {
	if n < 0 || n > maxAgonesCapacity {
		return status.Errorf(codes.InvalidArgument, "count must be from 0 to %d", maxAgonesCapacity)
	}
	return s.do(func(t *table, p *proc) error {
		p.agones.Capacity, p.agones.CapacitySet = n, true
		t.persist(p)
		return nil
	})
}

// players reads the tracked players.
func (s *agonesServer) players() (ids []string, capacity int64, err error) {
	err = s.do(func(t *table, p *proc) error {
		ids, capacity = slices.Clone(p.agones.Players), p.agones.Capacity
		return nil
	})
	if ids == nil {
		ids = []string{}
	}
	return ids, capacity, err
}

var (
	// labelNamePattern is Kubernetes' qualified name part (after a prefix).
	labelNamePattern  = regexp.MustCompile(`^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$`)
	labelValuePattern = regexp.MustCompile(`^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$`)
)

// validateAgonesLabel applies Kubernetes' rules, as Agones does, to the
// label "agones.dev/sdk-"+key = value.
func validateAgonesLabel(key, value string) error {
	if err := validateAgonesKey(key); err != nil {
		return err
	}
	if len(value) > 63 || !labelValuePattern.MatchString(value) {
		return status.Errorf(codes.InvalidArgument, "label value %q: want at most 63 of [A-Za-z0-9-_.], starting and ending with a letter or digit", value)
	}
	return nil
}

func validateAgonesAnnotation(key, value string) error {
	if err := validateAgonesKey(key); err != nil {
		return err
	}
	if len(value) > maxAnnotationValue {
		return status.Errorf(codes.InvalidArgument, "annotation value: at most %d bytes", maxAnnotationValue)
	}
	return nil
}

// validateAgonesKey checks that "sdk-"+key is a valid name part of a
// Kubernetes qualified name (at most 63 characters).
func validateAgonesKey(key string) error {
	name := "sdk-" + key
	if key == "" || len(name) > 63 || !labelNamePattern.MatchString(name) {
		return status.Errorf(codes.InvalidArgument, "key %q: want 1-59 of [A-Za-z0-9-_.], ending with a letter or digit", key)
	}
	return nil
}

func validatePlayerID(id string) error {
	if id == "" || len(id) > maxAgonesPlayerID || !utf8.ValidString(id) {
		return status.Errorf(codes.InvalidArgument, "playerID must be 1-%d bytes of UTF-8", maxAgonesPlayerID)
	}
	for _, r := range id {
		if r < 0x20 || r == 0x7f {
			return status.Error(codes.InvalidArgument, "playerID must not contain control characters")
		}
	}
	return nil
}

func countPrefixed(m map[string]string) int {
	n := 0
	for k := range m {
		if len(k) > len(agonesMetaPrefix) && k[:len(agonesMetaPrefix)] == agonesMetaPrefix {
			n++
		}
	}
	return n
}

// agonesListeners are the bound sockets of one process's Agones SDK.
type agonesListeners struct {
	http, grpc []net.Listener
}

func (l *agonesListeners) close() {
	for _, ln := range append(slices.Clone(l.http), l.grpc...) {
		ln.Close()
	}
}

// listenAgones binds the process's two Agones ports on 127.0.0.1 and, where
// the host has it, [::1]: the official SDKs dial "localhost", which may
// resolve to either.
func listenAgones(s *agonesState) (*agonesListeners, error) {
	l := &agonesListeners{}
	bind := func(port int) ([]net.Listener, error) {
		ln, err := net.Listen("tcp4", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err != nil {
			return nil, fmt.Errorf("agones sdk port %d: %w", port, err)
		}
		out := []net.Listener{ln}
		ln6, err := net.Listen("tcp6", net.JoinHostPort("::1", strconv.Itoa(port)))
		switch {
		case err == nil:
			out = append(out, ln6)
		case errors.Is(err, syscall.EADDRINUSE):
			// Someone else holds [::1]:port: the game's SDK, dialing
			// localhost, could reach it instead of dedi. Refuse to serve
			// half of the port rather than let it answer for the game.
			ln.Close()
			return nil, fmt.Errorf("agones sdk port [::1]:%d: %w", port, err)
		}
		// Any other error: the host has no IPv6 loopback; 127.0.0.1 it is.
		return out, nil
	}
	var err error
	if l.http, err = bind(s.HTTPPort); err != nil {
		return nil, err
	}
	if l.grpc, err = bind(s.GRPCPort); err != nil {
		l.close()
		return nil, err
	}
	return l, nil
}

// ownerOf is the game whose process tree may use p's Agones SDK: the game
// server, its process group, and its shim's session.
func ownerOf(p *proc) peerOwner {
	return peerOwner{pid: p.view.PID, start: p.start, session: p.shimPID}
}

// readoptAgones serves the Agones SDK of a process a previous LSPM started,
// on the ports the game has in its environment. When they cannot be bound
// (something took them while no LSPM held them), it tries again every
// agonesRebindEvery until it can or the process ends: the game keeps its
// ports for life, so there is nowhere else to serve them. It must be called
// from Run before it serves, or from the loop.
func (a *Agent) readoptAgones(p *proc) {
	ls, err := listenAgones(p.agones)
	if err == nil {
		a.serveAgones(p, ls, ownerOf(p))
		return
	}
	id, done := p.view.ID, p.done
	ports := &agonesState{HTTPPort: p.agones.HTTPPort, GRPCPort: p.agones.GRPCPort}
	a.log.Error("serve the Agones SDK of a re-adopted process; retrying", "process", id, "err", err)
	a.goOwned(func(ctx context.Context) {
		tick := a.clock.NewTicker(agonesRebindEvery)
		defer tick.Stop()
		for {
			select {
			case <-done:
				return
			case <-ctx.Done():
				return
			case <-tick.C():
			}
			ls, err := listenAgones(ports)
			if err != nil {
				continue
			}
			served := false
			_ = a.do(func(t *table) {
				if q := t.live[id]; q == p && q.agones != nil {
					a.serveAgones(q, ls, ownerOf(q))
					served = true
				}
			})
			if !served {
				ls.close()
			} else {
				a.log.Info("serving the Agones SDK of a re-adopted process again", "process", id)
			}
			return
		}
	})
}

// agonesRebindEvery is how often a re-adopted process's Agones ports are
// tried again while something else holds them.
const agonesRebindEvery = time.Second

// serveAgones serves a process's Agones SDK on its bound listeners until
// the process ends (done closes) or the LSPM stops. It must be called from
// the loop, or from Run before it serves (goroutines join a.wg). Its stop
// waits for the handlers of both sides, so none runs once Run returns.
func (a *Agent) serveAgones(p *proc, ls *agonesListeners, owner peerOwner) {
	s := &agonesServer{a: a, id: p.view.ID, log: a.log.With("process", p.view.ID), owner: owner}
	gs := s.grpcServer()
	hs := s.httpServer()
	if a.wrapAgonesREST != nil {
		hs.Handler = a.wrapAgonesREST(hs.Handler)
	}
	for _, ln := range ls.grpc {
		a.goOwned(func(context.Context) {
			if err := gs.Serve(ln); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
				s.log.Warn("agones grpc server", "err", err)
			}
		})
	}
	hg := rest.Serve(hs, ls.http...)
	done := p.done
	a.goOwned(func(ctx context.Context) {
		select {
		case <-done:
		case <-ctx.Done():
		}
		gs.Stop()
		hg.Stop(agonesHTTPStopWait)
	})
}
