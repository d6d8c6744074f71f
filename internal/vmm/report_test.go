package vmm

import (
	"fmt"
	"net/http/httptest"
	"strings"
	"testing"

	"dedi.dev/dedi/api"
)

// rawReport posts a status report body as is.
func (tv *testVMM) rawReport(t *testing.T, id, body string) (int, string) {
	t.Helper()
	r := httptest.NewRequest("POST", "/v1/machines/"+id+"/status", strings.NewReader(body))
	r.Header.Set("Authorization", "Bearer "+tv.prov.token(id))
	w := httptest.NewRecorder()
	tv.h.ServeHTTP(w, r)
	return w.Code, w.Body.String()
}

func (tv *testVMM) process(t *testing.T, id string) api.Process {
	t.Helper()
	var p api.Process
	_ = tv.doWait(func(s *state) {
		if q := s.processes[id]; q != nil {
			p = *q
		}
	})
	return p
}

func procJSON(id, state string, players int, labels string) string {
	return fmt.Sprintf(`{"id":%q,"state":%q,"pid":7,"players":%d,"command":["/g"],"params":{},"labels":%s,`+
		`"address":"127.0.0.1","ports":{"game":30000},"health":{"periodSeconds":2,"failureThreshold":3,"startTimeoutSeconds":60},`+
		`"createdAt":"2026-01-01T00:00:00Z","readyAt":null,"lastHeartbeatAt":"2026-01-01T00:00:0%dZ","endedAt":null,"exit":null}`,
		id, state, players, labels, players)
}

func reportJSON(seq int, procs ...string) string {
	return fmt.Sprintf(`{"seq":%d,"state":"partial","maxProcesses":4,"processes":[%s]}`, seq, strings.Join(procs, ","))
}

// The steady path moves players, heartbeats and state; a changed label
// (a game's Agones SetLabel) is seen too, though it is off that path.
func TestReportMovesProcessesAndSeesLabelChanges(t *testing.T) {
	tv := newTestVMM(t)
	id := bootOne(t, tv)
	for seq, c := range []struct {
		state   string
		players int
		labels  string
	}{
		{api.StateStarting, 0, `{"a":"1"}`},
		{api.StateReady, 2, `{"a":"1"}`},
		{api.StateReady, 5, `{"a":"1"}`},
		{api.StateAllocated, 6, `{"a":"2","b":"x"}`},
		{api.StateAllocated, 7, `{"a":"2","b":"x"}`},
	} {
		if code, body := tv.rawReport(t, id, reportJSON(seq+2, procJSON("p-1", c.state, c.players, c.labels))); code != 200 || !strings.Contains(body, `"applied":true`) {
			t.Fatalf("report %d: %d %s", seq, code, body)
		}
		p := tv.process(t, "p-1")
		if p.State != c.state || p.Players != c.players || p.Labels["a"] != strings.Split(c.labels, `"`)[3] || p.MachineID != id || p.Fleet != "f" {
			t.Fatalf("after report %d: %+v", seq, p)
		}
		if want := fmt.Sprintf("2026-01-01T00:00:0%dZ", c.players); p.LastHeartbeatAt == nil || p.LastHeartbeatAt.Format("2006-01-02T15:04:05Z") != want {
			t.Fatalf("after report %d: heartbeat %v, want %s", seq, p.LastHeartbeatAt, want)
		}
	}
	if p := tv.process(t, "p-1"); p.Labels["b"] != "x" || p.Ports["game"] != 30000 || len(p.Command) != 1 {
		t.Fatalf("fixed members: %+v", p)
	}
	// Every member of the process object is taken, including those added
	// after the report decoder was written (annotations, from Agones).
	withAll := strings.Replace(procJSON("p-1", api.StateAllocated, 7, `{}`), `"pid":7`,
		`"pid":7,"annotations":{"agones.dev/sdk-x":"y"},"sdk":"agones","instances":2,"memoryLimitBytes":1024,"rssBytes":512,"fleet":"f","machineId":"`+id+`"`, 1)
	if code, body := tv.rawReport(t, id, reportJSON(10, withAll)); code != 200 {
		t.Fatalf("report with every member: %d %s", code, body)
	}
	p := tv.process(t, "p-1")
	if p.Annotations["agones.dev/sdk-x"] != "y" || p.SDK != "agones" || p.Instances != 2 || p.MemoryLimitBytes != 1024 || p.RSSBytes != 512 {
		t.Fatalf("every member: %+v", p)
	}
}

