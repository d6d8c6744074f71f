package api

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// ErrEventsClosed is returned by Events and RawEvents when the VMM ends the
// event stream while the caller's context is still live; callers that want
// a continuous feed reconnect.
var ErrEventsClosed = errors.New("the VMM closed the event stream")

// maxProblemBody bounds how much of an error answer is read.
const maxProblemBody = 64 << 10

// maxEventLine bounds one line of the event stream.
const maxEventLine = 1 << 20

// Client is a client of the VMM's REST API (API.md, VMM) for operators,
// matchmakers and the CLI. Every request carries the admin token. Every
// answer outside 2xx comes back as a *Problem. Its methods are safe for
// concurrent use.
type Client struct {
	base  string // without a trailing slash
	token string
	hc    *http.Client
}

// NewClient returns a client of the VMM at baseURL (such as
// http://127.0.0.1:7700) that authenticates with token. A nil hc means
// http.DefaultClient. Logs with follow and Events stream for as long as
// their context lives, so hc should have no Timeout; bound calls with their
// context instead.
func NewClient(baseURL, token string, hc *http.Client) *Client {
	if hc == nil {
		hc = http.DefaultClient
	}
	return &Client{base: strings.TrimRight(baseURL, "/"), token: token, hc: hc}
}

// CreateFleet creates a fleet (POST /v1/fleets); 409 code exists when the
// name is taken.
func (c *Client) CreateFleet(ctx context.Context, f Fleet) (Fleet, error) {
	var out Fleet
	err := c.do(ctx, http.MethodPost, "/v1/fleets", nil, f, &out)
	return out, err
}

// ListFleets returns every fleet (GET /v1/fleets).
func (c *Client) ListFleets(ctx context.Context) ([]Fleet, error) {
	var out List[Fleet]
	err := c.do(ctx, http.MethodGet, "/v1/fleets", nil, nil, &out)
	return out.Items, err
}

// GetFleet returns one fleet (GET /v1/fleets/{name}).
func (c *Client) GetFleet(ctx context.Context, name string) (Fleet, error) {
	var out Fleet
	p, err := objectPath("/v1/fleets/", "fleet name", name)
	if err != nil {
		return out, err
	}
	err = c.do(ctx, http.MethodGet, p, nil, nil, &out)
	return out, err
}

// DeleteFleet starts the removal of a fleet (DELETE /v1/fleets/{name}): its
// machines drain, then the fleet goes.
func (c *Client) DeleteFleet(ctx context.Context, name string) error {
	p, err := objectPath("/v1/fleets/", "fleet name", name)
	if err != nil {
		return err
	}
	return c.do(ctx, http.MethodDelete, p, nil, nil, nil)
}

// CreateMachine provisions a machine for a fleet (POST /v1/machines); the
// machine comes back in state provisioning.
func (c *Client) CreateMachine(ctx context.Context, fleet string) (Machine, error) {
	var out Machine
	err := c.do(ctx, http.MethodPost, "/v1/machines", nil, CreateMachineRequest{Fleet: fleet}, &out)
	return out, err
}

// ListMachines returns the machines (GET /v1/machines), filtered by fleet
// and state when they are not empty.
func (c *Client) ListMachines(ctx context.Context, fleet, state string) ([]Machine, error) {
	var out List[Machine]
	q := query("fleet", fleet, "state", state)
	err := c.do(ctx, http.MethodGet, "/v1/machines", q, nil, &out)
	return out.Items, err
}

// GetMachine returns one machine (GET /v1/machines/{id}).
func (c *Client) GetMachine(ctx context.Context, id string) (Machine, error) {
	var out Machine
	p, err := objectPath("/v1/machines/", "machine id", id)
	if err != nil {
		return out, err
	}
	err = c.do(ctx, http.MethodGet, p, nil, nil, &out)
	return out, err
}

// DeleteMachine starts the removal of a machine (DELETE /v1/machines/{id}):
// drain, handshake, deprovision.
func (c *Client) DeleteMachine(ctx context.Context, id string) error {
	p, err := objectPath("/v1/machines/", "machine id", id)
	if err != nil {
		return err
	}
	return c.do(ctx, http.MethodDelete, p, nil, nil, nil)
}

