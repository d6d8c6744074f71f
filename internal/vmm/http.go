package vmm

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"dedi.dev/dedi/api"
	"dedi.dev/dedi/internal/names"
	"dedi.dev/dedi/internal/rest"
)

// answer runs fn on the loop, waits until its writes are committed, and
// answers its result with status (or its error as a problem).
func answer[T any](v *VMM, w http.ResponseWriter, status int, fn func(s *state) (T, error)) {
	var out T
	var err error
	if derr := v.doWait(func(s *state) { out, err = fn(s) }); derr != nil {
		err = derr
	}
	if err != nil {
		rest.WriteError(w, err)
		return
	}
	rest.WriteJSON(w, status, out)
}

// Handler is the VMM's REST API (API.md, VMM part).
func (v *VMM) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", rest.Healthz)
	mux.Handle("GET /metrics", v.admin(promhttp.HandlerFor(v.metrics.reg, promhttp.HandlerOpts{}).ServeHTTP))
	mux.HandleFunc("POST /v1/fleets", v.admin(v.postFleet))
	mux.HandleFunc("GET /v1/fleets", v.admin(v.listFleets))
	mux.HandleFunc("GET /v1/fleets/{name}", v.admin(v.getFleet))
	mux.HandleFunc("DELETE /v1/fleets/{name}", v.admin(v.deleteFleet))
	mux.HandleFunc("POST /v1/machines", v.admin(v.postMachine))
	mux.HandleFunc("GET /v1/machines", v.admin(v.listMachines))
	mux.HandleFunc("GET /v1/machines/{id}", v.admin(v.getMachine))
	mux.HandleFunc("DELETE /v1/machines/{id}", v.admin(v.deleteMachine))
	mux.HandleFunc("POST /v1/machines/{id}/status", v.postStatus)
	mux.HandleFunc("POST /v1/processes", v.admin(v.postProcess))
	mux.HandleFunc("GET /v1/processes", v.admin(v.listProcesses))
	mux.HandleFunc("GET /v1/processes/{id}", v.admin(v.getProcess))
	mux.HandleFunc("DELETE /v1/processes/{id}", v.admin(v.deleteProcess))
	mux.HandleFunc("GET /v1/processes/{id}/logs", v.admin(v.getLogs))
	mux.HandleFunc("GET /v1/events", v.admin(v.getEvents))
	return rest.Problems(mux, v.log)
}

// admin guards a route with the admin token. A machine token is a valid
// token without this right: 403.
func (v *VMM) admin(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		tok := rest.BearerToken(r)
		if tok == "" {
			rest.WriteError(w, rest.ErrUnauthorized())
			return
		}
		th := rest.TokenHash(tok)
		if rest.TokenEqual(th, v.adminTH) {
			h(w, r)
			return
		}
		isMachine := false
		_ = v.doWait(func(s *state) { isMachine = s.byToken[th] != "" })
		if isMachine {
			rest.WriteError(w, rest.ErrForbidden("call "+r.Method+" "+r.URL.Path))
			return
		}
		rest.WriteError(w, rest.ErrUnauthorized())
	}
}

// validateReport checks what decoding cannot: the values of API.md.
func validateReport(st *report) error {
	bad := func(format string, args ...any) error { return rest.Errorf(rest.Invalid, "", format, args...) }
	switch st.State {
	case api.LoadEmpty, api.LoadPartial, api.LoadFull, api.LoadShuttingDown:
	default:
		return bad("state %q: want empty, partial, full or shutting_down", st.State)
	}
	for _, p := range st.Processes.All() {
		if !names.ID(p.ID) || !processStates[p.State] || api.IsTerminal(p.State) {
			return bad("live process %q: want an id and a live state, got %q", p.ID, p.State)
		}
	}
	for _, p := range st.Ended {
		if !names.ID(p.ID) || !api.IsTerminal(p.State) {
			return bad("ended process %q: want an id and a final state, got %q", p.ID, p.State)
		}
	}
	return nil
}

