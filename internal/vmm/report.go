package vmm

import (
	"errors"
	"fmt"
	"hash/maphash"
	"reflect"
	"slices"
	"strings"
	"sync"
	"time"

	jsonv2 "github.com/go-json-experiment/json"
	"github.com/go-json-experiment/json/jsontext"

	"dedi.dev/dedi/api"
)

// report is an LSPM status report as the VMM decodes it: the fields of
// api.Status, with the live processes decoded lean.
//
// Status reports are the VMM's hottest input: every machine sends its
// whole live set every few seconds (API.md: a report is what the LSPM's
// GET /v1/status returns), 2,000 reports a second at 10,000 machines.
// Between two reports of a process only a few fields move: its state,
// player count, heartbeat time, pid and memory. Those are decoded into
// values; the others (command, params, labels, ports, ...) are kept as
// raw JSON with a hash, and decoded and type-checked only when the hash
// differs from the one the VMM holds for the process: when the process
// is new to the VMM or, rarely, when its labels changed. So the steady
// path allocates almost nothing, and a report never replaces the maps of
// 32 processes with equal copies.
//
// Decoding stays as strict as rest.DecodeJSON: names match exactly (JSON
// v2's default), unknown and duplicate members are refused.
type report struct {
	MachineID    string        `json:"machineId"`
	State        string        `json:"state"`
	Seq          uint64        `json:"seq"`
	MaxProcesses int           `json:"maxProcesses"`
	Processes    liveProcesses `json:"processes"`
	Ended        []api.Process `json:"ended"`
	Hardware     api.Hardware  `json:"hardware"`
	StartedAt    time.Time     `json:"startedAt"`
	ShutdownAt   *time.Time    `json:"shutdownAt"`
	At           time.Time     `json:"at"`

	body []byte // the request body's buffer, pooled with the report
}

// decodeReport decodes a status report body into a pooled report; the
// caller releases it when done.
func decodeReport(body []byte) (*report, error) {
	r := reportPool.Get().(*report)
	if err := r.decode(body); err != nil {
		r.release()
		return nil, err
	}
	return r, nil
}

// decode decodes body into r, which holds nothing but its buffers.
func (r *report) decode(body []byte) error {
	return jsonv2.Unmarshal(body, r, jsonv2.RejectUnknownMembers(true))
}

// liveProcess is one process of a report's live set.
type liveProcess struct {
	ID              string
	State           string
	PID             int
	Players         int
	Instances       int
	RSSBytes        int64
	ReadyAt         time.Time // zero: null
	LastHeartbeatAt time.Time // zero: null
	fixed           []byte    // the other members, as one JSON object
	sum             uint64    // hash of fixed
	start, end      int       // fixed's place in the arena, while decoding
}

// movingNames are the members of a process that change between reports;
// every other member of api.Process is fixed (see report).
var movingNames = map[string]bool{"id": true, "state": true, "pid": true, "players": true, "instances": true,
	"rssBytes": true, "readyAt": true, "lastHeartbeatAt": true}

// fixedNames are the other members of api.Process, read off its type so
// that a member added to the wire is never refused here; sorted, for a
// binary search that is cheaper than a map on this path.
var fixedNames = func() []string {
	var out []string
	t := reflect.TypeFor[api.Process]()
	for i := 0; i < t.NumField(); i++ {
		name, _, _ := strings.Cut(t.Field(i).Tag.Get("json"), ",")
		if name != "" && name != "-" && !movingNames[name] {
			out = append(out, name)
		}
	}
	slices.Sort(out)
	return out
}()

func isFixedName(name []byte) bool {
	_, ok := slices.BinarySearch(fixedNames, string(name))
	return ok
}

// decodeFixed decodes and type-checks a process's fixed members.
func (p *liveProcess) decodeFixed() (api.Process, error) {
	var f api.Process
	if err := jsonv2.Unmarshal(p.fixed, &f, jsonv2.RejectUnknownMembers(true)); err != nil {
		return f, fmt.Errorf("process %q: %w", p.ID, err)
	}
	return f, nil
}

