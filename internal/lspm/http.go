package lspm

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"dedi.dev/dedi/api"
	"dedi.dev/dedi/internal/names"
	"dedi.dev/dedi/internal/rest"
)

// Handler is the LSPM's REST API (API.md, LSPM part).
func (a *Agent) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", rest.Healthz)
	mux.HandleFunc("GET /v1/status", a.machine(a.getStatus))
	mux.HandleFunc("POST /v1/processes", a.machine(a.postProcess))
	mux.HandleFunc("GET /v1/processes", a.machine(a.listProcesses))
	mux.HandleFunc("GET /v1/processes/{id}", a.getProcess)
	mux.HandleFunc("DELETE /v1/processes/{id}", a.machine(a.deleteProcess))
	mux.HandleFunc("GET /v1/processes/{id}/logs", a.machine(a.getLogs))
	mux.HandleFunc("POST /v1/processes/{id}/allocate", a.machine(a.postAllocate))
	mux.HandleFunc("POST /v1/processes/{id}/ready", a.processCall(a.postReady))
	mux.HandleFunc("POST /v1/processes/{id}/heartbeat", a.processCall(a.postHeartbeat))
	mux.HandleFunc("POST /v1/processes/{id}/shutdown", a.processCall(a.postProcessShutdown))
	mux.HandleFunc("POST /v1/shutdown", a.machine(a.postShutdown))
	return rest.Problems(mux, a.log)
}

type principal struct {
	machine bool
	process string // id of the process whose token was used
}

// who identifies the caller: the machine, a process, or nobody (401).
func (a *Agent) who(r *http.Request) (principal, error) {
	tok := rest.BearerToken(r)
	if tok != "" {
		th := rest.TokenHash(tok)
		if a.machineTH != "" && rest.TokenEqual(th, a.machineTH) {
			return principal{machine: true}, nil
		}
		var id string
		if err := a.do(func(t *table) { id = t.principal(th) }); err != nil {
			return principal{}, err
		}
		if id != "" {
			return principal{process: id}, nil
		}
	}
	if a.cfg.Insecure && a.machineTH == "" {
		return principal{machine: true}, nil
	}
	return principal{}, rest.ErrUnauthorized()
}

// machine guards a route that only the machine token may call.
func (a *Agent) machine(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		p, err := a.who(r)
		if err == nil && !p.machine {
			err = rest.ErrForbidden("call " + r.Method + " " + r.URL.Path)
		}
		if err != nil {
			rest.WriteError(w, err)
			return
		}
		h(w, r)
	}
}

// processOp is the part of an SDK call that runs on the loop.
type processOp func(t *table, p *proc) (any, error)

// processCall guards an SDK route: only the token of that very process.
// The handler body runs on the loop, so auth and the state change are one
// step.
func (a *Agent) processCall(h func(r *http.Request) (processOp, error)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		id := r.PathValue("id")
		tok := rest.BearerToken(r)
		if tok == "" {
			rest.WriteError(w, rest.ErrUnauthorized())
			return
		}
		th := rest.TokenHash(tok)
		if a.machineTH != "" && rest.TokenEqual(th, a.machineTH) {
			rest.WriteError(w, rest.ErrForbidden("call a process's SDK route; use that process's token"))
			return
		}
		// A bad body is reported only to its own process: auth comes first.
		op, bodyErr := h(r)
		var out any
		var err error
		if derr := a.do(func(t *table) {
			var p *proc
			if p, err = t.processCall(id, th); err == nil {
				if err = bodyErr; err == nil {
					out, err = op(t, p)
				}
			}
		}); derr != nil {
			err = derr
		}
		if err != nil {
			rest.WriteError(w, err)
			return
		}
		if s, ok := out.(syncedAnswer); ok {
			waitSynced(s.synced)
			out = s.out
		}
		rest.WriteJSON(w, http.StatusOK, out)
	}
}

func (a *Agent) getStatus(w http.ResponseWriter, r *http.Request) {
	var st api.Status
	if err := a.do(func(t *table) { st = t.status(false) }); err != nil {
		rest.WriteError(w, err)
		return
	}
	rest.WriteJSON(w, http.StatusOK, st)
}