// validateFleet checks a fleet and fills its defaults.
func validateFleet(f *api.Fleet) error {
	bad := func(format string, args ...any) error { return rest.Errorf(rest.Invalid, "", format, args...) }
	if !names.Fleet(f.Name) {
		return bad("name %q: want 1-63 lower-case letters, digits and -", f.Name)
	}
	if f.Provider == "" {
		f.Provider = "local"
	}
	if f.ProcessesPerMachine == 0 {
		f.ProcessesPerMachine = 4
	}
	if f.ProcessesPerMachine < 1 || f.ProcessesPerMachine > 1000 {
		return bad("processesPerMachine must be 1-1000")
	}
	if f.Ports == nil {
		f.Ports = []string{"game"}
	}
	if f.Placement == "" {
		f.Placement = api.PlacementPacked
	}
	if f.Placement != api.PlacementPacked && f.Placement != api.PlacementDistributed {
		return bad("placement %q: want packed or distributed", f.Placement)
	}
	if f.SDK == "" {
		f.SDK = api.SDKDedi
	}
	if f.SDK != api.SDKDedi && f.SDK != api.SDKAgones {
		return bad("sdk %q: want dedi or agones", f.SDK)
	}
	sc := &f.Scaling
	if sc.MaxMachines == 0 {
		sc.MaxMachines = 10
	}
	if sc.IdleShutdownSeconds == 0 {
		sc.IdleShutdownSeconds = 60
	}
	if sc.MinMachines < 0 || sc.MaxMachines < 1 || sc.MinMachines > sc.MaxMachines || sc.MaxMachines > 10000 || sc.IdleShutdownSeconds < 0 {
		return bad("scaling: want 0 <= minMachines <= maxMachines (1-10000) and idleShutdownSeconds >= 0")
	}
	h := &f.Health
	if h.PeriodSeconds == 0 {
		h.PeriodSeconds = 2
	}
	if h.FailureThreshold == 0 {
		h.FailureThreshold = 3
	}
	if h.StartTimeoutSeconds == 0 {
		h.StartTimeoutSeconds = 60
	}
	if h.PeriodSeconds < 0.01 || h.PeriodSeconds > 3600 || h.FailureThreshold < 1 || h.FailureThreshold > 1000 || h.StartTimeoutSeconds < 0 || h.StartTimeoutSeconds > 86400 {
		return bad("health values out of range")
	}
	if len(f.Ports) > 16 {
		return bad("at most 16 ports per process")
	}
	seen := map[string]bool{}
	for _, p := range f.Ports {
		if !names.Port(p) || seen[p] {
			return bad("port name %q: want unique lower-case letters, digits and _, starting with a letter", p)
		}
		seen[p] = true
	}
	for _, arg := range f.Command {
		if strings.IndexByte(arg, 0) >= 0 {
			return bad("command arguments must not contain NUL bytes")
		}
	}
	if sc.IdleShutdownSeconds > 365*24*3600 {
		return bad("scaling.idleShutdownSeconds is at most a year")
	}
	if f.Provider == "local" && f.Image != "" {
		return bad("the local provider runs the dedi binary's LSPM on this host and takes no image; leave image empty and set command")
	}
	if f.Image == "" && len(f.Command) == 0 && f.Provider != "local" {
		return bad("a fleet needs an image or a command")
	}
	if len(f.Command) > 0 && f.Command[0] == "" {
		return bad("command[0] must name an executable")
	}
	if f.State != "" || !f.CreatedAt.IsZero() {
		return bad("state and createdAt are set by the VMM")
	}
	return nil
}

func (v *VMM) postFleet(w http.ResponseWriter, r *http.Request) {
	var f api.Fleet
	if err := rest.DecodeJSON(r, &f, false); err != nil {
		rest.WriteError(w, err)
		return
	}
	if err := validateFleet(&f); err != nil {
		rest.WriteError(w, err)
		return
	}
	answer(v, w, http.StatusCreated, func(s *state) (api.Fleet, error) { return s.createFleet(f) })
}

func (v *VMM) listFleets(w http.ResponseWriter, r *http.Request) {
	items := []api.Fleet{}
	_ = v.doWait(func(s *state) {
		for _, f := range s.fleets {
			items = append(items, s.fleetView(f))
		}
	})
	sort.Slice(items, func(i, j int) bool { return items[i].Name < items[j].Name })
	rest.WriteJSON(w, http.StatusOK, api.List[api.Fleet]{Items: items})
}

