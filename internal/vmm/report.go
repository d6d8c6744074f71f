package vmm

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"hash/maphash"
	"io"
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

	body []byte            // the request body's buffer, pooled with the report
	rd   bytes.Buffer      // reads body
	dec  *jsontext.Decoder // pooled with the report too
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
//
// The body is read with one tokenizer and no reflection on the hot path.
// The tokenizer's own duplicate-name check (a set of names per object) is
// off: a bit per known member does the same job for the report and its
// processes, and the nested values kept raw are checked by the strict
// decode they get before they are first used (decodeFixed); equal bytes
// to ones checked before need no second check.
func (r *report) decode(body []byte) error {
	r.rd = *bytes.NewBuffer(body)
	if r.dec == nil {
		r.dec = jsontext.NewDecoder(&r.rd, jsontext.AllowDuplicateNames(true))
	} else {
		r.dec.Reset(&r.rd, jsontext.AllowDuplicateNames(true))
	}
	dec := r.dec
	defer dec.Reset(bytes.NewBuffer(nil)) // let go of body
	if err := r.decodeFrom(dec); err != nil {
		return err
	}
	// One value and nothing after it.
	if _, err := dec.ReadToken(); err != io.EOF {
		if err == nil {
			err = errors.New("data after the report")
		}
		return err
	}
	return nil
}

// The report's members, by bit.
const (
	repMachineID = iota
	repState
	repSeq
	repMaxProcesses
	repProcesses
	repEnded
	repHardware
	repStartedAt
	repShutdownAt
	repAt
)

var reportMembers = map[string]int{"machineId": repMachineID, "state": repState, "seq": repSeq,
	"maxProcesses": repMaxProcesses, "processes": repProcesses, "ended": repEnded, "hardware": repHardware,
	"startedAt": repStartedAt, "shutdownAt": repShutdownAt, "at": repAt}

func (r *report) decodeFrom(dec *jsontext.Decoder) error {
	tok, err := dec.ReadToken()
	if err != nil {
		return err
	}
	if tok.Kind() != jsontext.KindBeginObject {
		return errors.New("a status report must be an object")
	}
	var seen uint32
	for dec.PeekKind() != jsontext.KindEndObject {
		name, err := memberName(dec, &r.Processes.unq)
		if err != nil {
			return err
		}
		i, ok := reportMembers[string(name)]
		if !ok {
			return fmt.Errorf("unknown field %q (field names are case-sensitive)", name)
		}
		if seen&(1<<i) != 0 {
			return fmt.Errorf("duplicate field %q", name)
		}
		seen |= 1 << i
		switch i {
		case repMachineID:
			err = readString(dec, &r.MachineID)
		case repState:
			var raw jsontext.Value
			if raw, err = dec.ReadValue(); err == nil {
				r.State, err = internedString(raw, loadStates)
			}
		case repSeq:
			r.Seq, err = readUint(dec)
		case repMaxProcesses:
			var n int64
			n, err = readInt(dec)
			r.MaxProcesses = int(n)
		case repProcesses:
			err = r.Processes.decodeFrom(dec)
		case repEnded:
			err = readStrict(dec, &r.Ended)
		case repHardware:
			err = readStrict(dec, &r.Hardware)
		case repStartedAt:
			err = readTime(dec, &r.StartedAt)
		case repShutdownAt:
			var t time.Time
			if err = readTime(dec, &t); err == nil && !t.IsZero() {
				r.ShutdownAt = &t
			}
		case repAt:
			err = readTime(dec, &r.At)
		}
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
	}
	_, err = dec.ReadToken()
	return err
}

// memberName reads an object member's name; it is valid until the next
// read.
func memberName(dec *jsontext.Decoder, scratch *[]byte) ([]byte, error) {
	raw, err := dec.ReadValue() // the name, still quoted
	if err != nil {
		return nil, err
	}
	if bytes.IndexByte(raw, '\\') < 0 {
		return raw[1 : len(raw)-1], nil
	}
	*scratch, err = jsontext.AppendUnquote((*scratch)[:0], raw)
	return *scratch, err
}

func readString(dec *jsontext.Decoder, s *string) error {
	tok, err := dec.ReadToken()
	if err != nil {
		return err
	}
	switch tok.Kind() {
	case jsontext.KindString:
		*s = tok.String()
	case jsontext.KindNull:
		*s = ""
	default:
		return fmt.Errorf("want a string, got %s", tok.Kind())
	}
	return nil
}

// internedString decodes a JSON string, returning the constant of known
// when it is one of them, so that equal strings are not allocated anew
// for every report.
func internedString(raw jsontext.Value, known []string) (string, error) {
	switch raw.Kind() {
	case jsontext.KindNull:
		return "", nil
	case jsontext.KindString:
	default:
		return "", fmt.Errorf("want a string, got %s", raw.Kind())
	}
	if bytes.IndexByte(raw, '\\') < 0 {
		in := raw[1 : len(raw)-1]
		for _, k := range known {
			if string(in) == k {
				return k, nil
			}
		}
		return string(in), nil
	}
	out, err := jsontext.AppendUnquote(nil, raw)
	return string(out), err
}