// StartProcess places a game server process in a fleet (POST
// /v1/processes). With waitReady the answer comes once the process is
// ready (?wait=ready), or as a 504 code timeout after timeout (the VMM's
// default when timeout is 0); without it, once its LSPM accepted it.
func (c *Client) StartProcess(ctx context.Context, req StartRequest, waitReady bool, timeout time.Duration) (Process, error) {
	var out Process
	var q url.Values
	if waitReady {
		q = url.Values{"wait": {"ready"}}
		if timeout > 0 {
			q.Set("timeout", timeout.String())
		}
	}
	err := c.do(ctx, http.MethodPost, "/v1/processes", q, req, &out)
	return out, err
}

// ListProcesses returns the processes (GET /v1/processes), filtered by
// fleet, machine id and state when they are not empty.
func (c *Client) ListProcesses(ctx context.Context, fleet, machine, state string) ([]Process, error) {
	var out List[Process]
	q := query("fleet", fleet, "machine", machine, "state", state)
	err := c.do(ctx, http.MethodGet, "/v1/processes", q, nil, &out)
	return out.Items, err
}

// GetProcess returns one process (GET /v1/processes/{id}).
func (c *Client) GetProcess(ctx context.Context, id string) (Process, error) {
	var out Process
	p, err := objectPath("/v1/processes/", "process id", id)
	if err != nil {
		return out, err
	}
	err = c.do(ctx, http.MethodGet, p, nil, nil, &out)
	return out, err
}

// StopProcess asks for a process's end (DELETE /v1/processes/{id}); it ends
// as killed.
func (c *Client) StopProcess(ctx context.Context, id string) error {
	p, err := objectPath("/v1/processes/", "process id", id)
	if err != nil {
		return err
	}
	return c.do(ctx, http.MethodDelete, p, nil, nil, nil)
}

// Logs returns a process's captured stdout and stderr as text (GET
// /v1/processes/{id}/logs): the last tail lines when tail > 0, else all that
// is kept. With follow the stream stays open for new output until ctx is
// done or the process's log ends. The caller closes the reader.
func (c *Client) Logs(ctx context.Context, id string, tail int, follow bool) (io.ReadCloser, error) {
	p, err := objectPath("/v1/processes/", "process id", id)
	if err != nil {
		return nil, err
	}
	q := url.Values{}
	if tail > 0 {
		q.Set("tail", strconv.Itoa(tail))
	}
	if follow {
		q.Set("follow", "true")
	}
	resp, err := c.send(ctx, http.MethodGet, p+"/logs", q, nil, "text/plain")
	if err != nil {
		return nil, err
	}
	return resp.Body, nil
}

// Events calls fn with each event of the VMM's event stream (GET
// /v1/events) until ctx is done, when it returns nil. It returns fn's
// error if fn fails, ErrEventsClosed if the VMM ends the stream, or the
// error that broke the stream or its decoding.
func (c *Client) Events(ctx context.Context, fn func(Event) error) error {
	return c.RawEvents(ctx, func(data []byte) error {
		var ev Event
		if err := json.Unmarshal(data, &ev); err != nil {
			return fmt.Errorf("decode event %.200q: %w", data, err)
		}
		return fn(ev)
	})
}

// RawEvents is Events for callers that keep every field: fn gets the data
// of each event, the JSON object as the VMM sent it. fn must not keep data
// after it returns.
func (c *Client) RawEvents(ctx context.Context, fn func(data []byte) error) error {
	resp, err := c.send(ctx, http.MethodGet, "/v1/events", nil, nil, "text/event-stream")
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	defer resp.Body.Close()
	var fnErr error
	err = readSSE(resp.Body, func(data []byte) error {
		fnErr = fn(data)
		return fnErr
	})
	switch {
	case fnErr != nil:
		return fnErr
	case ctx.Err() != nil:
		return nil
	case err != nil:
		return fmt.Errorf("read events: %w", err)
	}
	return ErrEventsClosed
}