func (v *VMM) getFleet(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	answer(v, w, http.StatusOK, func(s *state) (api.Fleet, error) {
		if f := s.fleets[name]; f != nil {
			return s.fleetView(f), nil
		}
		return api.Fleet{}, rest.Errorf(rest.NotFound, "", "no fleet %q", name)
	})
}

func (v *VMM) deleteFleet(w http.ResponseWriter, r *http.Request) {
	answer(v, w, http.StatusAccepted, func(s *state) (api.Fleet, error) { return s.deleteFleet(r.PathValue("name")) })
}

func (v *VMM) postMachine(w http.ResponseWriter, r *http.Request) {
	var req api.CreateMachineRequest
	if err := rest.DecodeJSON(r, &req, false); err != nil {
		rest.WriteError(w, err)
		return
	}
	if req.Fleet == "" {
		rest.WriteError(w, rest.Errorf(rest.Invalid, "", "fleet is required"))
		return
	}
	answer(v, w, http.StatusAccepted, func(s *state) (api.Machine, error) {
		f := s.fleets[req.Fleet]
		switch {
		case f == nil:
			return api.Machine{}, rest.Errorf(rest.NotFound, "", "no fleet %q", req.Fleet)
		case f.deleting:
			return api.Machine{}, rest.Errorf(rest.Conflict, "fleet_deleting", "fleet %q is being deleted", req.Fleet)
		default:
			n := 0
			for _, m := range s.machines {
				if m.m.Fleet == req.Fleet && s.live(m) {
					n++
				}
			}
			if n >= f.spec.Scaling.MaxMachines {
				e := rest.Errorf(rest.Unavailable, api.CodeNoCapacity, "fleet %q runs %d of %d machines", req.Fleet, n, f.spec.Scaling.MaxMachines)
				e.RetryAfter = 2
				return api.Machine{}, e
			}
			m := s.newMachine(f)
			m.idleAt = s.now()
			return m.m, nil
		}
	})
}

var machineStates = map[string]bool{api.MachineProvisioning: true, api.MachineBooting: true, api.MachineReady: true,
	api.MachineDraining: true, api.MachineShuttingDown: true, api.MachineTerminated: true, api.MachineLost: true}

var processStates = map[string]bool{api.StateStarting: true, api.StateReady: true, api.StateAllocated: true, api.StateExited: true,
	api.StateCrashed: true, api.StateUnhealthy: true, api.StateKilled: true, api.StateLost: true}

func (v *VMM) listMachines(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	fleet, st := q.Get("fleet"), q.Get("state")
	if st != "" && !machineStates[st] {
		rest.WriteError(w, rest.Errorf(rest.Invalid, "", "state %q is not a machine state", st))
		return
	}
	var items []api.Machine
	_ = v.doWait(func(s *state) { items = s.machineList(fleet, st) })
	rest.WriteJSON(w, http.StatusOK, api.List[api.Machine]{Items: items})
}

func (v *VMM) getMachine(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	answer(v, w, http.StatusOK, func(s *state) (api.Machine, error) {
		m := s.machines[id]
		if m == nil {
			return api.Machine{}, rest.Errorf(rest.NotFound, "", "no machine %q", id)
		}
		out := m.m
		out.ProcessCount = len(m.procs)
		return out, nil
	})
}

func (v *VMM) deleteMachine(w http.ResponseWriter, r *http.Request) {
	answer(v, w, http.StatusAccepted, func(s *state) (api.Machine, error) { return s.requestMachineRemoval(r.PathValue("id")) })
}

// readReport reads and decodes a status report body (see report) into a
// pooled report, which the caller releases.
func readReport(r *http.Request) (*report, error) {
	rep := reportPool.Get().(*report)
	body, err := rest.ReadBodyInto(r, rep.body)
	if err != nil {
		rep.release()
		return nil, err
	}
	rep.body = body
	if len(bytes.TrimSpace(body)) == 0 {
		rep.release()
		return nil, rest.Errorf(rest.Invalid, "", "a JSON body is required")
	}
	if err := rep.decode(body); err != nil {
		rep.release()
		return nil, rest.Errorf(rest.Invalid, "", "body: %v", err)
	}
	return rep, nil
}

