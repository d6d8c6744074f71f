package rest

import (
	"errors"
	"io"
	"net"
	"net/http"
	"sync/atomic"
	"testing"
	"time"
)

// Stop ends the requests' contexts
// and returns only once their handlers have, also one that takes its time
// to finish after its context ended; a handler that ignores its context is
// cut off by closing its connection after the wait.
func TestServerStopWaits(t *testing.T) {
	var running, finished atomic.Int32
	entered := make(chan struct{}, 2)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		running.Add(1)
		defer running.Add(-1)
		entered <- struct{}{}
		if r.URL.Path == "/slow" {
			<-r.Context().Done()
			time.Sleep(200 * time.Millisecond) // cleaning up
		} else {
			_, _ = io.Copy(io.Discard, r.Body) // a stalled body: only a closed connection ends it
		}
		finished.Add(1)
	})}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := Serve(srv, ln)
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			g.Stop(0)
		}
	})

	client := &http.Client{}
	defer client.CloseIdleConnections()
	slow := make(chan error, 1)
	go func() {
		resp, err := client.Get("http://" + ln.Addr().String() + "/slow")
		if err == nil {
			resp.Body.Close()
		}
		slow <- err
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := io.WriteString(c, "POST /stalled HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{"); err != nil {
		t.Fatal(err)
	}
	<-entered
	<-entered

	const wait = 300 * time.Millisecond
	start := time.Now()
	g.Stop(wait)
	stopped = true
	took := time.Since(start)
	if n := running.Load(); n != 0 || finished.Load() != 2 {
		t.Fatalf("stop returned with %d handlers running, %d finished", n, finished.Load())
	}
	if took < wait || took > wait+5*time.Second {
		t.Fatalf("stop took %v, want the wait (%v) and little more", took, wait)
	}
	<-slow
	if _, err := net.DialTimeout("tcp", ln.Addr().String(), time.Second); err == nil {
		t.Fatal("the server still accepts connections after stop")
	}
}

// A listener that breaks is reported on Failed; Stop still returns.
func TestServerFailed(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := Serve(&http.Server{Handler: http.NotFoundHandler()}, ln)
	ln.Close()
	select {
	case err := <-g.Failed():
		if err == nil || errors.Is(err, http.ErrServerClosed) {
			t.Fatalf("Failed yielded %v, want the listener's error", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a broken listener was not reported")
	}
	g.Stop(time.Second)
}
