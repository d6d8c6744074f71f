package rest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// Stop returns only once every handler has, also one that takes its time
// to finish after its context ended; a handler that ignores its context is
// cut off by closing its connection (which ends its context) after the
// wait.
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

// A stop ends the long requests at once (Stopping, UntilStop with the
// cause ErrStopping) and lets a short one in flight answer with its
// context intact; a stopped server pins HTTP/1.1.
func TestServerStopEndsLongRequestsOnly(t *testing.T) {
	entered := make(chan struct{}, 2)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		entered <- struct{}{}
		if r.URL.Path == "/long" {
			ctx, cancel := UntilStop(r.Context())
			defer cancel()
			<-Stopping(r.Context())
			<-ctx.Done()
			if !errors.Is(context.Cause(ctx), ErrStopping) {
				http.Error(w, "cause "+fmt.Sprint(context.Cause(ctx)), http.StatusInternalServerError)
				return
			}
			http.Error(w, "stopping", http.StatusServiceUnavailable)
			return
		}
		time.Sleep(300 * time.Millisecond) // a short call, under way when the stop begins
		if err := r.Context().Err(); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		_, _ = io.WriteString(w, "done")
	})}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := Serve(srv, ln)
	if srv.Protocols == nil || srv.Protocols.HTTP2() || srv.Protocols.UnencryptedHTTP2() || !srv.Protocols.HTTP1() {
		t.Errorf("protocols %v, want HTTP/1 only", srv.Protocols)
	}
	type result struct {
		code int
		body string
	}
	get := func(path string, out chan<- result) {
		resp, err := http.Get("http://" + ln.Addr().String() + path)
		if err != nil {
			out <- result{body: err.Error()}
			return
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		out <- result{resp.StatusCode, strings.TrimSpace(string(b))}
	}
	long, short := make(chan result, 1), make(chan result, 1)
	go get("/long", long)
	go get("/short", short)
	<-entered
	<-entered
	start := time.Now()
	g.Stop(5 * time.Second)
	if took := time.Since(start); took > 3*time.Second {
		t.Errorf("stop took %v: the short call should end it well before the wait", took)
	}
	if r := <-long; r.code != http.StatusServiceUnavailable || r.body != "stopping" {
		t.Errorf("long request: %d %q", r.code, r.body)
	}
	if r := <-short; r.code != http.StatusOK || r.body != "done" {
		t.Errorf("short request in flight: %d %q, want 200 done with its context intact", r.code, r.body)
	}
	if Stopping(context.Background()) != nil {
		t.Error("Stopping of a context no server serves is not nil")
	}
}