// postStatus applies an LSPM status report: only that machine's token.
func (v *VMM) postStatus(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	tok := rest.BearerToken(r)
	if tok == "" {
		rest.WriteError(w, rest.ErrUnauthorized())
		return
	}
	th := rest.TokenHash(tok)
	st, bodyErr := readReport(r)
	if bodyErr == nil {
		defer st.release() // after the loop has applied it: doWait returns once it ran
	}
	if bodyErr == nil && st.MachineID != "" && st.MachineID != id {
		bodyErr = rest.Errorf(rest.Invalid, "", "report of machine %q sent for %q", st.MachineID, id)
	}
	if bodyErr == nil {
		bodyErr = validateReport(st)
	}
	var applied bool
	var missing []string
	var lspmURL, token string
	var err error
	if derr := v.doWait(func(s *state) {
		m := s.machines[id]
		switch {
		case m != nil && rest.TokenEqual(m.tokenTH, th):
		case rest.TokenEqual(th, v.adminTH):
			err = rest.ErrForbidden("send a machine's status report; use that machine's token")
			return
		case s.byToken[th] != "":
			err = rest.ErrForbidden("report for another machine")
			return
		default:
			err = rest.ErrUnauthorized()
			return
		}
		if err = bodyErr; err != nil {
			return
		}
		applied, missing, err = s.applyReport(id, st)
		lspmURL, token = m.lspmURL, m.token
	}); derr != nil {
		err = derr
	}
	if err != nil {
		rest.WriteError(w, err)
		return
	}
	if len(missing) > 0 {
		v.askAbout(id, lspmURL, token, missing)
	}
	rest.WriteJSON(w, http.StatusOK, api.ReportAnswer{Applied: applied})
}

// askAbout fetches processes a report left out (their end was reported
// before a VMM restart, or the LSPM restarted) and applies what the LSPM
// knows of them; one it does not know is lost.
func (v *VMM) askAbout(machineID, lspmURL, token string, ids []string) {
	v.goOwned(func(ctx context.Context) {
		defer v.post(func(s *state) {
			for _, pid := range ids {
				delete(s.asking, pid)
			}
		})
		for _, pid := range ids {
			code, raw, err := v.lspmCall(ctx, http.MethodGet, lspmURL+"/v1/processes/"+pid, token, nil)
			if err != nil {
				return // the next report brings us here again
			}
			var p api.Process
			switch {
			case code == http.StatusOK && json.Unmarshal(raw, &p) == nil:
				v.post(func(s *state) {
					if m := s.machines[machineID]; m != nil {
						s.updateProcess(m, p)
						s.saveMachine(m)
					}
				})
			case code == http.StatusNotFound:
				v.post(func(s *state) {
					m := s.machines[machineID]
					if q := s.processes[pid]; m != nil && q != nil && !api.IsTerminal(q.State) {
						delete(m.procs, pid)
						s.markProcessLost(q, "its machine no longer knows it")
						s.saveMachine(m)
					}
				})
			}
		}
	})
}

// postProcess places a process (API.md): on a machine with room, or on a
// new one; with ?wait=ready it answers once the process is ready.
func (v *VMM) postProcess(w http.ResponseWriter, r *http.Request) {
	began := time.Now()
	q := r.URL.Query()
	wait := false
	switch q.Get("wait") {
	case "":
	case "ready":
		wait = true
	default:
		rest.WriteError(w, rest.Errorf(rest.Invalid, "", "wait %q: the only value is ready", q.Get("wait")))
		return
	}
	timeout := 30 * time.Second
	if s := q.Get("timeout"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil || d <= 0 || d > 10*time.Minute {
			rest.WriteError(w, rest.Errorf(rest.Invalid, "", "timeout %q: want a duration such as 30s, up to 10m", s))
			return
		}
		timeout = d
	}
	var req api.StartRequest
	if err := rest.DecodeJSON(r, &req, false); err != nil {
		rest.WriteError(w, err)
		return
	}
	if req.Fleet == "" {
		rest.WriteError(w, rest.Errorf(rest.Invalid, "", "fleet is required"))
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), timeout)
	defer cancel()
	p, err := v.start(ctx, req)
	if err != nil {
		rest.WriteError(w, err)
		return
	}
	if wait && p.State == api.StateStarting {
		if p, err = v.waitReady(ctx, p); err != nil {
			rest.WriteError(w, err)
			return
		}
	}
	v.metrics.placement.Observe(time.Since(began).Seconds())
	rest.WriteJSON(w, http.StatusCreated, p)
}