func (a *Agent) postProcess(w http.ResponseWriter, r *http.Request) {
	var req api.SpawnRequest
	if err := rest.DecodeJSON(r, &req, false); err != nil {
		rest.WriteError(w, err)
		return
	}
	p, err := a.Spawn(req)
	if err != nil {
		rest.WriteError(w, err)
		return
	}
	rest.WriteJSON(w, http.StatusCreated, p)
}

// validateSpawn checks what JSON decoding cannot: shapes and bounds.
func validateSpawn(req *api.SpawnRequest) error {
	bad := func(format string, args ...any) error { return rest.Errorf(rest.Invalid, "", format, args...) }
	if req.ID != "" && !names.ID(req.ID) {
		return bad("id %q: want 1-128 of [A-Za-z0-9._-], starting with a letter or digit", req.ID)
	}
	if len(req.Command) > 0 && req.Command[0] == "" {
		return bad("command[0] must name an executable")
	}
	for _, arg := range req.Command {
		if strings.IndexByte(arg, 0) >= 0 {
			return bad("command arguments must not contain NUL bytes")
		}
	}
	seen := map[string]bool{}
	if len(req.Ports) > 16 {
		return bad("at most 16 ports per process")
	}
	for _, name := range req.Ports {
		if !names.Port(name) {
			return bad("port name %q: want lower-case letters, digits and _, starting with a letter", name)
		}
		if seen[name] {
			return bad("port %q named twice", name)
		}
		seen[name] = true
	}
	for k, v := range req.Env {
		if !names.Env(k) || reservedEnv(k) {
			return bad("env name %q: want [A-Za-z_][A-Za-z0-9_]*, not one that dedi sets itself (DEDI_PROCESS_*, DEDI_PORT_*, AGONES_SDK_*, ...)", k)
		}
		if strings.IndexByte(v, 0) >= 0 {
			return bad("env %s must not contain NUL bytes", k)
		}
	}
	for k := range req.Labels {
		if k == "" || len(k) > 128 {
			return bad("label names must be 1-128 characters")
		}
	}
	if h := req.Health; h != nil {
		if h.PeriodSeconds < 0 || h.FailureThreshold < 0 || h.StartTimeoutSeconds < 0 ||
			h.PeriodSeconds > 3600 || h.StartTimeoutSeconds > 86400 || h.FailureThreshold > 1000 {
			return bad("health: periodSeconds (0-3600), failureThreshold (0-1000) and startTimeoutSeconds (0-86400) are out of range")
		}
		if h.PeriodSeconds != 0 && h.PeriodSeconds < 0.01 {
			return bad("health.periodSeconds must be at least 0.01")
		}
	}
	// Everything of a spawn rides in every status report and in the
	// process's environment (execve refuses more than 128 KiB per string).
	if n := jsonLen(req.Params); n > maxParamsBytes {
		return bad("params take %d bytes as JSON; at most %d", n, maxParamsBytes)
	}
	if n := jsonLen(req.Labels); n > maxLabelsBytes {
		return bad("labels take %d bytes as JSON; at most %d", n, maxLabelsBytes)
	}
	if n := jsonLen(req.Command) + jsonLen(req.Env); n > maxArgvBytes {
		return bad("command and env take %d bytes; at most %d", n, maxArgvBytes)
	}
	switch req.SDK {
	case "", api.SDKDedi, api.SDKAgones:
	default:
		return bad("sdk %q: want %q or %q", req.SDK, api.SDKDedi, api.SDKAgones)
	}
	return nil
}

// Bounds on what a spawn request carries.
const (
	maxParamsBytes = 16 << 10
	maxLabelsBytes = 4 << 10
	maxArgvBytes   = 64 << 10
)

func jsonLen(v any) int {
	b, err := json.Marshal(v)
	if err != nil {
		return 0
	}
	return len(b)
}

