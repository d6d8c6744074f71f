package api

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"
)

const testToken = "admin-secret-token"

// seen is one request as the fake VMM received it.
type seen struct {
	Method, Path, RawQuery, Auth, ContentType, Accept, Body string
	Query                                                   url.Values
}

// fakeVMM answers every request with status and body and records it.
type fakeVMM struct {
	status      int
	body        string
	contentType string

	mu   sync.Mutex
	reqs []seen
}

func (f *fakeVMM) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b, _ := io.ReadAll(r.Body)
	f.mu.Lock()
	f.reqs = append(f.reqs, seen{
		Method: r.Method, Path: r.URL.EscapedPath(), RawQuery: r.URL.RawQuery, Query: r.URL.Query(),
		Auth: r.Header.Get("Authorization"), ContentType: r.Header.Get("Content-Type"),
		Accept: r.Header.Get("Accept"), Body: string(b),
	})
	f.mu.Unlock()
	ct := f.contentType
	if ct == "" {
		ct = "application/json"
	}
	w.Header().Set("Content-Type", ct)
	w.WriteHeader(f.status)
	io.WriteString(w, f.body)
}

func (f *fakeVMM) last(t *testing.T) seen {
	t.Helper()
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.reqs) != 1 {
		t.Fatalf("fake VMM got %d requests, want 1", len(f.reqs))
	}
	return f.reqs[0]
}

func newFake(t *testing.T, status int, body string) (*fakeVMM, *Client) {
	t.Helper()
	f := &fakeVMM{status: status, body: body}
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	return f, NewClient(srv.URL+"/", testToken, srv.Client())
}