// start places and spawns one process, retrying elsewhere when an LSPM
// refuses (full, shutting down).
func (v *VMM) start(ctx context.Context, req api.StartRequest) (api.Process, error) {
	// One id for every attempt: an LSPM that took a spawn whose answer got
	// lost says so (409 exists) instead of running it twice.
	id := "p-" + uuid.NewString()
	for attempt := 0; ; attempt++ {
		var pl placement
		var tg spawnTarget
		var failed, targeted bool
		var err error
		if derr := v.doWait(func(s *state) {
			if pl, err = s.place(req, id); err != nil {
				return
			}
			select {
			case <-pl.ready: // a warm machine: its target in the same trip
				tg, failed, err = s.target(pl, req)
				targeted = true
			default:
			}
		}); derr != nil {
			return api.Process{}, derr
		}
		if err != nil && !targeted {
			return api.Process{}, err
		}
		if !targeted {
			select {
			case <-pl.ready:
			case <-rest.Stopping(ctx):
				// Nothing was started: the client may well try again.
				v.post(func(s *state) { s.release(pl) })
				e := rest.Errorf(rest.Unavailable, "stopping", "the VMM is stopping; no process was started")
				e.RetryAfter = 1
				return api.Process{}, e
			case <-ctx.Done():
				v.post(func(s *state) { s.release(pl) })
				return api.Process{}, rest.Errorf(rest.Timeout, api.CodeTimeout, "no machine of fleet %q became ready in time", req.Fleet)
			}
			_ = v.doWait(func(s *state) { tg, failed, err = s.target(pl, req) })
		}
		if err != nil {
			v.post(func(s *state) { s.release(pl) })
			if failed {
				// The provider could not make the machine: another try would
				// only make another failed machine.
				e := rest.Errorf(rest.Unavailable, "provision_failed", "%v", err)
				e.RetryAfter = 5
				return api.Process{}, e
			}
			if attempt < 5 { // the machine went away while booting: place again
				continue
			}
			return api.Process{}, rest.Errorf(rest.Unavailable, api.CodeNoCapacity, "no machine could take the process: %v", err)
		}
		code, raw, err := v.lspmCall(ctx, http.MethodPost, tg.lspmURL+"/v1/processes", tg.token, tg.req)
		if err != nil || (code == http.StatusConflict && strings.Contains(string(raw), `"exists"`)) {
			// Did the spawn get there? The LSPM knows the id if it did.
			cctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			gcode, graw, gerr := v.lspmCall(cctx, http.MethodGet, tg.lspmURL+"/v1/processes/"+id, tg.token, nil)
			cancel()
			if gerr == nil && gcode == http.StatusOK {
				code, raw, err = http.StatusCreated, graw, nil
			}
		}
		if err == nil && code == http.StatusCreated {
			var p api.Process
			if err := json.Unmarshal(raw, &p); err == nil {
				var out api.Process
				if derr := v.doWait(func(s *state) { out = s.placed(pl, p) }); derr != nil {
					return api.Process{}, derr
				}
				return out, nil
			}
		}
		v.post(func(s *state) { s.release(pl) })
		var prob api.Problem
		_ = json.Unmarshal(raw, &prob)
		retry := err != nil || prob.Code == api.CodeFull || prob.Code == api.CodeShuttingDown || code >= 500
		if retry && attempt < 5 && ctx.Err() == nil {
			continue
		}
		if err != nil {
			return api.Process{}, rest.Errorf(rest.Unavailable, "machine_unreachable", "machine %s: %v", pl.machineID, err)
		}
		if prob.Code == "" {
			return api.Process{}, rest.Errorf(rest.Internal, "machine_error", "machine %s answered %d", pl.machineID, code)
		}
		// The machine's own refusal (for example a command it does not
		// allow) is the caller's answer.
		return api.Process{}, &rest.Error{Kind: kindOf(code), Code: prob.Code, Detail: "machine " + pl.machineID + ": " + prob.Detail}
	}
}