// process is the process a live entry describes: its fixed members f with
// the moving ones laid over them.
func (p *liveProcess) process(f api.Process) api.Process {
	f.ID, f.State, f.PID, f.Players, f.Instances, f.RSSBytes = p.ID, p.State, p.PID, p.Players, p.Instances, p.RSSBytes
	f.ReadyAt, f.LastHeartbeatAt = nil, nil
	if !p.ReadyAt.IsZero() {
		t := p.ReadyAt
		f.ReadyAt = &t
	}
	if !p.LastHeartbeatAt.IsZero() {
		t := p.LastHeartbeatAt
		f.LastHeartbeatAt = &t
	}
	return f
}

// liveProcesses is a report's live set. Its buffers are reused from
// report to report (see reportPool): the fixed members of all its
// processes share one arena.
type liveProcesses struct {
	list  []liveProcess
	arena []byte
	unq   []byte // scratch for member names
}

// All returns the live processes.
func (l *liveProcesses) All() []liveProcess { return l.list }

var fixedSeed = maphash.MakeSeed()

// UnmarshalJSONFrom decodes the live set, member by member, into the
// buffers l already has.
func (l *liveProcesses) UnmarshalJSONFrom(dec *jsontext.Decoder) error {
	l.list, l.arena = l.list[:0], l.arena[:0]
	tok, err := dec.ReadToken()
	if err != nil {
		return err
	}
	switch tok.Kind() {
	case jsontext.KindNull:
		return nil
	case jsontext.KindBeginArray:
	default:
		return errors.New("processes must be an array")
	}
	for dec.PeekKind() != jsontext.KindEndArray {
		var p liveProcess
		p.start = len(l.arena)
		if l.arena, err = p.decode(dec, l.arena, &l.unq); err != nil {
			return fmt.Errorf("processes[%d]: %w", len(l.list), err)
		}
		p.end = len(l.arena)
		l.list = append(l.list, p)
	}
	if _, err := dec.ReadToken(); err != nil {
		return err
	}
	for i := range l.list {
		p := &l.list[i]
		p.fixed = l.arena[p.start:p.end:p.end]
		p.sum = maphash.Bytes(fixedSeed, p.fixed)
	}
	return nil
}

// reportPool keeps reports and their buffers between requests: at 2,000
// reports a second, allocating them anew was a third of the VMM's garbage.
var reportPool = sync.Pool{New: func() any { return new(report) }}

// reset empties r for reuse, keeping its buffers; a report holding
// outsized buffers (a huge one) is not kept.
func (r *report) reset() {
	list, arena, unq, body := r.Processes.list[:0], r.Processes.arena[:0], r.Processes.unq[:0], r.body[:0]
	*r = report{}
	if cap(arena) <= 256<<10 && cap(body) <= 256<<10 {
		r.Processes = liveProcesses{list: list, arena: arena, unq: unq}
		r.body = body
	}
}

// release returns r to the pool; nothing may use r or its processes after.
func (r *report) release() {
	r.reset()
	reportPool.Put(r)
}