// reservedEnv reports whether the LSPM sets the variable k itself.
func reservedEnv(k string) bool {
	switch k {
	case api.EnvProcessID, api.EnvProcessToken, api.EnvSDKURL, api.EnvParams, api.EnvMachineID,
		api.EnvFleet, api.EnvHeartbeatMS, api.EnvMachineToken, api.EnvAdminToken:
		return true
	}
	return strings.HasPrefix(k, api.EnvPortPrefix) || strings.HasPrefix(k, "AGONES_SDK_")
}

func (a *Agent) listProcesses(w http.ResponseWriter, r *http.Request) {
	var items []api.Process
	if err := a.do(func(t *table) { items = t.all() }); err != nil {
		rest.WriteError(w, err)
		return
	}
	rest.WriteJSON(w, http.StatusOK, api.List[api.Process]{Items: items})
}

// getProcess takes the machine token or that process's own token.
func (a *Agent) getProcess(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	who, err := a.who(r)
	if err == nil && !who.machine && who.process != id {
		err = rest.ErrForbidden("read another process")
	}
	if err != nil {
		rest.WriteError(w, err)
		return
	}
	p, err := a.find(id)
	if err != nil {
		rest.WriteError(w, err)
		return
	}
	rest.WriteJSON(w, http.StatusOK, p)
}

func (a *Agent) find(id string) (api.Process, error) {
	var view api.Process
	found := false
	if err := a.do(func(t *table) {
		if p := t.lookup(id); p != nil && !p.inflight {
			view, found = p.view, true
		}
	}); err != nil {
		return view, err
	}
	if !found {
		return view, rest.Errorf(rest.NotFound, "", "no process %q on this machine", id)
	}
	return view, nil
}

func (a *Agent) deleteProcess(w http.ResponseWriter, r *http.Request) {
	grace := a.cfg.Grace
	if s := r.URL.Query().Get("grace"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil || d < 0 || d > time.Hour {
			rest.WriteError(w, rest.Errorf(rest.Invalid, "", "grace %q: want a duration such as 10s, from 0 to 1h", s))
			return
		}
		grace = d
	}
	id := r.PathValue("id")
	var view api.Process
	var err error
	if derr := a.do(func(t *table) {
		p := t.lookup(id)
		switch {
		case p == nil || p.inflight:
			err = rest.Errorf(rest.NotFound, "", "no process %q on this machine", id)
		case api.IsTerminal(p.view.State):
			view = p.view
		default:
			t.stop(p, api.ReasonKilled, "stopped on request", grace)
			view = p.view
		}
	}); derr != nil {
		err = derr
	}
	if err != nil {
		rest.WriteError(w, err)
		return
	}
	rest.WriteJSON(w, http.StatusAccepted, view)
}

func (a *Agent) postAllocate(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	var view api.Process
	var err error
	if derr := a.do(func(t *table) {
		p := t.lookup(id)
		if p == nil || p.inflight {
			err = rest.Errorf(rest.NotFound, "", "no process %q on this machine", id)
			return
		}
		if err = t.allocate(p); err == nil {
			view = p.view
		}
	}); derr != nil {
		err = derr
	}
	if err != nil {
		rest.WriteError(w, err)
		return
	}
	rest.WriteJSON(w, http.StatusOK, view)
}

