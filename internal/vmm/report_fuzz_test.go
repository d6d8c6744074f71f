package vmm

import (
	"testing"
)

// FuzzDecodeReport: the lean report decoder never panics or hangs, and
// every process it accepts has fixed members that are one JSON object.
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
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		r, err := decodeReport(body)
		if err != nil {
			return
		}
		defer r.release()
		for i := range r.Processes.All() {
			p := &r.Processes.All()[i]
			if len(p.fixed) < 2 || p.fixed[0] != '{' || p.fixed[len(p.fixed)-1] != '}' {
				t.Fatalf("process %d: fixed %q", i, p.fixed)
			}
			_, _ = p.decodeFixed()
		}
	})
}
