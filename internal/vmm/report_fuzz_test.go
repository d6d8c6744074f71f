package vmm

import (
	"reflect"
	"testing"
	"time"

	"dedi.dev/dedi/api"
	"dedi.dev/dedi/internal/rest"
)

// FuzzDecodeReport: the lean report decoder never panics or hangs; every
// process it accepts has fixed members that are one JSON object; and what
// it accepts whole (fixed members included) the strict decoder of every
// other route accepts too, with the same values: the lean path is faster,
// never laxer.
func FuzzDecodeReport(f *testing.F) {
	for _, s := range []string{
		`{"seq":1,"state":"partial","processes":[{"id":"p-1","state":"ready","players":3,"labels":{"a":"b"},"command":["/g"]}]}`,
		`{"seq":1,"state":"partial","processes":[{"id":"p-1","state":"ready","id":"p-2"}]}`,
		`{"seq":1,"state":"tial","processes":[{"":"crzshed"}]e`,
		`{"processes":[{"\u0069d":"p","labels":{"a":1}}]}`,
		`{"processes":null}`,
		`{"processes":[null]}`,
		`{"processes":[[]]}`,
		`{"processes":[{"readyAt":"x"}]}`,
		`{"processes":[{"pid":1.5}]}`,
		`{"processes":[{"pid":1e2}]}`,
		`{"processes":[{"rssBytes":-9223372036854775808,"players":9223372036854775807}]}`,
		`{"processes":[{"labels":{"a":"b","a":"c"}}]}`,
		`{"seq":1,"seq":2}`,
		`{"seq":-1}`,
		`{"seq":18446744073709551615}`,
		`{"seq":18446744073709551616}`,
		`{"seq":-0}`,
		`{"machineId":"m","hardware":{"cpus":2,"cpus":3}}`,
		`{"ended":[{"id":"p","state":"crashed","exit":{"reason":"crashed","logTail":["x"]}}],"at":"2026-01-01T00:00:00.5+01:00"}`,
		`{"shutdownAt":"2026-01-01T00:00:00Z","startedAt":null,"state":"shutting_\u0064own"}`,
		`{"seq":1} {}`,
		`{"seq":1,"processes":[{"id":"p-1","labels":{"a\"b":"c\\","d":"\"}"},"address":"x\",\"y","state":"ready","players":3}]}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		r, err := decodeReport(body)
		if err != nil {
			return
		}
		defer r.release()
		got := api.Status{MachineID: r.MachineID, State: r.State, Seq: r.Seq, MaxProcesses: r.MaxProcesses,
			Ended: r.Ended, Hardware: r.Hardware, StartedAt: r.StartedAt, ShutdownAt: r.ShutdownAt, At: r.At}
		for i := range r.Processes.All() {
			p := &r.Processes.All()[i]
			if len(p.fixed) < 2 || p.fixed[0] != '{' || p.fixed[len(p.fixed)-1] != '}' {
				t.Fatalf("process %d: fixed %q", i, p.fixed)
			}
			fx, err := p.decodeFixed()
			if err != nil {
				return // refused before use: the report is refused whole
			}
			got.Processes = append(got.Processes, p.process(fx))
		}
		var want api.Status
		if err := rest.DecodeBytes(body, &want, false); err != nil {
			t.Fatalf("the lean decoder accepted what the strict one refuses (%v):\n%s", err, body)
		}
		normalize(&got)
		normalize(&want)
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("decoders disagree on\n%s\nlean:   %+v\nstrict: %+v", body, got, want)
		}
	})
}

// normalize makes the two decoders' outputs comparable: nil and empty
// are one on the wire, a zero time is null, and times compare as instants.
func normalize(st *api.Status) {
	if len(st.Processes) == 0 {
		st.Processes = nil
	}
	if len(st.Ended) == 0 {
		st.Ended = nil
	}
	if st.ShutdownAt != nil && st.ShutdownAt.IsZero() {
		st.ShutdownAt = nil
	}
	st.StartedAt, st.At = st.StartedAt.UTC(), st.At.UTC()
	if st.ShutdownAt != nil {
		t := st.ShutdownAt.UTC()
		st.ShutdownAt = &t
	}
	for i := range st.Processes {
		p := &st.Processes[i]
		p.CreatedAt = p.CreatedAt.UTC()
		for _, t := range []**time.Time{&p.ReadyAt, &p.LastHeartbeatAt, &p.EndedAt} {
			if *t != nil {
				if (*t).IsZero() {
					*t = nil
				} else {
					u := (*t).UTC()
					*t = &u
				}
			}
		}
	}
}
