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

// A stopping VMM ends a start waiting for ready at once, answering 503
// stopping, and returns only once that handler has: no handler of the API
// runs after Run.
func TestStopEndsWaitForReady(t *testing.T) {
	tv := newTestVMM(t)
	bootOne(t, tv)
	body, _ := json.Marshal(api.StartRequest{Fleet: "f"})
	req, _ := http.NewRequest("POST", "http://"+tv.Addr()+"/v1/processes?wait=ready&timeout=60s", bytes.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+testAdmin)
	type answer struct {
		code int
		body string
	}
	answered := make(chan answer, 1)
	go func() {
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			answered <- answer{body: err.Error()}
			return
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		answered <- answer{resp.StatusCode, string(b)}
	}()
	const waiting = "vmm.(*VMM).waitReady"
	deadline := time.Now().Add(10 * time.Second)
	for stacksWith(waiting) != 1 {
		if time.Now().After(deadline) {
			t.Fatal("the start never waited for ready")
		}
		time.Sleep(time.Millisecond)
	}

	start := time.Now()
	tv.stop()
	if took := time.Since(start); took > apiStopWait/2 {
		t.Errorf("Run took %v to return with a start waiting for ready (apiStopWait %v)", took, apiStopWait)
	}
	if n := stacksWith("vmm.(*VMM).postProcess") + stacksWith(waiting); n != 0 {
		t.Errorf("%d start handlers still running after Run returned", n)
	}
	a := <-answered
	if a.code != http.StatusServiceUnavailable || !strings.Contains(a.body, `"code":"stopping"`) {
		t.Errorf("the waiting start got %d %s, want 503 stopping", a.code, a.body)
	}
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