func TestClientRequests(t *testing.T) {
	ctx := context.Background()
	const fleetJSON = `{"name":"demo","provider":"local","placement":"packed","scaling":{"minMachines":0,"maxMachines":10}}`
	const machineJSON = `{"id":"m-1","fleet":"demo","state":"provisioning"}`
	const processJSON = `{"id":"p-1","fleet":"demo","machineId":"m-1","state":"ready","ports":{"game":30001}}`
	tests := []struct {
		name      string
		status    int
		answer    string
		call      func(c *Client) (any, error)
		method    string
		path      string
		query     url.Values
		body      string // JSON the request must carry; "" for none
		want      any
		wantEmpty bool // the call returns nothing to compare
	}{
		{
			name: "create fleet", status: 201, answer: fleetJSON,
			call: func(c *Client) (any, error) {
				return c.CreateFleet(ctx, Fleet{Name: "demo", Provider: "local", Placement: PlacementPacked, Scaling: Scaling{MaxMachines: 10}})
			},
			method: "POST", path: "/v1/fleets",
			body: `{"name":"demo","provider":"local","image":"","command":null,"processesPerMachine":0,"ports":null,"health":{},"scaling":{"minMachines":0,"maxMachines":10,"idleShutdownSeconds":0},"placement":"packed","sdk":"","createdAt":"0001-01-01T00:00:00Z"}`,
			want: Fleet{Name: "demo", Provider: "local", Placement: "packed", Scaling: Scaling{MaxMachines: 10}},
		},
		{
			name: "list fleets", status: 200, answer: `{"items":[` + fleetJSON + `,{"name":"b"}]}`,
			call:   func(c *Client) (any, error) { return c.ListFleets(ctx) },
			method: "GET", path: "/v1/fleets",
			want: []Fleet{{Name: "demo", Provider: "local", Placement: "packed", Scaling: Scaling{MaxMachines: 10}}, {Name: "b"}},
		},
		{
			name: "get fleet escapes the name", status: 200, answer: fleetJSON,
			call:   func(c *Client) (any, error) { return c.GetFleet(ctx, "de mo/1?") },
			method: "GET", path: "/v1/fleets/de%20mo%2F1%3F",
			want: Fleet{Name: "demo", Provider: "local", Placement: "packed", Scaling: Scaling{MaxMachines: 10}},
		},
		{
			name: "delete fleet", status: 202, answer: `{"name":"demo","state":"deleting"}`,
			call:   func(c *Client) (any, error) { return nil, c.DeleteFleet(ctx, "demo") },
			method: "DELETE", path: "/v1/fleets/demo", wantEmpty: true,
		},
		{
			name: "create machine", status: 202, answer: machineJSON,
			call:   func(c *Client) (any, error) { return c.CreateMachine(ctx, "demo") },
			method: "POST", path: "/v1/machines", body: `{"fleet":"demo"}`,
			want: Machine{ID: "m-1", Fleet: "demo", State: "provisioning"},
		},
		{
			name: "list machines with filters", status: 200, answer: `{"items":[` + machineJSON + `]}`,
			call:   func(c *Client) (any, error) { return c.ListMachines(ctx, "a&b c", "ready") },
			method: "GET", path: "/v1/machines", query: url.Values{"fleet": {"a&b c"}, "state": {"ready"}},
			want: []Machine{{ID: "m-1", Fleet: "demo", State: "provisioning"}},
		},
		{
			name: "list machines without filters", status: 200, answer: `{"items":[]}`,
			call:   func(c *Client) (any, error) { return c.ListMachines(ctx, "", "") },
			method: "GET", path: "/v1/machines",
			want: []Machine{},
		},
		{
			name: "get machine", status: 200, answer: machineJSON,
			call:   func(c *Client) (any, error) { return c.GetMachine(ctx, "m-1") },
			method: "GET", path: "/v1/machines/m-1",
			want: Machine{ID: "m-1", Fleet: "demo", State: "provisioning"},
		},
		{
			name: "delete machine", status: 202, answer: "",
			call:   func(c *Client) (any, error) { return nil, c.DeleteMachine(ctx, "m-1") },
			method: "DELETE", path: "/v1/machines/m-1", wantEmpty: true,
		},
		{
			name: "start process", status: 201, answer: processJSON,
			call: func(c *Client) (any, error) {
				return c.StartProcess(ctx, StartRequest{Fleet: "demo", Params: map[string]any{"mode": "ranked"}, Labels: map[string]string{"region": "eu"}}, false, time.Minute)
			},
			method: "POST", path: "/v1/processes",
			body: `{"fleet":"demo","params":{"mode":"ranked"},"labels":{"region":"eu"}}`,
			want: Process{ID: "p-1", Fleet: "demo", MachineID: "m-1", State: "ready", Ports: map[string]int{"game": 30001}},
		},
		{
			name: "start process and wait", status: 201, answer: processJSON,
			call: func(c *Client) (any, error) {
				return c.StartProcess(ctx, StartRequest{Fleet: "demo"}, true, 30*time.Second)
			},
			method: "POST", path: "/v1/processes", query: url.Values{"wait": {"ready"}, "timeout": {"30s"}},
			body: `{"fleet":"demo"}`,
			want: Process{ID: "p-1", Fleet: "demo", MachineID: "m-1", State: "ready", Ports: map[string]int{"game": 30001}},
		},
		{
			name: "start process and wait with the default timeout", status: 201, answer: processJSON,
			call: func(c *Client) (any, error) {
				return c.StartProcess(ctx, StartRequest{Fleet: "demo"}, true, 0)
			},
			method: "POST", path: "/v1/processes", query: url.Values{"wait": {"ready"}},
			body: `{"fleet":"demo"}`,
			want: Process{ID: "p-1", Fleet: "demo", MachineID: "m-1", State: "ready", Ports: map[string]int{"game": 30001}},
		},
		{
			name: "list processes", status: 200, answer: `{"items":[` + processJSON + `]}`,
			call:   func(c *Client) (any, error) { return c.ListProcesses(ctx, "demo", "m-1", "ready") },
			method: "GET", path: "/v1/processes", query: url.Values{"fleet": {"demo"}, "machine": {"m-1"}, "state": {"ready"}},
			want: []Process{{ID: "p-1", Fleet: "demo", MachineID: "m-1", State: "ready", Ports: map[string]int{"game": 30001}}},
		},
		{
			name: "get process", status: 200, answer: processJSON,
			call:   func(c *Client) (any, error) { return c.GetProcess(ctx, "p-1") },
			method: "GET", path: "/v1/processes/p-1",
			want: Process{ID: "p-1", Fleet: "demo", MachineID: "m-1", State: "ready", Ports: map[string]int{"game": 30001}},
		},
		{
			name: "stop process", status: 202, answer: `{}`,
			call:   func(c *Client) (any, error) { return nil, c.StopProcess(ctx, "p-1") },
			method: "DELETE", path: "/v1/processes/p-1", wantEmpty: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, c := newFake(t, tt.status, tt.answer)
			got, err := tt.call(c)
			if err != nil {
				t.Fatalf("call: %v", err)
			}
			r := f.last(t)
			if r.Method != tt.method || r.Path != tt.path {
				t.Errorf("request %s %s, want %s %s", r.Method, r.Path, tt.method, tt.path)
			}
			if r.Auth != "Bearer "+testToken {
				t.Errorf("Authorization %q", r.Auth)
			}
			wantQuery := tt.query
			if wantQuery == nil {
				wantQuery = url.Values{}
			}
			if !reflect.DeepEqual(r.Query, wantQuery) {
				t.Errorf("query %v (%q), want %v", r.Query, r.RawQuery, wantQuery)
			}
			if r.Body != tt.body {
				t.Errorf("body\n got %s\nwant %s", r.Body, tt.body)
			}
			if tt.body != "" && r.ContentType != "application/json" {
				t.Errorf("Content-Type %q", r.ContentType)
			}
			if !tt.wantEmpty && !reflect.DeepEqual(got, tt.want) {
				t.Errorf("answer\n got %+v\nwant %+v", got, tt.want)
			}
		})
	}
}