func (a *Agent) getLogs(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	tail := 0
	if s := q.Get("tail"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 0 || n > 1_000_000 {
			rest.WriteError(w, rest.Errorf(rest.Invalid, "", "tail %q: want a whole number of lines from 0 to 1000000", s))
			return
		}
		tail = n
	}
	follow := false
	if s := q.Get("follow"); s != "" {
		b, err := strconv.ParseBool(s)
		if err != nil {
			rest.WriteError(w, rest.Errorf(rest.Invalid, "", "follow %q: want true or false", s))
			return
		}
		follow = b
	}
	id := r.PathValue("id")
	var dir string
	var done chan struct{}
	if err := a.do(func(t *table) {
		if p := t.lookup(id); p != nil && !p.inflight {
			dir, done = p.dir, p.done
		}
	}); err != nil {
		rest.WriteError(w, err)
		return
	}
	if dir == "" {
		rest.WriteError(w, rest.Errorf(rest.NotFound, "", "no process %q on this machine", id))
		return
	}
	path := filepath.Join(dir, logFile)
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	var offset int64
	if st, err := os.Stat(path); err == nil {
		offset = st.Size()
	}
	w.WriteHeader(http.StatusOK)
	if tail > 0 {
		for _, l := range tailLines(path, tail) {
			fmt.Fprintln(w, l)
		}
	} else if !(follow && q.Has("tail")) {
		// Everything kept: the rotated file, then the current one.
		for _, f := range []string{path + ".1", path} {
			if src, err := os.Open(f); err == nil {
				_, _ = io.Copy(w, src)
				src.Close()
			}
		}
	}
	if follow {
		// The client learns at once that the follow began, even while
		// the game prints nothing.
		if f, ok := w.(http.Flusher); ok {
			f.Flush()
		}
		ctx, cancel := rest.UntilStop(r.Context()) // ends when the LSPM stops
		defer cancel()
		followLog(ctx, w, path, offset, done)
	}
}

func (a *Agent) postReady(r *http.Request) (processOp, error) {
	return func(t *table, p *proc) (any, error) {
		t.ready(p)
		return syncedAnswer{out: p.view, synced: t.a.persist.synced()}, nil
	}, nil
}

// syncedAnswer is an SDK answer sent only once the process's record is on
// disk: a game told it is ready must still be ready after a kill -9 of the
// LSPM (the official Agones Go SDK never calls Ready again).
type syncedAnswer struct {
	out    any
	synced <-chan struct{}
}

func (a *Agent) postHeartbeat(r *http.Request) (processOp, error) {
	var hb api.Heartbeat
	if err := rest.DecodeJSON(r, &hb, true); err != nil {
		return nil, err
	}
	if err := validateHeartbeat(hb); err != nil {
		return nil, err
	}
	return func(t *table, p *proc) (any, error) {
		t.heartbeat(p, hb)
		return p.view, nil
	}, nil
}

func validateHeartbeat(hb api.Heartbeat) error {
	if hb.Players != nil && (*hb.Players < 0 || *hb.Players > 1_000_000) {
		return rest.Errorf(rest.Invalid, "", "players must be from 0 to 1000000")
	}
	if hb.Instances != nil && (*hb.Instances < 0 || *hb.Instances > 100_000) {
		return rest.Errorf(rest.Invalid, "", "instances must be from 0 to 100000")
	}
	return nil
}

func (a *Agent) postProcessShutdown(r *http.Request) (processOp, error) {
	return func(t *table, p *proc) (any, error) {
		if !api.IsTerminal(p.view.State) && p.announcedAt == nil {
			now := t.now()
			p.announcedAt = &now
			t.persist(p)
		}
		return p.view, nil
	}, nil
}

func (a *Agent) postShutdown(w http.ResponseWriter, r *http.Request) {
	var err error
	var delivered <-chan struct{}
	if derr := a.do(func(t *table) {
		if err = t.shutdown(); err == nil && a.cfg.VMMURL != "" {
			delivered = t.waitDelivered()
		}
	}); derr != nil {
		err = derr
	}
	if err != nil {
		rest.WriteError(w, err)
		return
	}
	// The 200 lets the machine be powered off: first the VMM gets the
	// report that shows it empty, with the ends (and their evidence) of
	// the processes that ran on it, unless that takes longer than
	// shutdownDeliveryWait (a VMM that does not answer).
	if delivered != nil {
		select {
		case <-delivered:
		case <-time.After(shutdownDeliveryWait):
			a.log.Warn("shutdown accepted before the VMM acknowledged the last report")
		case <-r.Context().Done():
		case <-rest.Stopping(r.Context()):
		}
	}
	rest.WriteJSON(w, http.StatusOK, api.ShutdownAnswer{Accepted: true})
}

// shutdownDeliveryWait bounds how long a shutdown handshake waits for the
// VMM to acknowledge the report it changed.
const shutdownDeliveryWait = time.Second
