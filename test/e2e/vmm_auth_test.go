package e2e

// Who may call what on the VMM (API.md "Token kinds": the admin token for
// every endpoint but status reports, a machine token for its own machine's
// status reports only), and how the VMM answers bad input: always a
// problem+json with the right status and code, and never a change of state.
// The helpers authCall and checkProblem come from auth_test.go.

import (
	"bytes"
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"dedi.dev/dedi/api"
)

// vmmRoute is one VMM route; {fleet}, {machine} and {process} in path and
// body stand for real names filled in by vmmIDs.
type vmmRoute struct {
	method, path, body string
}

func (r vmmRoute) String() string { return r.method + " " + r.path }

// vmmIDs fills the placeholders of a vmmRoute.
type vmmIDs struct {
	fleet, machine, process, ended string
}

func (ids vmmIDs) fill(s string) string {
	return strings.NewReplacer("{fleet}", ids.fleet, "{machine}", ids.machine,
		"{process}", ids.process, "{ended}", ids.ended).Replace(s)
}

// The admin routes of API.md's VMM table. The bodies would succeed with
// the admin token, so a refusal that let the call through changes state.
var vmmAdminRoutes = []vmmRoute{
	{"GET", "/metrics", ""},
	{"POST", "/v1/fleets", `{"name": "intruder"}`},
	{"GET", "/v1/fleets", ""},
	{"GET", "/v1/fleets/{fleet}", ""},
	{"DELETE", "/v1/fleets/{fleet}", ""},
	{"POST", "/v1/machines", `{"fleet": "{fleet}"}`},
	{"GET", "/v1/machines", ""},
	{"GET", "/v1/machines/{machine}", ""},
	{"DELETE", "/v1/machines/{machine}", ""},
	{"POST", "/v1/processes", `{"fleet": "{fleet}"}`},
	{"GET", "/v1/processes", ""},
	{"GET", "/v1/processes/{process}", ""},
	{"DELETE", "/v1/processes/{process}", ""},
	{"GET", "/v1/processes/{process}/logs", ""},
	{"GET", "/v1/events", ""},
}

// forgedSeq is the seq of the reports sent with a token that has no right
// to them: were one applied, the machine's seq would show it.
const forgedSeq = 1 << 62

// forgedReport is a status report of machine id that, applied, would
// change the machine visibly (its maxProcesses, its hardware).
func forgedReport(id string) string {
	b, _ := json.Marshal(api.Status{MachineID: id, State: api.LoadFull, Seq: forgedSeq, MaxProcesses: 99,
		Processes: []api.Process{}, Hardware: api.Hardware{Hostname: "forged"}, At: time.Now().UTC()})
	return string(b)
}

func vmmStatusRoute(id string) vmmRoute {
	return vmmRoute{"POST", "/v1/machines/" + id + "/status", forgedReport(id)}
}