func TestClientEscapesQuery(t *testing.T) {
	f, c := newFake(t, 200, `{"items":[]}`)
	if _, err := c.ListProcesses(context.Background(), "a&b=c d", "", ""); err != nil {
		t.Fatal(err)
	}
	if r := f.last(t); r.RawQuery != "fleet=a%26b%3Dc+d" {
		t.Errorf("raw query %q", r.RawQuery)
	}
}

func TestClientRefusesEmptyID(t *testing.T) {
	f, c := newFake(t, 200, `{}`)
	ctx := context.Background()
	calls := map[string]func() error{
		"GetFleet":      func() error { _, err := c.GetFleet(ctx, ""); return err },
		"DeleteFleet":   func() error { return c.DeleteFleet(ctx, "") },
		"GetMachine":    func() error { _, err := c.GetMachine(ctx, ""); return err },
		"DeleteMachine": func() error { return c.DeleteMachine(ctx, "") },
		"GetProcess":    func() error { _, err := c.GetProcess(ctx, ""); return err },
		"StopProcess":   func() error { return c.StopProcess(ctx, "") },
		"Logs":          func() error { _, err := c.Logs(ctx, "", 0, false); return err },
	}
	for name, call := range calls {
		if err := call(); err == nil {
			t.Errorf("%s with an empty id: no error", name)
		}
	}
	if len(f.reqs) != 0 {
		t.Errorf("%d requests sent, want none", len(f.reqs))
	}
}

func TestClientProblems(t *testing.T) {
	tests := []struct {
		name        string
		status      int
		contentType string
		body        string
		want        Problem
	}{
		{
			name: "problem document", status: 409, contentType: "application/problem+json",
			body: `{"type":"https://dedi.dev/problems/exists","title":"Conflict","status":409,"detail":"fleet demo exists","code":"exists"}`,
			want: Problem{Type: "https://dedi.dev/problems/exists", Title: "Conflict", Status: 409, Detail: "fleet demo exists", Code: "exists"},
		},
		{
			name: "problem without status", status: 503, contentType: "application/problem+json",
			body: `{"title":"Service Unavailable","detail":"fleet demo is at maxMachines","code":"no_capacity"}`,
			want: Problem{Type: "about:blank", Title: "Service Unavailable", Status: 503, Detail: "fleet demo is at maxMachines", Code: "no_capacity"},
		},
		{
			name: "plain text 404", status: 404, contentType: "text/plain",
			body: "404 page not found\n",
			want: Problem{Type: "about:blank", Title: "Not Found", Status: 404, Detail: "404 page not found", Code: "not_found"},
		},
		{
			name: "proxy page", status: 502, contentType: "text/html",
			body: "<html>bad gateway</html>\n<body></body>",
			want: Problem{Type: "about:blank", Title: "Bad Gateway", Status: 502, Detail: "<html>bad gateway</html>", Code: "http_502"},
		},
		{
			name: "empty 401", status: 401,
			want: Problem{Type: "about:blank", Title: "Unauthorized", Status: 401, Code: "unauthorized"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, c := newFake(t, tt.status, tt.body)
			f.contentType = tt.contentType
			_, err := c.GetFleet(context.Background(), "demo")
			var p *Problem
			if !errors.As(err, &p) {
				t.Fatalf("error %v (%T), want *Problem", err, err)
			}
			if *p != tt.want {
				t.Errorf("problem\n got %+v\nwant %+v", *p, tt.want)
			}
		})
	}
	t.Run("on every method", func(t *testing.T) {
		_, c := newFake(t, 403, `{"status":403,"code":"forbidden","title":"Forbidden"}`)
		ctx := context.Background()
		calls := map[string]func() error{
			"CreateFleet":   func() error { _, err := c.CreateFleet(ctx, Fleet{Name: "x"}); return err },
			"ListFleets":    func() error { _, err := c.ListFleets(ctx); return err },
			"DeleteFleet":   func() error { return c.DeleteFleet(ctx, "x") },
			"CreateMachine": func() error { _, err := c.CreateMachine(ctx, "x"); return err },
			"ListMachines":  func() error { _, err := c.ListMachines(ctx, "", ""); return err },
			"GetMachine":    func() error { _, err := c.GetMachine(ctx, "x"); return err },
			"DeleteMachine": func() error { return c.DeleteMachine(ctx, "x") },
			"StartProcess":  func() error { _, err := c.StartProcess(ctx, StartRequest{Fleet: "x"}, true, 0); return err },
			"ListProcesses": func() error { _, err := c.ListProcesses(ctx, "", "", ""); return err },
			"GetProcess":    func() error { _, err := c.GetProcess(ctx, "x"); return err },
			"StopProcess":   func() error { return c.StopProcess(ctx, "x") },
			"Logs":          func() error { _, err := c.Logs(ctx, "x", 0, false); return err },
			"Events":        func() error { return c.Events(ctx, func(Event) error { return nil }) },
		}
		for name, call := range calls {
			var p *Problem
			if err := call(); !errors.As(err, &p) || p.Code != CodeForbidden || p.Status != 403 {
				t.Errorf("%s: error %v, want the forbidden problem", name, err)
			}
		}
	})
}

