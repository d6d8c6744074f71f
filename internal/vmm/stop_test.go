package vmm

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"runtime"
	"strings"
	"testing"
	"time"

	"dedi.dev/dedi/api"
)

// A stopping VMM ends a start waiting for ready at once and returns only
// once that handler has: no handler of the API runs after Run. The
// process exists and keeps starting, so the answer is the documented 504
// timeout, not a 503 a client would retry with a second process.
func TestStopEndsWaitForReady(t *testing.T) {
	tv := newTestVMM(t)
	bootOne(t, tv)
	a := stopWhileStarting(t, tv, "?wait=ready&timeout=60s", "vmm.(*VMM).waitReady")
	if a.code != http.StatusGatewayTimeout || !strings.Contains(a.body, `"code":"timeout"`) || !strings.Contains(a.body, "stopping") {
		t.Errorf("the waiting start got %d %s, want 504 timeout saying the VMM stops", a.code, a.body)
	}
}

// A start waiting for its machine to boot ends at once too: nothing was
// started, so it is 503 stopping, which a client may retry.
func TestStopEndsWaitForMachine(t *testing.T) {
	tv := newTestVMM(t)
	if code, raw := tv.req(t, "POST", "/v1/fleets", testAdmin, fleetOf("f")); code != 201 {
		t.Fatalf("fleet: %d %s", code, raw)
	}
	a := stopWhileStarting(t, tv, "?timeout=60s", "vmm.(*VMM).start")
	if a.code != http.StatusServiceUnavailable || !strings.Contains(a.body, `"code":"stopping"`) || a.retryAfter == "" {
		t.Errorf("the start waiting for a machine got %d %s (Retry-After %q), want 503 stopping with Retry-After", a.code, a.body, a.retryAfter)
	}
}

type startAnswer struct {
	code       int
	body       string
	retryAfter string
}

// stopWhileStarting sends a start, stops the VMM once a goroutine is in
// waiting, checks that Run returned at once with no start handler left,
// and returns the start's answer.
func stopWhileStarting(t *testing.T, tv *testVMM, query, waiting string) startAnswer {
	t.Helper()
	body, _ := json.Marshal(api.StartRequest{Fleet: "f"})
	req, _ := http.NewRequest("POST", "http://"+tv.Addr()+"/v1/processes"+query, bytes.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+testAdmin)
	answered := make(chan startAnswer, 1)
	go func() {
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			answered <- startAnswer{body: err.Error()}
			return
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		answered <- startAnswer{resp.StatusCode, string(b), resp.Header.Get("Retry-After")}
	}()
	deadline := time.Now().Add(10 * time.Second)
	for stacksWith(waiting) != 1 {
		if time.Now().After(deadline) {
			t.Fatalf("the start never reached %s", waiting)
		}
		time.Sleep(time.Millisecond)
	}

	start := time.Now()
	tv.stop()
	if took := time.Since(start); took > apiStopWait/2 {
		t.Errorf("Run took %v to return with a start waiting (apiStopWait %v)", took, apiStopWait)
	}
	if n := stacksWith("vmm.(*VMM).postProcess") + stacksWith(waiting); n != 0 {
		t.Errorf("%d start handlers still running after Run returned", n)
	}
	return <-answered
}

// stacksWith counts the goroutines whose stack names fn.
func stacksWith(fn string) int {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	count := 0
	for _, g := range bytes.Split(buf, []byte("\n\n")) {
		if bytes.Contains(g, []byte(fn)) {
			count++
		}
	}
	return count
}