// readNumber reads a JSON number, or null (nil).
func readNumber(dec *jsontext.Decoder) ([]byte, error) {
	raw, err := dec.ReadValue()
	if err != nil {
		return nil, err
	}
	switch raw.Kind() {
	case jsontext.KindNull:
		return nil, nil
	case jsontext.KindNumber:
		return raw, nil
	}
	return nil, fmt.Errorf("want a number, got %s", raw.Kind())
}

// readInt reads a JSON integer: a number with a fraction or an exponent
// is refused, as the strict decoder refuses it for an integer field.
func readInt(dec *jsontext.Decoder) (int64, error) {
	raw, err := readNumber(dec)
	if err != nil || raw == nil {
		return 0, err
	}
	n, ok := parseInt(raw)
	if !ok {
		return 0, fmt.Errorf("%s is not a whole number in range", raw)
	}
	return n, nil
}

// readUint reads a JSON integer from 0 to the largest uint64.
func readUint(dec *jsontext.Decoder) (uint64, error) {
	raw, err := readNumber(dec)
	if err != nil || raw == nil {
		return 0, err
	}
	n, ok := parseUint(raw)
	if !ok {
		return 0, fmt.Errorf("%s is not a whole number in range", raw)
	}
	return n, nil
}

// parseUint parses a valid JSON number that is a whole uint64. (strconv
// would need a string, allocated for every number of every report.)
func parseUint(raw []byte) (uint64, bool) {
	if len(raw) == 0 || len(raw) > 20 {
		return 0, false
	}
	var n uint64
	for _, c := range raw {
		if c < '0' || c > '9' {
			return 0, false // a sign, a fraction or an exponent
		}
		d := uint64(c - '0')
		if n > (1<<64-1-d)/10 {
			return 0, false
		}
		n = n*10 + d
	}
	return n, true
}

// parseInt parses a valid JSON number that is a whole int64.
func parseInt(raw []byte) (int64, bool) {
	if len(raw) > 0 && raw[0] == '-' {
		n, ok := parseUint(raw[1:])
		if !ok || n > 1<<63 {
			return 0, false
		}
		return -int64(n), true // 1<<63 wraps to the smallest int64, as it should
	}
	n, ok := parseUint(raw)
	return int64(n), ok && n <= 1<<63-1
}

// readTime reads an RFC 3339 time or null (the zero time).
func readTime(dec *jsontext.Decoder, t *time.Time) error {
	raw, err := dec.ReadValue()
	if err != nil {
		return err
	}
	switch raw.Kind() {
	case jsontext.KindNull:
		*t = time.Time{}
		return nil
	case jsontext.KindString:
	default:
		return fmt.Errorf("want an RFC 3339 time, got %s", raw.Kind())
	}
	in := raw[1 : len(raw)-1]
	if bytes.IndexByte(in, '\\') >= 0 {
		if in, err = jsontext.AppendUnquote(nil, raw); err != nil {
			return err
		}
	}
	return t.UnmarshalText(in)
}

// readStrict decodes a value the steady path does not need fast (the
// ended processes, the hardware) as strictly as rest.DecodeJSON.
func readStrict(dec *jsontext.Decoder, v any) error {
	raw, err := dec.ReadValue()
	if err != nil {
		return err
	}
	return jsonv2.Unmarshal(raw, v, jsonv2.RejectUnknownMembers(true))
}

var loadStates = []string{api.LoadEmpty, api.LoadPartial, api.LoadFull, api.LoadShuttingDown}

var processStateNames = []string{api.StateReady, api.StateAllocated, api.StateStarting, api.StateExited,
	api.StateCrashed, api.StateUnhealthy, api.StateKilled, api.StateLost}

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

// The members of a process that change between reports, by bit; every
// other member of api.Process is fixed (see report).
const (
	memID = iota
	memState
	memPID
	memPlayers
	memInstances
	memRSSBytes
	memReadyAt
	memLastHeartbeatAt
	memFixed // the first fixed member's bit
)

// processMembers gives each member of api.Process its bit: the moving ones
// above, then the fixed ones, read off the type so that a member added to
// the wire is never refused here.
var processMembers = func() map[string]int {
	out := map[string]int{"id": memID, "state": memState, "pid": memPID, "players": memPlayers,
		"instances": memInstances, "rssBytes": memRSSBytes, "readyAt": memReadyAt, "lastHeartbeatAt": memLastHeartbeatAt}
	moving := len(out)
	t := reflect.TypeFor[api.Process]()
	for i := 0; i < t.NumField(); i++ {
		name, _, _ := strings.Cut(t.Field(i).Tag.Get("json"), ",")
		if _, ok := out[name]; !ok && name != "" && name != "-" {
			out[name] = memFixed + len(out) - moving
		}
	}
	if len(out) > 64 {
		panic("api.Process has more members than a report's bit set holds")
	}
	return out
}()