func TestClientTransportError(t *testing.T) {
	srv := httptest.NewServer(http.NotFoundHandler())
	base := srv.URL
	srv.Close()
	_, err := NewClient(base, testToken, nil).ListFleets(context.Background())
	var p *Problem
	var ue *url.Error
	if err == nil || errors.As(err, &p) || !errors.As(err, &ue) {
		t.Fatalf("error %v (%T), want a *url.Error", err, err)
	}
}

func TestClientLogs(t *testing.T) {
	f, c := newFake(t, 200, "line one\nline two\n")
	f.contentType = "text/plain"
	rc, err := c.Logs(context.Background(), "p-1", 20, true)
	if err != nil {
		t.Fatal(err)
	}
	text, err := io.ReadAll(rc)
	rc.Close()
	if err != nil {
		t.Fatal(err)
	}
	if string(text) != "line one\nline two\n" {
		t.Errorf("logs %q", text)
	}
	r := f.last(t)
	if r.Method != "GET" || r.Path != "/v1/processes/p-1/logs" || r.RawQuery != "follow=true&tail=20" {
		t.Errorf("request %s %s?%s", r.Method, r.Path, r.RawQuery)
	}
	if r.Auth != "Bearer "+testToken {
		t.Errorf("Authorization %q", r.Auth)
	}
}

func TestReadSSE(t *testing.T) {
	tests := []struct {
		name   string
		stream string
		want   []string
	}{
		{
			name:   "events, comments and blank lines",
			stream: ": hello\n\n\ndata: {\"type\":\"a\"}\n\n: keep-alive\n\ndata: {\"type\":\"b\"}\n\n\n\ndata:{\"type\":\"c\"}\n\n",
			want:   []string{`{"type":"a"}`, `{"type":"b"}`, `{"type":"c"}`},
		},
		{
			name:   "other fields are skipped",
			stream: "event: change\nid: 7\nretry: 1000\ndata: {\"type\":\"a\"}\n\n",
			want:   []string{`{"type":"a"}`},
		},
		{
			name:   "data lines of one event are joined",
			stream: "data: {\"type\":\ndata: \"a\"}\n\n",
			want:   []string{"{\"type\":\n\"a\"}"},
		},
		{
			name:   "CRLF line ends and a byte order mark",
			stream: "\uFEFFdata: {\"type\":\"a\"}\r\n\r\ndata: {\"type\":\"b\"}\r\n\r\n",
			want:   []string{`{"type":"a"}`, `{"type":"b"}`},
		},
		{
			name:   "an event cut off at the end is dropped",
			stream: "data: {\"type\":\"a\"}\n\ndata: {\"type\":",
			want:   []string{`{"type":"a"}`},
		},
		{
			name:   "empty data is no event",
			stream: "data:\n\n: x\n\n",
			want:   nil,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got []string
			err := readSSE(strings.NewReader(tt.stream), func(data []byte) error {
				got = append(got, string(data))
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("events\n got %q\nwant %q", got, tt.want)
			}
		})
	}
}