// A report is taken whole or not at all: one bad process refuses it, and
// the machine and its known processes are as before.
func TestBadReportChangesNothing(t *testing.T) {
	tv := newTestVMM(t)
	id := bootOne(t, tv)
	if code, body := tv.rawReport(t, id, reportJSON(2, procJSON("p-1", api.StateReady, 1, `{}`))); code != 200 {
		t.Fatalf("first report: %d %s", code, body)
	}
	bad := []string{
		// a new process whose labels are not strings: found only when its fixed members are decoded
		reportJSON(3, procJSON("p-1", api.StateReady, 4, `{}`), procJSON("p-2", api.StateReady, 1, `{"a":1}`)),
		// a known process whose changed fixed members do not decode
		reportJSON(3, strings.Replace(procJSON("p-1", api.StateReady, 4, `{}`), `"ports":{"game":30000}`, `"ports":{"game":"x"}`, 1)),
		reportJSON(3, strings.Replace(procJSON("p-1", api.StateReady, 4, `{}`), `"pid":7`, `"pid":7,"Players":2`, 1)),
		reportJSON(3, strings.Replace(procJSON("p-1", api.StateReady, 4, `{}`), `"pid":7`, `"pid":7,"pid":8`, 1)),
		reportJSON(3, strings.Replace(procJSON("p-1", api.StateReady, 4, `{}`), `"pid":7`, `"pid":7,"extra":{}`, 1)),
		reportJSON(3, strings.Replace(procJSON("p-1", api.StateReady, 4, `{}`), `"players":4`, `"players":"4"`, 1)),
		reportJSON(3, procJSON("p-1", api.StateCrashed, 4, `{}`)),
		reportJSON(3, procJSON("p 1", api.StateReady, 4, `{}`)),
		reportJSON(3, strings.Replace(procJSON("p-1", api.StateReady, 4, `{}`), `"params":{}`, `"params":{},"params":{}`, 1)),
		reportJSON(3, procJSON("p-1", api.StateReady, 4, `{}`), procJSON("p-2", api.StateReady, 1, `{"a":"1","a":"2"}`)),
		strings.Replace(reportJSON(3, procJSON("p-1", api.StateReady, 4, `{}`)), `"seq":3`, `"seq":3,"seq":4`, 1),
		strings.Replace(reportJSON(3, procJSON("p-1", api.StateReady, 4, `{}`)), `"seq":3`, `"seq":3,"Seq":4`, 1),
		reportJSON(3, strings.Replace(procJSON("p-1", api.StateReady, 4, `{}`), `"pid":7`, `"pid":7.5`, 1)),
		reportJSON(3, procJSON("p-1", api.StateReady, 4, `{}`)) + `{}`,
		`{"seq":3,"state":"partial","processes":{}}`,
		`{"seq":3,"state":"partial","processes":[1]}`,
	}
	for _, body := range bad {
		code, ans := tv.rawReport(t, id, body)
		if code != 400 || !strings.Contains(ans, `"code":"invalid"`) {
			t.Errorf("%s: %d %s", body, code, ans)
		}
	}
	if m := tv.machine(t, id); m.Seq != 2 {
		t.Fatalf("a refused report moved the machine's seq to %d", m.Seq)
	}
	if p := tv.process(t, "p-1"); p.Players != 1 {
		t.Fatalf("a refused report moved p-1: %+v", p)
	}
	if p := tv.process(t, "p-2"); p.ID != "" {
		t.Fatalf("a refused report adopted p-2: %+v", p)
	}
	// Escaped member names are the same names.
	esc := strings.Replace(procJSON("p-1", api.StateReady, 3, `{}`), `"players"`, `"pl\u0061yers"`, 1)
	if code, ans := tv.rawReport(t, id, reportJSON(3, esc)); code != 200 || tv.process(t, "p-1").Players != 3 {
		t.Fatalf("escaped name: %d %s", code, ans)
	}
}