func kindOf(status int) rest.Kind {
	switch status {
	case http.StatusBadRequest:
		return rest.Invalid
	case http.StatusForbidden:
		return rest.Forbidden
	case http.StatusNotFound:
		return rest.NotFound
	case http.StatusConflict:
		return rest.Conflict
	case http.StatusServiceUnavailable:
		return rest.Unavailable
	}
	return rest.Internal
}

// waitReady waits until a report shows the process out of starting.
func (v *VMM) waitReady(ctx context.Context, p api.Process) (api.Process, error) {
	c := make(chan api.Process, 1)
	var cur api.Process
	_ = v.doWait(func(s *state) {
		q := s.processes[p.ID]
		if q == nil || q.State != api.StateStarting {
			if q != nil {
				cur = *q
			}
			c <- cur
			return
		}
		s.waiters[p.ID] = append(s.waiters[p.ID], c)
	})
	select {
	case got := <-c:
		if got.State == api.StateReady || got.State == api.StateAllocated {
			return got, nil
		}
		return got, rest.Errorf(rest.Conflict, "not_ready", "process %s ended %s before it was ready", p.ID, got.State)
	case <-rest.Stopping(ctx):
		// The process exists and keeps starting: the documented 504, not
		// a 503 that a client would retry with a second process.
		return p, rest.Errorf(rest.Timeout, api.CodeTimeout, "the VMM is stopping before process %s was ready; it keeps starting (GET /v1/processes/%s)", p.ID, p.ID)
	case <-ctx.Done():
		return p, rest.Errorf(rest.Timeout, api.CodeTimeout, "process %s was not ready in time; it keeps starting (GET /v1/processes/%s)", p.ID, p.ID)
	}
}

func (v *VMM) listProcesses(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	st := q.Get("state")
	if st != "" && !processStates[st] {
		rest.WriteError(w, rest.Errorf(rest.Invalid, "", "state %q is not a process state", st))
		return
	}
	var items []api.Process
	_ = v.doWait(func(s *state) { items = s.processList(q.Get("fleet"), q.Get("machine"), st) })
	rest.WriteJSON(w, http.StatusOK, api.List[api.Process]{Items: items})
}

// processAndMachine finds a process and how to reach its machine.
func (v *VMM) processAndMachine(id string) (api.Process, string, string, error) {
	var p api.Process
	var url, token string
	found := false
	_ = v.doWait(func(s *state) {
		if q := s.processes[id]; q != nil {
			p, found = *q, true
			if m := s.machines[q.MachineID]; m != nil {
				url, token = m.lspmURL, m.token
			}
		}
	})
	if !found {
		return p, "", "", rest.Errorf(rest.NotFound, "", "no process %q", id)
	}
	return p, url, token, nil
}

func (v *VMM) getProcess(w http.ResponseWriter, r *http.Request) {
	p, _, _, err := v.processAndMachine(r.PathValue("id"))
	if err != nil {
		rest.WriteError(w, err)
		return
	}
	rest.WriteJSON(w, http.StatusOK, p)
}

func (v *VMM) deleteProcess(w http.ResponseWriter, r *http.Request) {
	g := r.URL.Query().Get("grace")
	if g != "" {
		if d, err := time.ParseDuration(g); err != nil || d < 0 || d > time.Hour {
			rest.WriteError(w, rest.Errorf(rest.Invalid, "", "grace %q: want a duration such as 10s, from 0 to 1h", g))
			return
		}
	}
	p, lspmURL, token, err := v.processAndMachine(r.PathValue("id"))
	if err != nil {
		rest.WriteError(w, err)
		return
	}
	if api.IsTerminal(p.State) {
		rest.WriteJSON(w, http.StatusAccepted, p)
		return
	}
	target := lspmURL + "/v1/processes/" + p.ID
	if g != "" {
		target += "?grace=" + url.QueryEscape(g)
	}
	code, raw, err := v.lspmCall(r.Context(), http.MethodDelete, target, token, nil)
	if err != nil {
		rest.WriteError(w, rest.Errorf(rest.Unavailable, "machine_unreachable", "machine %s: %v", p.MachineID, err))
		return
	}
	if code != http.StatusAccepted {
		var prob api.Problem
		_ = json.Unmarshal(raw, &prob)
		rest.WriteError(w, &rest.Error{Kind: kindOf(code), Code: orDefault(prob.Code, "machine_error"), Detail: prob.Detail})
		return
	}
	rest.WriteJSON(w, http.StatusAccepted, p)
}

