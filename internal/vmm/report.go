package vmm

import (
	"errors"
	"fmt"
	"hash/maphash"
	"reflect"
	"strings"
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
}

// decodeReport decodes a status report body.
func decodeReport(body []byte) (*report, error) {
	var r report
	if err := jsonv2.Unmarshal(body, &r, jsonv2.RejectUnknownMembers(true)); err != nil {
		return nil, err
	}
	return &r, nil
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
}

// movingNames are the members of a process that change between reports;
// every other member of api.Process is fixed (see report).
var movingNames = map[string]bool{"id": true, "state": true, "pid": true, "players": true, "instances": true,
	"rssBytes": true, "readyAt": true, "lastHeartbeatAt": true}

// fixedNames are the other members of api.Process, read off its type so
// that a member added to the wire is never refused here.
var fixedNames = func() map[string]bool {
	out := map[string]bool{}
	t := reflect.TypeFor[api.Process]()
	for i := 0; i < t.NumField(); i++ {
		name, _, _ := strings.Cut(t.Field(i).Tag.Get("json"), ",")
		if name != "" && name != "-" && !movingNames[name] {
			out[name] = true
		}
	}
	return out
}()

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

// liveProcesses is a report's live set. The fixed members of all its
// processes share one buffer.
type liveProcesses []liveProcess

var fixedSeed = maphash.MakeSeed()

// UnmarshalJSONFrom decodes the live set, member by member.
func (l *liveProcesses) UnmarshalJSONFrom(dec *jsontext.Decoder) error {
	tok, err := dec.ReadToken()
	if err != nil {
		return err
	}
	switch tok.Kind() {
	case jsontext.KindNull:
		*l = nil
		return nil
	case jsontext.KindBeginArray:
	default:
		return errors.New("processes must be an array")
	}
	list := make([]liveProcess, 0, 32)
	spans := make([][2]int, 0, 32)
	arena := make([]byte, 0, 16<<10) // a 32-process report's fixed members fit
	var unq []byte                   // scratch for member names
	for dec.PeekKind() != jsontext.KindEndArray {
		var p liveProcess
		start := len(arena)
		if arena, err = p.decode(dec, arena, &unq); err != nil {
			return fmt.Errorf("processes[%d]: %w", len(list), err)
		}
		list = append(list, p)
		spans = append(spans, [2]int{start, len(arena)})
	}
	if _, err := dec.ReadToken(); err != nil {
		return err
	}
	for i := range list {
		list[i].fixed = arena[spans[i][0]:spans[i][1]:spans[i][1]]
		list[i].sum = maphash.Bytes(fixedSeed, list[i].fixed)
	}
	*l = list
	return nil
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
			if !fixedNames[string(unq)] {
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