// processMemberNames is processMembers the other way round.
var processMemberNames = func() []string {
	out := make([]string, len(processMembers))
	for name, i := range processMembers {
		out[i] = name
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

// liveProcesses is a report's live set. Its buffers are reused from
// report to report (see reportPool): the fixed members of all its
// processes share one arena.
type liveProcesses struct {
	list  []liveProcess
	arena []byte
	unq   []byte // scratch for member names
	// order is the members of the last process in the order it sent
	// them: an LSPM sends every process's members in one order, so a
	// name is matched by comparing it with the one at its place, not
	// looked up.
	order []int
}

// All returns the live processes.
func (l *liveProcesses) All() []liveProcess { return l.list }

var fixedSeed = maphash.MakeSeed()

// decodeFrom decodes the live set, member by member, into the buffers l
// already has.
func (l *liveProcesses) decodeFrom(dec *jsontext.Decoder) error {
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
		if err = p.decode(dec, l); err != nil {
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
	list, arena, unq, order, body, dec := r.Processes.list[:0], r.Processes.arena[:0], r.Processes.unq[:0], r.Processes.order, r.body[:0], r.dec
	*r = report{dec: dec}
	if cap(arena) <= 256<<10 && cap(body) <= 256<<10 {
		r.Processes = liveProcesses{list: list, arena: arena, unq: unq, order: order}
		r.body = body
	}
}

// release returns r to the pool; nothing may use r or its processes after.
func (r *report) release() {
	r.reset()
	reportPool.Put(r)
}

// decode reads one process object, appending its fixed members to
// l.arena as a JSON object of their own.
func (p *liveProcess) decode(dec *jsontext.Decoder, l *liveProcesses) (err error) {
	arena := l.arena
	defer func() { l.arena = arena }()
	tok, err := dec.ReadToken()
	if err != nil {
		return err
	}
	if tok.Kind() != jsontext.KindBeginObject {
		return errors.New("a process must be an object")
	}
	arena = append(arena, '{')
	first := true
	var seen uint64
	for at := 0; dec.PeekKind() != jsontext.KindEndObject; at++ {
		name, err := memberName(dec, &l.unq)
		if err != nil {
			return err
		}
		var i int
		if at < len(l.order) && processMemberNames[l.order[at]] == string(name) {
			i = l.order[at]
		} else {
			var ok bool
			if i, ok = processMembers[string(name)]; !ok {
				return fmt.Errorf("unknown field %q (field names are case-sensitive)", name)
			}
			if at < len(l.order) {
				l.order[at] = i
			} else {
				l.order = append(l.order, i)
			}
		}
		if seen&(1<<i) != 0 {
			return fmt.Errorf("duplicate field %q", name)
		}
		seen |= 1 << i
		var n int64
		switch i {
		case memID:
			err = readString(dec, &p.ID)
		case memState:
			var raw jsontext.Value
			if raw, err = dec.ReadValue(); err == nil {
				p.State, err = internedString(raw, processStateNames)
			}
		case memPID:
			n, err = readInt(dec)
			p.PID = int(n)
		case memPlayers:
			n, err = readInt(dec)
			p.Players = int(n)
		case memInstances:
			n, err = readInt(dec)
			p.Instances = int(n)
		case memRSSBytes:
			p.RSSBytes, err = readInt(dec)
		case memReadyAt:
			err = readTime(dec, &p.ReadyAt)
		case memLastHeartbeatAt:
			err = readTime(dec, &p.LastHeartbeatAt)
		default:
			if !first {
				arena = append(arena, ',')
			}
			first = false
			// A known name: plain letters, quoted as they are.
			arena = append(arena, '"')
			arena = append(arena, name...)
			arena = append(arena, '"', ':')
			var v jsontext.Value
			if v, err = dec.ReadValue(); err == nil {
				arena = append(arena, v...)
			}
		}
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
	}
	if _, err := dec.ReadToken(); err != nil {
		return err
	}
	arena = append(arena, '}')
	return nil
}

// interner shares equal commands, labels, annotations and params between
// processes: a fleet's processes mostly run one command and carry the same
// labels, and many matches run with the same params (a mode, a map), and a
// Go map costs ~300 bytes even with one entry, so at 320,000 processes the
// copies were a fifth of the VMM's heap, and the garbage collector walked
// them all on every cycle. Values are shared, never changed in place (a
// changed label set arrives as a new map). It is bounded: past maxInterned
// distinct values of a kind, new ones are kept unshared. Owned by the loop.
type interner struct {
	commands map[string][]string
	maps     map[string]map[string]string
	params   map[string]map[string]any
}

const maxInterned = 4096

func (in *interner) process(p *api.Process) {
	if in.commands == nil {
		in.commands, in.maps, in.params = map[string][]string{}, map[string]map[string]string{}, map[string]map[string]any{}
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
	if len(p.Params) > 0 {
		// Their JSON is their identity: encoding/json sorts map keys, and
		// equal JSON decodes to equal values.
		if raw, err := json.Marshal(p.Params); err == nil {
			if shared, ok := in.params[string(raw)]; ok {
				p.Params = shared
			} else if len(in.params) < maxInterned {
				in.params[string(raw)] = p.Params
			}
		}
	}
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