func orDefault(s, d string) string {
	if s == "" {
		return d
	}
	return s
}

// getLogs streams the process's log from its machine.
func (v *VMM) getLogs(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	if s := q.Get("tail"); s != "" {
		if n, err := strconv.Atoi(s); err != nil || n < 0 || n > 1_000_000 {
			rest.WriteError(w, rest.Errorf(rest.Invalid, "", "tail %q: want a whole number of lines from 0 to 1000000", s))
			return
		}
	}
	if s := q.Get("follow"); s != "" {
		if _, err := strconv.ParseBool(s); err != nil {
			rest.WriteError(w, rest.Errorf(rest.Invalid, "", "follow %q: want true or false", s))
			return
		}
	}
	p, url, token, err := v.processAndMachine(r.PathValue("id"))
	if err != nil {
		rest.WriteError(w, err)
		return
	}
	if url == "" {
		rest.WriteError(w, rest.Errorf(rest.Unavailable, "machine_unreachable", "process %s has no reachable machine", p.ID))
		return
	}
	ctx, cancel := rest.UntilStop(r.Context()) // a followed log ends when the VMM stops
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url+"/v1/processes/"+p.ID+"/logs?"+q.Encode(), nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := (&http.Client{Transport: v.lspm.Transport}).Do(req) // no timeout: a followed log streams
	if err != nil {
		rest.WriteError(w, rest.Errorf(rest.Unavailable, "machine_unreachable", "machine %s: %v", p.MachineID, err))
		return
	}
	defer resp.Body.Close()
	for _, h := range []string{"Content-Type", "X-Content-Type-Options"} {
		if val := resp.Header.Get(h); val != "" {
			w.Header().Set(h, val)
		}
	}
	w.WriteHeader(resp.StatusCode)
	flusher, _ := w.(http.Flusher)
	buf := make([]byte, 32<<10)
	for {
		n, err := resp.Body.Read(buf)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				return
			}
			if flusher != nil {
				flusher.Flush()
			}
		}
		if err != nil {
			if err != io.EOF {
				v.log.Debug("log stream ended", "process", p.ID, "err", err)
			}
			return
		}
	}
}

// getEvents streams events as Server-Sent Events; ?after=SEQ (or the
// Last-Event-ID header) replays the stored ones after SEQ first.
func (v *VMM) getEvents(w http.ResponseWriter, r *http.Request) {
	after := int64(-1)
	for _, s := range []string{r.Header.Get("Last-Event-ID"), r.URL.Query().Get("after")} {
		if s == "" {
			continue
		}
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil || n < 0 {
			rest.WriteError(w, rest.Errorf(rest.Invalid, "", "after %q: want an event sequence number", s))
			return
		}
		after = n
	}
	sub, ok := v.events.subscribe()
	if !ok {
		rest.WriteError(w, errStopped)
		return
	}
	defer v.events.unsubscribe(sub)
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	flusher, _ := w.(http.Flusher)
	last := int64(0)
	write := func(e api.Event) bool {
		if e.Seq <= last {
			return true
		}
		last = e.Seq
		_, err := fmt.Fprintf(w, "id: %d\ndata: %s\n\n", e.Seq, mustJSON(e))
		return err == nil
	}
	if after >= 0 {
		rows, err := v.store.Events(after, 10000)
		if err == nil {
			for _, row := range rows {
				var e api.Event
				if json.Unmarshal(row.Body, &e) == nil && !write(e) {
					return
				}
			}
		}
	}
	fmt.Fprint(w, ": stream open\n\n")
	if flusher != nil {
		flusher.Flush()
	}
	keepAlive := time.NewTicker(15 * time.Second)
	defer keepAlive.Stop()
	for {
		select {
		case e, ok := <-sub:
			if !ok {
				return
			}
			if !write(e) {
				return
			}
		case <-keepAlive.C:
			if _, err := fmt.Fprint(w, ": keep-alive\n\n"); err != nil {
				return
			}
		case <-r.Context().Done():
			return
		}
		if flusher != nil {
			flusher.Flush()
		}
	}
}