// vmmSnapshot is what GET /v1/fleets, /v1/machines and /v1/processes show,
// without the fields that the machines' live reports move.
func vmmSnapshot(t testing.TB, v *vmmProc) string {
	t.Helper()
	var fl api.List[api.Fleet]
	var ml api.List[api.Machine]
	var pl api.List[api.Process]
	for path, out := range map[string]any{"/v1/fleets": &fl, "/v1/machines": &ml, "/v1/processes": &pl} {
		if code, raw := call(t, "GET", v.url+path, v.token, nil, out); code != http.StatusOK {
			t.Fatalf("GET %s: %d %s", path, code, raw)
		}
	}
	for i := range ml.Items {
		m := &ml.Items[i]
		m.LastReportAt, m.Seq, m.Hardware = nil, 0, nil
	}
	for i := range pl.Items {
		p := &pl.Items[i]
		p.LastHeartbeatAt, p.Players, p.Instances, p.RSSBytes = nil, 0, 0, 0
	}
	b, err := json.MarshalIndent(struct {
		Fleets    []api.Fleet
		Machines  []api.Machine
		Processes []api.Process
	}{fl.Items, ml.Items, pl.Items}, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// localMachine is what the local provider records of a machine.
type localMachine struct {
	PID     int    `json:"pid"`
	LSPMURL string `json:"lspmUrl"`
}

func localMachineOf(t testing.TB, v *vmmProc, id string) localMachine {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(v.dataDir, "machines", "machines", id, "machine.json"))
	var lm localMachine
	if err == nil {
		err = json.Unmarshal(raw, &lm)
	}
	if err != nil || lm.PID <= 0 || lm.LSPMURL == "" {
		t.Fatalf("machine.json of %s: %v %s", id, err, raw)
	}
	return lm
}

// machineTokenOf reads the token the local provider gave a machine's LSPM
// from the LSPM's environment. The LSPM makes itself non-dumpable, so
// /proc/<pid>/environ is readable by root (CAP_SYS_PTRACE) only; the test
// runs as root.
func machineTokenOf(t testing.TB, v *vmmProc, id string) string {
	t.Helper()
	pid := localMachineOf(t, v, id).PID
	raw, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/environ")
	if err != nil {
		t.Fatalf("read the environment of machine %s's LSPM (pid %d): %v (needs root)", id, pid, err)
	}
	for _, kv := range bytes.Split(raw, []byte{0}) {
		if tok, ok := bytes.CutPrefix(kv, []byte(api.EnvMachineToken+"=")); ok && len(tok) > 0 {
			return string(tok)
		}
	}
	t.Fatalf("no %s in the environment of pid %d", api.EnvMachineToken, pid)
	return ""
}

// vmmMachine is GET /v1/machines/{id} with the admin token.
func vmmMachine(t testing.TB, v *vmmProc, id string) api.Machine {
	t.Helper()
	var m api.Machine
	if code, raw := call(t, "GET", v.url+"/v1/machines/"+id, v.token, nil, &m); code != http.StatusOK {
		t.Fatalf("machine %s: %d %s", id, code, raw)
	}
	return m
}

// headerCall is authCall with extra request headers.
func headerCall(t testing.TB, method, url, token, body string, header map[string]string) (int, http.Header, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Authorization", "Bearer "+token)
	for k, val := range header {
		req.Header.Set(k, val)
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	var buf bytes.Buffer
	_, _ = buf.ReadFrom(resp.Body)
	return resp.StatusCode, resp.Header, buf.Bytes()
}

func TestVMMAuthMatrix(t *testing.T) {
	t.Parallel()
	v := startVMM(t)
	// One process per machine: two started processes make two machines,
	// each with its own token. Room for a third, so a refused start or
	// machine creation that went through would show.
	v.fleet(t, api.Fleet{Name: "f", ProcessesPerMachine: 1, Scaling: api.Scaling{MaxMachines: 3}})
	pa := v.start1(t, "f", true)
	pb := v.start1(t, "f", true)
	if pa.MachineID == pb.MachineID {
		t.Fatalf("both processes on %s with one process per machine", pa.MachineID)
	}
	tokA, tokB := machineTokenOf(t, v, pa.MachineID), machineTokenOf(t, v, pb.MachineID)
	if tokA == tokB || tokA == v.token {
		t.Fatal("machines share a token")
	}
	ids := vmmIDs{fleet: "f", machine: pa.MachineID, process: pa.ID}
	statusA, statusB := vmmStatusRoute(pa.MachineID), vmmStatusRoute(pb.MachineID)
	all := append(append([]vmmRoute{}, vmmAdminRoutes...), statusA, statusB)
	before := vmmSnapshot(t, v)

	t.Run("no token", func(t *testing.T) {
		for _, r := range all {
			code, h, raw := authCall(t, r.method, v.url+ids.fill(r.path), "", ids.fill(r.body))
			checkProblem(t, r.String(), code, h, raw, http.StatusUnauthorized, api.CodeUnauthorized)
			if wa := h.Get("WWW-Authenticate"); !strings.HasPrefix(wa, "Bearer") {
				t.Fatalf("%s: WWW-Authenticate %q, want Bearer...", r, wa)
			}
		}
	})
	t.Run("wrong token", func(t *testing.T) {
		for _, authz := range []string{
			bearerHeader("not-the-token-0123456789abcdef"),
			bearerHeader(v.token + "x"),
			bearerHeader(v.token[:len(v.token)-1]),
			bearerHeader(tokA + "x"),
			bearerHeader(tokA[:len(tokA)-1]),
			bearerHeader(strings.ToUpper(tokA)),
			"Basic " + v.token,
			"Bearer",
			"Bearer ",
			v.token,
			tokA,
		} {
			for _, r := range all {
				code, h, raw := authCall(t, r.method, v.url+ids.fill(r.path), authz, ids.fill(r.body))
				checkProblem(t, r.String()+" with "+authz, code, h, raw, http.StatusUnauthorized, api.CodeUnauthorized)
				if wa := h.Get("WWW-Authenticate"); !strings.HasPrefix(wa, "Bearer") {
					t.Fatalf("%s: WWW-Authenticate %q, want Bearer...", r, wa)
				}
			}
		}
	})
	t.Run("healthz needs no token", func(t *testing.T) {
		for _, authz := range []string{"", bearerHeader("wrong-token-0123456789")} {
			if code, _, raw := authCall(t, "GET", v.url+"/healthz", authz, ""); code != http.StatusOK {
				t.Fatalf("healthz with %q: %d %s", authz, code, raw)
			}
		}
	})
	t.Run("machine token on admin routes", func(t *testing.T) {
		for _, tok := range []string{tokA, tokB} {
			for _, r := range vmmAdminRoutes {
				code, h, raw := authCall(t, r.method, v.url+ids.fill(r.path), bearerHeader(tok), ids.fill(r.body))
				checkProblem(t, r.String(), code, h, raw, http.StatusForbidden, api.CodeForbidden)
			}
		}
	})
	t.Run("admin token on status reports", func(t *testing.T) {
		for _, r := range []vmmRoute{statusA, statusB, vmmStatusRoute("m-nope")} {
			code, h, raw := authCall(t, r.method, v.url+r.path, bearerHeader(v.token), r.body)
			checkProblem(t, r.String(), code, h, raw, http.StatusForbidden, api.CodeForbidden)
		}
	})
	t.Run("machine token on another machine's status", func(t *testing.T) {
		for _, c := range []struct {
			tok string
			r   vmmRoute
		}{{tokA, statusB}, {tokB, statusA}, {tokA, vmmStatusRoute("m-nope")}} {
			code, h, raw := authCall(t, c.r.method, v.url+c.r.path, bearerHeader(c.tok), c.r.body)
			checkProblem(t, c.r.String(), code, h, raw, http.StatusForbidden, api.CodeForbidden)
		}
	})
	t.Run("refused calls changed nothing", func(t *testing.T) {
		if after := vmmSnapshot(t, v); after != before {
			t.Fatalf("state changed:\nbefore %s\nafter %s", before, after)
		}
		for _, id := range []string{pa.MachineID, pb.MachineID} {
			if m := vmmMachine(t, v, id); m.Seq >= forgedSeq || (m.Hardware != nil && m.Hardware.Hostname == "forged") {
				t.Fatalf("a forged report was applied to %s: %+v", id, m)
			}
		}
	})
	// The positive controls: the admin token works on the admin routes
	// that change nothing, the machine's own token on its status route.
	t.Run("admin token on reading routes", func(t *testing.T) {
		for _, r := range vmmAdminRoutes {
			if r.method != "GET" || r.path == "/v1/events" {
				continue
			}
			code, _, raw := authCall(t, r.method, v.url+ids.fill(r.path), bearerHeader(v.token), "")
			if code != http.StatusOK {
				t.Fatalf("%s: %d %s", r, code, raw)
			}
		}
	})
	t.Run("machine token on its own status", func(t *testing.T) {
		lm := localMachineOf(t, v, pa.MachineID)
		var st api.Status
		if code, raw := call(t, "GET", lm.LSPMURL+"/v1/status", tokA, nil, &st); code != http.StatusOK {
			t.Fatalf("LSPM status: %d %s", code, raw)
		}
		// Far above the last applied seq: the LSPM's own next reports are
		// then stale, and it jumps ahead by itself.
		st.Seq = vmmMachine(t, v, pa.MachineID).Seq + 1000
		for _, c := range []struct {
			name string
			seq  uint64
			want bool
		}{
			{"seq above the last", st.Seq, true},
			{"the same seq again", st.Seq, false},
			{"seq below the last", st.Seq - 1, false},
			{"seq 0", 0, false},
		} {
			st.Seq = c.seq
			var ans api.ReportAnswer
			code, raw := call(t, "POST", v.url+"/v1/machines/"+pa.MachineID+"/status", tokA, st, &ans)
			if code != http.StatusOK || ans.Applied != c.want {
				t.Fatalf("%s: %d %s, want 200 {\"applied\": %v}", c.name, code, raw, c.want)
			}
			if got := string(bytes.TrimSpace(raw)); got != `{"applied":`+strconv.FormatBool(c.want)+`}` {
				t.Fatalf("%s: answer %s", c.name, got)
			}
		}
		// The machine keeps reporting after the jump, and stays ready.
		after := vmmMachine(t, v, pa.MachineID).LastReportAt
		eventually(t, 10*time.Second, "a report of the LSPM applied again", func() bool {
			m := vmmMachine(t, v, pa.MachineID)
			return m.LastReportAt != nil && after != nil && m.LastReportAt.After(*after)
		})
		if p := v.process(t, pa.ID); p.State != api.StateReady {
			t.Fatalf("process %s after the reports", p.State)
		}
	})
}

// vmmBadCase is one request the VMM must refuse without changing anything.
type vmmBadCase struct {
	name      string
	method    string
	path      string // with vmmIDs placeholders
	body      string
	asMachine bool // sent with the machine's token, not the admin token
	header    map[string]string
	status    int
	code      string
}

func vmmInvalid(name, method, path, body string) vmmBadCase {
	return vmmBadCase{name: name, method: method, path: path, body: body, status: http.StatusBadRequest, code: api.CodeInvalid}
}

// overMiB is a JSON object of the given fields just over the 1 MiB limit.
func overMiB(fields string) string {
	return `{` + fields + `, "pad": "` + strings.Repeat("a", 1<<20) + `"}`
}

func vmmBadInputs() []vmmBadCase {
	var cases []vmmBadCase
	// POST /v1/fleets: every body names a fleet of its own, so one wrongly
	// accepted does not turn the next case into a 409.
	n := 0
	fleet := func(name, fields string) {
		n++
		body := `{"name": "bad-` + strconv.Itoa(n) + `"`
		if fields != "" {
			body += ", " + fields
		}
		cases = append(cases, vmmInvalid("fleet "+name, "POST", "/v1/fleets", body+"}"))
	}
	fleetBody := func(name, body string) {
		cases = append(cases, vmmInvalid("fleet "+name, "POST", "/v1/fleets", body))
	}
	fleetBody("empty body", "")
	fleetBody("broken JSON", `{"name": "x",`)
	fleetBody("not JSON", `name=x`)
	fleetBody("an array", `[{"name": "x"}]`)
	fleetBody("a string", `"x"`)
	fleetBody("null", `null`)
	fleetBody("trailing garbage", `{"name": "x"} x`)
	fleetBody("two objects", `{"name": "x"}{"name": "y"}`)
	fleetBody("byte order mark", "\ufeff{\"name\": \"x\"}")
	fleet("unknown field", `"nope": 1`)
	fleet("field name in another case", `"ProcessesPerMachine": 2`)
	fleetBody("name in upper case", `{"Name": "x"}`)
	fleetBody("name in capitals", `{"NAME": "x"}`)
	fleet("nested field in another case", `"scaling": {"MaxMachines": 2}`)
	fleet("health field in another case", `"health": {"periodseconds": 2}`)
	fleet("unknown nested field", `"scaling": {"maxMachine": 2}`)
	// Wrong types.
	fleetBody("name a number", `{"name": 5}`)
	fleet("command a string", `"command": "/bin/sh"`)
	fleet("command of numbers", `"command": [1]`)
	fleet("processesPerMachine a string", `"processesPerMachine": "4"`)
	fleet("processesPerMachine a fraction", `"processesPerMachine": 1.5`)
	fleet("processesPerMachine overflowing", `"processesPerMachine": 1e30`)
	fleet("ports a string", `"ports": "game"`)
	fleet("health an array", `"health": []`)
	fleet("health period a string", `"health": {"periodSeconds": "2"}`)
	fleet("scaling a number", `"scaling": 3`)
	fleet("maxMachines a string", `"scaling": {"maxMachines": "2"}`)
	fleet("placement a number", `"placement": 1`)
	fleet("sdk a bool", `"sdk": true`)
	fleet("image an array", `"image": []`)
	fleet("createdAt not a time", `"createdAt": "yesterday"`)
	// Validation.
	for what, name := range map[string]string{
		"empty": "", "upper case": "Demo", "underscore": "a_b", "leading dash": "-a", "trailing dash": "a-",
		"dot": "a.b", "space": "a b", "slash": "a/b", "non-ASCII": "dé", "64 characters": strings.Repeat("a", 64),
	} {
		fleetBody("name "+what, `{"name": "`+name+`"}`)
	}
	fleetBody("without name", `{}`)
	fleet("placement unknown", `"placement": "random"`)
	fleet("placement in capitals", `"placement": "PACKED"`)
	fleet("sdk unknown", `"sdk": "steam"`)
	fleet("provider not configured", `"provider": "aws"`)
	fleet("negative processesPerMachine", `"processesPerMachine": -1`)
	fleet("processesPerMachine over 1000", `"processesPerMachine": 1001`)
	fleet("negative minMachines", `"scaling": {"minMachines": -1}`)
	fleet("negative maxMachines", `"scaling": {"maxMachines": -1}`)
	fleet("min over max", `"scaling": {"minMachines": 3, "maxMachines": 2}`)
	fleet("min over the default max", `"scaling": {"minMachines": 11}`)
	fleet("maxMachines over 10000", `"scaling": {"maxMachines": 10001}`)
	fleet("negative idleShutdownSeconds", `"scaling": {"idleShutdownSeconds": -1}`)
	fleet("health negative period", `"health": {"periodSeconds": -1}`)
	fleet("health period too small", `"health": {"periodSeconds": 0.001}`)
	fleet("health period over an hour", `"health": {"periodSeconds": 3601}`)
	fleet("health negative threshold", `"health": {"failureThreshold": -1}`)
	fleet("health threshold over 1000", `"health": {"failureThreshold": 1001}`)
	fleet("health negative start timeout", `"health": {"startTimeoutSeconds": -1}`)
	fleet("health start timeout over a day", `"health": {"startTimeoutSeconds": 86401}`)
	fleet("empty executable", `"command": [""]`)
	// What every LSPM refuses in a spawn (lspm's validateSpawn) makes a
	// fleet that can never start a process.
	fleet("NUL in a command argument", `"command": ["/bin/true", "a\u0000b"]`)
	fleet("port name in upper case", `"ports": ["Game"]`)
	fleet("port name empty", `"ports": [""]`)
	fleet("port named twice", `"ports": ["game", "game"]`)
	fleet("17 ports", `"ports": [`+portNameList(17)+`]`)
	// The VMM turns it into a time.Duration, which it overflows.
	fleet("idleShutdownSeconds beyond a duration", `"scaling": {"idleShutdownSeconds": 1e10}`)
	fleet("state set", `"state": "active"`)
	fleet("createdAt set", `"createdAt": "2024-01-01T00:00:00Z"`)
	cases = append(cases,
		vmmBadCase{name: "fleet over 1 MiB", method: "POST", path: "/v1/fleets", body: overMiB(`"name": "big"`),
			status: http.StatusRequestEntityTooLarge, code: api.CodeTooLarge},
		vmmBadCase{name: "fleet that exists", method: "POST", path: "/v1/fleets", body: `{"name": "{fleet}"}`,
			status: http.StatusConflict, code: api.CodeExists},
		vmmBadCase{name: "fleet that exists, other settings", method: "POST", path: "/v1/fleets",
			body: `{"name": "{fleet}", "processesPerMachine": 7, "placement": "distributed"}`, status: http.StatusConflict, code: api.CodeExists},
	)

	// POST /v1/machines.
	for name, body := range map[string]string{
		"empty body": "", "broken JSON": `{"fleet": `, "an array": `["{fleet}"]`, "trailing garbage": `{"fleet": "{fleet}"} x`,
		"two objects": `{"fleet": "{fleet}"}{}`, "unknown field": `{"fleet": "{fleet}", "count": 2}`,
		"field name in another case": `{"Fleet": "{fleet}"}`, "fleet a number": `{"fleet": 1}`,
		"fleet an object": `{"fleet": {"name": "{fleet}"}}`,
		// API.md: missing required fields are 400.
		"without fleet": `{}`,
	} {
		cases = append(cases, vmmInvalid("create machine "+name, "POST", "/v1/machines", body))
	}
	cases = append(cases, vmmBadCase{name: "create machine over 1 MiB", method: "POST", path: "/v1/machines",
		body: overMiB(`"fleet": "{fleet}"`), status: http.StatusRequestEntityTooLarge, code: api.CodeTooLarge})

	// POST /v1/processes: the body, then the query (with a body that
	// would start a process).
	for name, body := range map[string]string{
		"empty body": "", "broken JSON": `{"fleet": "{fleet}"`, "an array": `[]`, "trailing garbage": `{"fleet": "{fleet}"} x`,
		"two objects": `{"fleet": "{fleet}"}{"fleet": "{fleet}"}`, "unknown field": `{"fleet": "{fleet}", "command": ["/bin/sh"]}`,
		"field name in another case": `{"FLEET": "{fleet}"}`, "nested in another case": `{"fleet": "{fleet}", "Params": {}}`,
		"fleet a number": `{"fleet": 1}`, "params an array": `{"fleet": "{fleet}", "params": []}`,
		"params a string": `{"fleet": "{fleet}", "params": "x"}`, "labels value a number": `{"fleet": "{fleet}", "labels": {"a": 1}}`,
		"labels an array": `{"fleet": "{fleet}", "labels": ["a"]}`, "without fleet": `{"params": {}}`, "empty fleet": `{"fleet": ""}`,
		"label with an empty name": `{"fleet": "{fleet}", "labels": {"": "x"}}`,
	} {
		cases = append(cases, vmmInvalid("start "+name, "POST", "/v1/processes", body))
	}
	for _, q := range []string{"wait=yes", "wait=READY", "wait=true", "wait=ready&timeout=abc", "timeout=abc", "timeout=10",
		"timeout=0s", "timeout=-1s", "timeout=11m", "wait=ready&timeout=1h"} {
		cases = append(cases, vmmInvalid("start ?"+q, "POST", "/v1/processes?"+q, `{"fleet": "{fleet}"}`))
	}
	cases = append(cases,
		vmmBadCase{name: "start over 1 MiB", method: "POST", path: "/v1/processes", body: overMiB(`"fleet": "{fleet}"`),
			status: http.StatusRequestEntityTooLarge, code: api.CodeTooLarge},
		vmmBadCase{name: "start with an unknown fleet", method: "POST", path: "/v1/processes", body: `{"fleet": "nope"}`,
			status: http.StatusNotFound, code: api.CodeNotFound},
		vmmBadCase{name: "start with an unknown fleet, waiting", method: "POST", path: "/v1/processes?wait=ready&timeout=5s",
			body: `{"fleet": "nope"}`, status: http.StatusNotFound, code: api.CodeNotFound},
		vmmBadCase{name: "create machine of an unknown fleet", method: "POST", path: "/v1/machines", body: `{"fleet": "nope"}`,
			status: http.StatusNotFound, code: api.CodeNotFound},
	)

	// POST /v1/machines/{id}/status with the machine's own token.
	status := func(name, body string) {
		cases = append(cases, vmmBadCase{name: "status " + name, method: "POST", path: "/v1/machines/{machine}/status",
			body: body, asMachine: true, status: http.StatusBadRequest, code: api.CodeInvalid})
	}
	status("empty body", "")
	status("broken JSON", `{"seq": `)
	status("an array", `[]`)
	status("trailing garbage", `{"seq": 0} x`)
	status("two objects", `{"seq": 0}{"seq": 0}`)
	status("unknown field", `{"seq": 0, "load": "full"}`)
	status("field name in another case", `{"Seq": 0}`)
	status("nested field in another case", `{"seq": 0, "hardware": {"CPUs": 1}}`)
	status("process field in another case", `{"seq": 0, "processes": [{"ID": "p-x"}]}`)
	status("seq a string", `{"seq": "1"}`)
	status("seq negative", `{"seq": -1}`)
	status("seq a fraction", `{"seq": 1.5}`)
	status("seq overflowing", `{"seq": 1e30}`)
	status("processes an object", `{"seq": 0, "processes": {}}`)
	status("process a string", `{"seq": 0, "processes": ["p-x"]}`)
	status("at not a time", `{"seq": 0, "at": "now"}`)
	status("of another machine", `{"machineId": "m-other", "seq": 0}`)
	// Values outside the contract: a report's state is one of API.md's
	// load states, and every process has an id. Seq 0 is never applied,
	// so a VMM without these checks answers {"applied": false}.
	status("load state not in the contract", `{"seq": 0, "state": "on-fire"}`)
	status("process without id", `{"seq": 0, "processes": [{"state": "ready"}]}`)
	cases = append(cases, vmmBadCase{name: "status over 1 MiB", method: "POST", path: "/v1/machines/{machine}/status",
		body: overMiB(`"seq": 0`), asMachine: true, status: http.StatusRequestEntityTooLarge, code: api.CodeTooLarge})

	// Query parameters.
	for _, q := range []string{"state=bogus", "state=READY", "state=running", "state=empty"} {
		cases = append(cases, vmmInvalid("machines ?"+q, "GET", "/v1/machines?"+q, ""))
	}
	for _, q := range []string{"state=bogus", "state=Ready", "state=provisioning", "fleet={fleet}&state=dead"} {
		cases = append(cases, vmmInvalid("processes ?"+q, "GET", "/v1/processes?"+q, ""))
	}
	for _, q := range []string{"tail=-1", "tail=ten", "tail=1.5", "tail=1000001", "tail=99999999999999999999",
		"follow=yes", "follow=2", "tail=5&follow=maybe"} {
		cases = append(cases, vmmInvalid("logs ?"+q, "GET", "/v1/processes/{process}/logs?"+q, ""))
	}
	for _, q := range []string{"grace=abc", "grace=10", "grace=-1s", "grace=2h"} {
		cases = append(cases, vmmInvalid("stop ?"+q, "DELETE", "/v1/processes/{process}?"+q, ""))
	}
	// The same on a process that has ended: the query is still wrong.
	cases = append(cases, vmmInvalid("stop an ended process ?grace=abc", "DELETE", "/v1/processes/{ended}?grace=abc", ""))
	for _, q := range []string{"after=abc", "after=-1", "after=1.5", "after=99999999999999999999"} {
		cases = append(cases, vmmInvalid("events ?"+q, "GET", "/v1/events?"+q, ""))
	}
	for _, id := range []string{"abc", "-5"} {
		c := vmmInvalid("events Last-Event-ID "+id, "GET", "/v1/events", "")
		c.header = map[string]string{"Last-Event-ID": id}
		cases = append(cases, c)
	}

	// Unknown fleets, machines and processes.
	for _, r := range []vmmRoute{
		{"GET", "/v1/fleets/nope", ""},
		{"DELETE", "/v1/fleets/nope", ""},
		{"GET", "/v1/machines/m-nope", ""},
		{"DELETE", "/v1/machines/m-nope", ""},
		{"GET", "/v1/processes/p-nope", ""},
		{"DELETE", "/v1/processes/p-nope", ""},
		{"GET", "/v1/processes/p-nope/logs", ""},
		{"GET", "/v1/processes/p-nope/logs?tail=5", ""},
		{"DELETE", "/v1/processes/p-nope?grace=1s", ""},
	} {
		cases = append(cases, vmmBadCase{name: "unknown " + r.String(), method: r.method, path: r.path,
			status: http.StatusNotFound, code: api.CodeNotFound})
	}
	// Unknown paths, among them the LSPM's routes and untidy paths.
	for _, r := range []vmmRoute{
		{"GET", "/", ""},
		{"GET", "/v1", ""},
		{"GET", "/v1/", ""},
		{"GET", "/v2/fleets", ""},
		{"GET", "/v1/fleet", ""},
		{"GET", "/v1/fleets/", ""},
		{"GET", "/v1//fleets", ""},
		{"GET", "/v1/./fleets", ""},
		{"GET", "/v1/fleets/{fleet}/x", ""},
		{"GET", "/v1/fleets/{fleet}/../{fleet}", ""},
		{"GET", "/v1/machines/{machine}/x", ""},
		{"POST", "/v1/machines/{machine}/status/x", ""},
		{"GET", "/v1/processes/{process}/logs/x", ""},
		{"POST", "/v1/processes/{process}/ready", ""},
		{"POST", "/v1/processes/{process}/heartbeat", ""},
		{"GET", "/v1/status", ""},
		{"POST", "/v1/shutdown", ""},
		{"GET", "/metrics/x", ""},
		{"GET", "/healthz/", ""},
	} {
		cases = append(cases, vmmBadCase{name: "unknown path " + r.String(), method: r.method, path: r.path,
			status: http.StatusNotFound, code: api.CodeNotFound})
	}
	// Wrong methods on known paths.
	for _, r := range []vmmRoute{
		{"POST", "/healthz", ""},
		{"DELETE", "/healthz", ""},
		{"POST", "/metrics", ""},
		{"PUT", "/v1/fleets", `{"name": "x"}`},
		{"DELETE", "/v1/fleets", ""},
		{"PUT", "/v1/fleets/{fleet}", `{"name": "{fleet}"}`},
		{"PATCH", "/v1/fleets/{fleet}", `{}`},
		{"POST", "/v1/fleets/{fleet}", `{}`},
		{"PUT", "/v1/machines", ""},
		{"DELETE", "/v1/machines", ""},
		{"POST", "/v1/machines/{machine}", `{}`},
		{"PATCH", "/v1/machines/{machine}", `{}`},
		{"GET", "/v1/machines/{machine}/status", ""},
		{"PUT", "/v1/machines/{machine}/status", `{}`},
		{"DELETE", "/v1/processes", ""},
		{"PUT", "/v1/processes/{process}", `{}`},
		{"POST", "/v1/processes/{process}", `{}`},
		{"POST", "/v1/processes/{process}/logs", ""},
		{"DELETE", "/v1/processes/{process}/logs", ""},
		{"POST", "/v1/events", ""},
		{"DELETE", "/v1/events", ""},
	} {
		cases = append(cases, vmmBadCase{name: "wrong method " + r.String(), method: r.method, path: r.path, body: r.body,
			status: http.StatusMethodNotAllowed, code: api.CodeMethodNotAllowed})
	}
	return cases
}

func TestVMMBadInput(t *testing.T) {
	t.Parallel()
	v := startVMM(t)
	v.fleet(t, api.Fleet{Name: "f", ProcessesPerMachine: 4, Scaling: api.Scaling{MaxMachines: 2}})
	p := v.start1(t, "f", true)
	ended := v.start1(t, "f", true)
	if code, raw := call(t, "DELETE", v.url+"/v1/processes/"+ended.ID+"?grace=5s", v.token, nil, nil); code != http.StatusAccepted {
		t.Fatalf("stop: %d %s", code, raw)
	}
	eventually(t, 10*time.Second, "the stopped process ended", func() bool { return api.IsTerminal(v.process(t, ended.ID).State) })
	tok := machineTokenOf(t, v, p.MachineID)
	ids := vmmIDs{fleet: "f", machine: p.MachineID, process: p.ID, ended: ended.ID}
	first := vmmSnapshot(t, v)
	for _, c := range vmmBadInputs() {
		t.Run(c.name, func(t *testing.T) {
			token := v.token
			if c.asMachine {
				token = tok
			}
			path, body := ids.fill(c.path), ids.fill(c.body)
			before := vmmSnapshot(t, v)
			code, h, raw := headerCall(t, c.method, v.url+path, token, body, c.header)
			if len(raw) > 400 {
				raw = append(raw[:400:400], "..."...)
			}
			checkProblem(t, c.method+" "+path, code, h, raw, c.status, c.code)
			if code == http.StatusMethodNotAllowed && h.Get("Allow") == "" {
				t.Errorf("405 without an Allow header")
			}
			if after := vmmSnapshot(t, v); after != before {
				t.Fatalf("state changed:\nbefore %s\nafter %s", before, after)
			}
		})
	}
	if last := vmmSnapshot(t, v); last != first {
		t.Fatalf("state changed:\nbefore %s\nafter %s", first, last)
	}
	if got := v.process(t, p.ID); got.State != api.StateReady {
		t.Fatalf("the process is %s after the bad requests", got.State)
	}
}

// A start on a fleet at maxMachines whose machines are all full is 503
// no_capacity with Retry-After, as is a machine creation there.
func TestVMMNoCapacity(t *testing.T) {
	t.Parallel()
	v := startVMM(t)
	v.fleet(t, api.Fleet{Name: "one", ProcessesPerMachine: 1, Scaling: api.Scaling{MaxMachines: 1}})
	p := v.start1(t, "one", true)
	before := vmmSnapshot(t, v)
	for _, c := range []struct{ path, body string }{
		{"/v1/processes", `{"fleet": "one"}`},
		{"/v1/processes?wait=ready&timeout=5s", `{"fleet": "one"}`},
		{"/v1/machines", `{"fleet": "one"}`},
	} {
		code, h, raw := authCall(t, "POST", v.url+c.path, bearerHeader(v.token), c.body)
		checkProblem(t, "POST "+c.path, code, h, raw, http.StatusServiceUnavailable, api.CodeNoCapacity)
		if ra, err := strconv.Atoi(h.Get("Retry-After")); err != nil || ra < 1 {
			t.Fatalf("POST %s: Retry-After %q, want whole seconds >= 1", c.path, h.Get("Retry-After"))
		}
	}
	if after := vmmSnapshot(t, v); after != before {
		t.Fatalf("state changed:\nbefore %s\nafter %s", before, after)
	}
	if got := v.process(t, p.ID); got.State != api.StateReady {
		t.Fatalf("the process is %s", got.State)
	}
}