// decode reads one process object, appending its fixed members to arena
// as a JSON object of their own; scratch is reused for member names.
func (p *liveProcess) decode(dec *jsontext.Decoder, arena []byte, scratch *[]byte) ([]byte, error) {
	tok, err := dec.ReadToken()
	if err != nil {
		return arena, err
	}
	if tok.Kind() != jsontext.KindBeginObject {
		return arena, errors.New("a process must be an object")
	}
	arena = append(arena, '{')
	first := true
	unq := *scratch
	defer func() { *scratch = unq }()
	for dec.PeekKind() != jsontext.KindEndObject {
		raw, err := dec.ReadValue() // the member's name, still quoted
		if err != nil {
			return arena, err
		}
		if unq, err = jsontext.AppendUnquote(unq[:0], raw); err != nil {
			return arena, err
		}
		switch string(unq) {
		case "id":
			err = jsonv2.UnmarshalDecode(dec, &p.ID)
		case "state":
			var s string
			err = jsonv2.UnmarshalDecode(dec, &s)
			p.State = internState(s)
		case "pid":
			err = jsonv2.UnmarshalDecode(dec, &p.PID)
		case "players":
			err = jsonv2.UnmarshalDecode(dec, &p.Players)
		case "instances":
			err = jsonv2.UnmarshalDecode(dec, &p.Instances)
		case "rssBytes":
			err = jsonv2.UnmarshalDecode(dec, &p.RSSBytes)
		case "readyAt":
			err = jsonv2.UnmarshalDecode(dec, &p.ReadyAt)
		case "lastHeartbeatAt":
			err = jsonv2.UnmarshalDecode(dec, &p.LastHeartbeatAt)
		default:
			if !isFixedName(unq) {
				return arena, fmt.Errorf("unknown field %q (field names are case-sensitive)", unq)
			}
			if !first {
				arena = append(arena, ',')
			}
			first = false
			arena = append(arena, raw...) // the name as sent; still valid: nothing was read since
			arena = append(arena, ':')
			var v jsontext.Value
			if v, err = dec.ReadValue(); err == nil {
				arena = append(arena, v...)
			}
		}
		if err != nil {
			return arena, fmt.Errorf("%s: %w", unq, err)
		}
	}
	if _, err := dec.ReadToken(); err != nil {
		return arena, err
	}
	return append(arena, '}'), nil
}

// internState returns the constant for a known state, so that a report
// does not allocate 32 copies of "ready".
func internState(s string) string {
	for _, st := range []string{api.StateReady, api.StateAllocated, api.StateStarting, api.StateExited,
		api.StateCrashed, api.StateUnhealthy, api.StateKilled, api.StateLost} {
		if s == st {
			return st
		}
	}
	return s
}

// validProcessID is API.md's process id: [A-Za-z0-9][A-Za-z0-9._-]{0,127}.
func validProcessID(id string) bool {
	if id == "" || len(id) > 128 {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		case i > 0 && (c == '.' || c == '_' || c == '-'):
		default:
			return false
		}
	}
	return true
}

// interner shares equal commands, labels and annotations between
// processes: a fleet's processes mostly run one command and carry the same
// labels, and a Go map costs ~300 bytes even with one entry, so at 320,000
// processes the copies were a fifth of the VMM's heap. Values are shared,
// never changed in place (a changed label set arrives as a new map). It is
// bounded: past maxInterned distinct values, new ones are kept unshared.
// Owned by the loop.
type interner struct {
	commands map[string][]string
	maps     map[string]map[string]string
}

const maxInterned = 4096

func (in *interner) process(p *api.Process) {
	if in.commands == nil {
		in.commands, in.maps = map[string][]string{}, map[string]map[string]string{}
	}
	if len(p.Command) > 0 {
		var b strings.Builder
		for _, a := range p.Command {
			fmt.Fprintf(&b, "%d:%s", len(a), a) // lengths first: no argument can fake a boundary
		}
		key := b.String()
		if c, ok := in.commands[key]; ok {
			p.Command = c
		} else if len(in.commands) < maxInterned {
			in.commands[key] = p.Command
		}
	}
	p.Labels = in.stringMap(p.Labels)
	p.Annotations = in.stringMap(p.Annotations)
}

func (in *interner) stringMap(m map[string]string) map[string]string {
	if len(m) == 0 {
		return m
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var b strings.Builder
	for _, k := range keys {
		// Lengths first: no key or value can fake a boundary.
		fmt.Fprintf(&b, "%d:%s%d:%s", len(k), k, len(m[k]), m[k])
	}
	key := b.String()
	if shared, ok := in.maps[key]; ok {
		return shared
	}
	if len(in.maps) < maxInterned {
		in.maps[key] = m
	}
	return m
}
