package providertest

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"dedi.dev/dedi/api"
	"dedi.dev/dedi/internal/provider"
)

// Clients of an LSPM: a request that must be answered may take a while;
// one of a poll, made again while a machine boots, gives up sooner.
var (
	client     = &http.Client{Timeout: 5 * time.Second}
	pollClient = &http.Client{Timeout: 2 * time.Second}
)

// Send makes a request to an LSPM, with the machine token unless token
// is "" and a JSON body unless body is "", and returns the answer. An
// error with code 0 means the LSPM did not answer.
func Send(method, url, token, body string) (code int, raw []byte, err error) {
	return send(client, method, url, token, body)
}

func send(c *http.Client, method, url, token, body string) (code int, raw []byte, err error) {
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		return 0, nil, err
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := c.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	raw, err = io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return resp.StatusCode, raw, err
}

// Do is Send that fails the test when the request fails, and decodes a
// 2xx JSON answer into out (unless out is nil).
func Do(t *testing.T, method, url, token, body string, out any) (int, []byte) {
	t.Helper()
	code, raw, err := Send(method, url, token, body)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	decode(t, method, url, code, raw, out)
	return code, raw
}

// DoUntilAnswered is Do that asks again, for up to BootTimeout, while the
// LSPM does not answer at all (a machine still booting).
func DoUntilAnswered(t *testing.T, method, url, token, body string, out any) (int, []byte) {
	t.Helper()
	deadline := time.Now().Add(BootTimeout)
	for {
		code, raw, err := send(pollClient, method, url, token, body)
		if err != nil && code == 0 && !time.Now().After(deadline) {
			time.Sleep(100 * time.Millisecond)
			continue
		}
		if err != nil {
			t.Fatalf("%s %s: %v", method, url, err)
		}
		decode(t, method, url, code, raw, out)
		return code, raw
	}
}

func decode(t *testing.T, method, url string, code int, raw []byte, out any) {
	t.Helper()
	if code/100 == 2 && out != nil {
		if err := json.Unmarshal(raw, out); err != nil {
			t.Fatalf("%s %s: %v in %s", method, url, err, raw)
		}
	}
}

// WaitHealthy waits until the machine's LSPM answers GET /healthz with
// 200, for up to BootTimeout.
func WaitHealthy(t *testing.T, m provider.Machine) {
	t.Helper()
	deadline := time.Now().Add(BootTimeout)
	var last string
	for {
		code, _, err := get(m, "/healthz", "")
		if err == nil && code == http.StatusOK {
			return
		}
		last = fmt.Sprint(code, err)
		if time.Now().After(deadline) {
			t.Fatalf("LSPM of %s at %s not healthy within %v (last: %s)", m.MachineID, m.LSPMURL, BootTimeout, last)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// get fetches LSPMURL+path, for a poll.
func get(m provider.Machine, path, token string) (int, []byte, error) {
	return send(pollClient, http.MethodGet, strings.TrimSuffix(m.LSPMURL, "/")+path, token, "")
}

// SpawnReady starts a game server on the machine through its LSPM, with
// the request body req, and waits until it is ready.
func SpawnReady(t *testing.T, m provider.Machine, token, req string) api.Process {
	t.Helper()
	WaitHealthy(t, m)
	var p api.Process
	if code, body := Do(t, http.MethodPost, m.LSPMURL+"/v1/processes", token, req, &p); code != http.StatusCreated {
		t.Fatalf("spawn: %d %s", code, body)
	}
	WaitFor(t, "the game server to be ready", func() bool {
		Do(t, http.MethodGet, m.LSPMURL+"/v1/processes/"+p.ID, token, "", &p)
		return p.State == api.StateReady
	})
	return p
}

// UDPEcho sends msg to addr:port, again every 250ms for up to within,
// and returns the first answer, or "" when none came.
func UDPEcho(t *testing.T, addr string, port int, msg string, within time.Duration) string {
	t.Helper()
	const wait = 250 * time.Millisecond
	c, err := net.Dial("udp", net.JoinHostPort(addr, strconv.Itoa(port)))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 2048)
	for range within / wait {
		// A write fails after a packet was refused (the game not yet
		// bound): that is no answer yet, as a lost packet is.
		_, _ = c.Write([]byte(msg))
		_ = c.SetReadDeadline(time.Now().Add(wait))
		if n, err := c.Read(buf); err == nil {
			return string(buf[:n])
		}
	}
	return ""
}