// eventServer streams the given SSE frames, then either holds the stream
// open until the client goes away or closes it.
func eventServer(t *testing.T, frames []string, hold bool) (*httptest.Server, *seen) {
	t.Helper()
	var mu sync.Mutex
	var r0 seen
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		r0 = seen{Method: r.Method, Path: r.URL.Path, Auth: r.Header.Get("Authorization"), Accept: r.Header.Get("Accept")}
		mu.Unlock()
		w.Header().Set("Content-Type", "text/event-stream")
		w.WriteHeader(200)
		fl := w.(http.Flusher)
		for _, f := range frames {
			io.WriteString(w, f)
			fl.Flush()
		}
		if hold {
			<-r.Context().Done()
		}
	}))
	t.Cleanup(srv.Close)
	return srv, &r0
}

func TestEvents(t *testing.T) {
	at := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	frames := []string{
		": connected\n\n",
		fmt.Sprintf("data: {\"seq\":1,\"type\":\"fleet.created\",\"at\":%q,\"fleet\":\"demo\"}\n\n", at.Format(time.RFC3339)),
		"\n: keep-alive\n\n",
		fmt.Sprintf("data: {\"seq\":2,\"type\":\"process.state\",\"at\":%q,\"fleet\":\"demo\",\"machineId\":\"m-1\",\"processId\":\"p-1\",\"state\":\"ready\",\"extra\":1}\n\n", at.Format(time.RFC3339)),
		fmt.Sprintf("data: {\"seq\":3,\"type\":\"machine.state\",\"at\":%q,\"machineId\":\"m-1\",\"state\":\"ready\"}\n\n", at.Format(time.RFC3339)),
	}
	want := []Event{
		{Seq: 1, Type: "fleet.created", At: at, Fleet: "demo"},
		{Seq: 2, Type: "process.state", At: at, Fleet: "demo", MachineID: "m-1", ProcessID: "p-1", State: "ready"},
		{Seq: 3, Type: "machine.state", At: at, MachineID: "m-1", State: "ready"},
	}

	t.Run("ends when ctx is done", func(t *testing.T) {
		srv, r := eventServer(t, frames, true)
		c := NewClient(srv.URL, testToken, srv.Client())
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		var got []Event
		err := c.Events(ctx, func(ev Event) error {
			got = append(got, ev)
			if len(got) == len(want) {
				cancel()
			}
			return nil
		})
		if err != nil {
			t.Fatalf("Events: %v", err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("events\n got %+v\nwant %+v", got, want)
		}
		if r.Method != "GET" || r.Path != "/v1/events" || r.Auth != "Bearer "+testToken || r.Accept != "text/event-stream" {
			t.Errorf("request %+v", *r)
		}
	})
	t.Run("a closed stream is ErrEventsClosed", func(t *testing.T) {
		srv, _ := eventServer(t, frames, false)
		c := NewClient(srv.URL, testToken, srv.Client())
		n := 0
		err := c.Events(context.Background(), func(Event) error { n++; return nil })
		if !errors.Is(err, ErrEventsClosed) || n != len(want) {
			t.Errorf("err %v after %d events, want ErrEventsClosed after %d", err, n, len(want))
		}
	})
	t.Run("fn's error ends the stream", func(t *testing.T) {
		srv, _ := eventServer(t, frames, true)
		c := NewClient(srv.URL, testToken, srv.Client())
		stop := errors.New("stop")
		n := 0
		err := c.Events(context.Background(), func(Event) error { n++; return stop })
		if !errors.Is(err, stop) || n != 1 {
			t.Errorf("err %v after %d events", err, n)
		}
	})
	t.Run("raw events keep every field", func(t *testing.T) {
		srv, _ := eventServer(t, frames, false)
		c := NewClient(srv.URL, testToken, srv.Client())
		var got []string
		err := c.RawEvents(context.Background(), func(data []byte) error { got = append(got, string(data)); return nil })
		if !errors.Is(err, ErrEventsClosed) || len(got) != 3 || !strings.Contains(got[1], `"extra":1`) {
			t.Errorf("err %v, events %q", err, got)
		}
	})
	t.Run("a malformed event is an error", func(t *testing.T) {
		srv, _ := eventServer(t, []string{"data: {not json\n\n"}, true)
		c := NewClient(srv.URL, testToken, srv.Client())
		err := c.Events(context.Background(), func(Event) error { return nil })
		if err == nil || errors.Is(err, ErrEventsClosed) {
			t.Errorf("err %v, want a decode error", err)
		}
	})
}