// readSSE parses a Server-Sent Events stream
// (https://html.spec.whatwg.org/multipage/server-sent-events.html) and
// calls fn with the data of each event: its data lines joined by newlines,
// dispatched at the blank line that ends the event. Comments (lines that
// start with a colon) and the other fields (event, id, retry) are skipped;
// an event cut off by the end of the stream is dropped, as the standard
// says. It returns nil at the end of the stream.
func readSSE(r io.Reader, fn func(data []byte) error) error {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 4096), maxEventLine)
	var data []byte
	pending := false // a data line was seen since the last dispatch
	first := true
	for sc.Scan() {
		line := sc.Bytes()
		if first {
			line = bytes.TrimPrefix(line, []byte("\uFEFF"))
			first = false
		}
		if len(line) == 0 {
			if pending && len(data) > 0 {
				if err := fn(data); err != nil {
					return err
				}
			}
			data, pending = data[:0], false
			continue
		}
		if line[0] == ':' {
			continue
		}
		field, value, _ := bytes.Cut(line, []byte(":"))
		if string(field) != "data" {
			continue
		}
		value = bytes.TrimPrefix(value, []byte(" "))
		if pending {
			data = append(data, '\n')
		}
		data = append(data, value...)
		pending = true
	}
	return sc.Err()
}

// do sends a request with an optional JSON body and decodes a JSON answer
// into out, when out is not nil.
func (c *Client) do(ctx context.Context, method, path string, q url.Values, in, out any) error {
	resp, err := c.send(ctx, method, path, q, in, "application/json")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if out == nil {
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, maxProblemBody)) // keep the connection reusable
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("%s %s: decode answer: %w", method, path, err)
	}
	return nil
}

// send sends a request and returns the response of a 2xx answer, whose body
// the caller closes; any other answer becomes a *Problem.
func (c *Client) send(ctx context.Context, method, path string, q url.Values, in any, accept string) (*http.Response, error) {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return nil, fmt.Errorf("%s %s: encode body: %w", method, path, err)
		}
		body = bytes.NewReader(b)
	}
	u := c.base + path
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, method, u, body)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", method, path, err)
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Accept", accept)
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return nil, err // a *url.Error, which names the method and URL
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		defer resp.Body.Close()
		return nil, decodeProblem(resp)
	}
	return resp, nil
}

// decodeProblem reads an error answer as problem+json. An answer that is not
// a problem document (a proxy's page, a plain-text error) gets its status,
// a code derived from the status, and its first line of text as detail.
func decodeProblem(resp *http.Response) *Problem {
	raw, _ := io.ReadAll(io.LimitReader(resp.Body, maxProblemBody))
	var p Problem
	if err := json.Unmarshal(raw, &p); err != nil {
		p = Problem{Detail: firstLine(raw)}
	}
	if p.Status == 0 {
		p.Status = resp.StatusCode
	}
	if p.Code == "" {
		p.Code = codeForStatus(resp.StatusCode)
	}
	if p.Title == "" {
		p.Title = http.StatusText(resp.StatusCode)
	}
	if p.Type == "" {
		p.Type = "about:blank"
	}
	return &p
}

// codeForStatus is the problem code a client assumes for an answer whose
// body names none.
func codeForStatus(status int) string {
	switch status {
	case http.StatusBadRequest:
		return CodeInvalid
	case http.StatusUnauthorized:
		return CodeUnauthorized
	case http.StatusForbidden:
		return CodeForbidden
	case http.StatusNotFound:
		return CodeNotFound
	case http.StatusMethodNotAllowed:
		return CodeMethodNotAllowed
	case http.StatusConflict:
		return "conflict"
	case http.StatusRequestEntityTooLarge:
		return CodeTooLarge
	case http.StatusUnsupportedMediaType:
		return CodeUnsupportedMedia
	case http.StatusServiceUnavailable:
		return "unavailable"
	case http.StatusGatewayTimeout:
		return CodeTimeout
	case http.StatusInternalServerError:
		return CodeInternal
	}
	return "http_" + strconv.Itoa(status)
}

func firstLine(b []byte) string {
	s := strings.TrimSpace(string(b))
	s, _, _ = strings.Cut(s, "\n")
	s = strings.TrimSpace(s)
	if r := []rune(s); len(r) > 200 {
		s = string(r[:200]) + "..."
	}
	return s
}

// objectPath is prefix followed by the escaped id; an empty id is refused
// because it would name the collection instead.
func objectPath(prefix, what, id string) (string, error) {
	if id == "" {
		return "", fmt.Errorf("empty %s", what)
	}
	return prefix + url.PathEscape(id), nil
}

// query builds the query of the non-empty values of key, value pairs.
func query(kv ...string) url.Values {
	q := url.Values{}
	for i := 0; i+1 < len(kv); i += 2 {
		if kv[i+1] != "" {
			q.Set(kv[i], kv[i+1])
		}
	}
	return q
}