// Equal commands and label sets are shared between processes, and only
// equal ones: a value whose bytes could be joined another way is apart.
func TestInternerSharesOnlyEqualValues(t *testing.T) {
	var in interner
	a := api.Process{Command: []string{"/g", "--map", "x"}, Labels: map[string]string{"r": "eu", "t": "1"}}
	b := api.Process{Command: []string{"/g", "--map", "x"}, Labels: map[string]string{"t": "1", "r": "eu"}}
	c := api.Process{Command: []string{"/g", "--map\x00x"}, Labels: map[string]string{"r": "eu1:t", "": ""}}
	for _, p := range []*api.Process{&a, &b, &c} {
		in.process(p)
	}
	if &a.Command[0] != &b.Command[0] || fmt.Sprintf("%p", a.Labels) != fmt.Sprintf("%p", b.Labels) {
		t.Fatal("equal values are not shared")
	}
	if len(c.Command) != 2 || c.Command[1] != "--map\x00x" || c.Labels["r"] != "eu1:t" || len(c.Labels) != 2 {
		t.Fatalf("a different value was replaced: %q %v", c.Command, c.Labels)
	}
	if &c.Command[0] == &a.Command[0] || fmt.Sprintf("%p", c.Labels) == fmt.Sprintf("%p", a.Labels) {
		t.Fatal("different values are shared")
	}
	// Params: equal by their JSON, whatever the key order or value types.
	p1 := api.Process{Params: map[string]any{"mode": "ranked", "n": 2.0, "tags": []any{"a"}}}
	p2 := api.Process{Params: map[string]any{"tags": []any{"a"}, "n": 2.0, "mode": "ranked"}}
	p3 := api.Process{Params: map[string]any{"mode": "ranked", "n": "2", "tags": []any{"a"}}}
	for _, p := range []*api.Process{&p1, &p2, &p3} {
		in.process(p)
	}
	if fmt.Sprintf("%p", p1.Params) != fmt.Sprintf("%p", p2.Params) {
		t.Fatal("equal params are not shared")
	}
	if fmt.Sprintf("%p", p3.Params) == fmt.Sprintf("%p", p1.Params) || p3.Params["n"] != "2" {
		t.Fatalf("different params are shared: %v", p3.Params)
	}
}

// Numbers are read as the strict decoder reads them: a seq takes all of
// uint64 and nothing below 0, integers take no fraction or exponent.
func TestReportNumbers(t *testing.T) {
	for _, c := range []struct {
		body string
		ok   bool
		seq  uint64
	}{
		{`{"seq":18446744073709551615}`, true, 1<<64 - 1},
		{`{"seq":18446744073709551616}`, false, 0},
		{`{"seq":-1}`, false, 0},
		{`{"seq":1.0}`, false, 0},
		{`{"seq":7,"maxProcesses":-9223372036854775808}`, true, 7},
		{`{"seq":7,"maxProcesses":9223372036854775808}`, false, 0},
		{`{"seq":7,"processes":[{"pid":1e1}]}`, false, 0},
	} {
		r, err := decodeReport([]byte(c.body))
		if (err == nil) != c.ok {
			t.Errorf("%s: err %v, want ok %v", c.body, err, c.ok)
			continue
		}
		if err == nil {
			if r.Seq != c.seq {
				t.Errorf("%s: seq %d, want %d", c.body, r.Seq, c.seq)
			}
			r.release()
		}
	}
}

// Escapes inside names and values do not end a string early: the split of
// a process object walks over them.
func TestReportEscapes(t *testing.T) {
	body := `{"seq":1,"processes":[{"id":"p-1","labels":{"a\"b":"c\\","d":"\"}"},"address":"x\",\"y","state":"ready","players":3}]}`
	r, err := decodeReport([]byte(body))
	if err != nil {
		t.Fatal(err)
	}
	defer r.release()
	lp := r.Processes.All()[0]
	f, err := lp.decodeFixed()
	if err != nil || lp.Players != 3 || lp.State != api.StateReady || f.Labels["a\"b"] != `c\` || f.Labels["d"] != `"}` || f.Address != `x","y` {
		t.Fatalf("%+v %v %v", lp, f.Labels, err)
	}
}
