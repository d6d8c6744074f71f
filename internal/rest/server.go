package rest

import (
	"context"
	"errors"
	"net"
	"net/http"
	"sync"
	"time"
)

// Server runs an http.Server so that its Stop waits for every handler:
// http.Server.Close does not, and Shutdown waits only while no long request
// (a watch, a followed log, an event stream) is open and at most as long as
// its context. Nothing of the server runs once Stop has returned. The
// LSPM's and the VMM's APIs and each Agones game's REST SDK are served
// this way.
//
// Stop does not cancel the requests in flight: each gets the wait given to
// Stop to answer. Long requests end at once instead: their handlers watch
// Stopping or use UntilStop.
type Server struct {
	srv     *http.Server
	stop    context.CancelCauseFunc // ends stopCtx, with ErrStopping
	serving sync.WaitGroup          // the Serve calls
	conns   sync.WaitGroup          // the connections: each has a goroutine until it is closed
	failed  chan error              // a Serve that ended before Stop, with its error
}

// ErrStopping is the cause of a context UntilStop cancelled because the
// server stops.
var ErrStopping = errors.New("the server is stopping")

type stopKey struct{}

// Stopping yields a channel closed once the server that serves the request
// of ctx begins to stop (never, for a request served otherwise): a handler
// that waits (a stream, a wait for a state) selects on it too.
func Stopping(ctx context.Context) <-chan struct{} {
	if s, ok := ctx.Value(stopKey{}).(context.Context); ok {
		return s.Done()
	}
	return nil
}

// UntilStop returns ctx cancelled also when the server begins to stop,
// then with the cause ErrStopping (context.Cause), for the calls a long
// handler makes.
func UntilStop(ctx context.Context) (context.Context, context.CancelFunc) {
	c, cancel := context.WithCancelCause(ctx)
	s, ok := ctx.Value(stopKey{}).(context.Context)
	if !ok {
		return c, func() { cancel(nil) }
	}
	undo := context.AfterFunc(s, func() { cancel(ErrStopping) })
	return c, func() { undo(); cancel(nil) }
}

// Serve serves srv on lns until Stop. It sets srv's BaseContext and
// ConnState, and pins HTTP/1.1 (nothing here speaks HTTP/2: a connection
// is one request at a time, which the ConnState counting relies on).
func Serve(srv *http.Server, lns ...net.Listener) *Server {
	stopCtx, stop := context.WithCancelCause(context.Background())
	g := &Server{srv: srv, stop: stop, failed: make(chan error, len(lns))}
	base := context.WithValue(context.Background(), stopKey{}, stopCtx)
	srv.BaseContext = func(net.Listener) context.Context { return base }
	var protocols http.Protocols
	protocols.SetHTTP1(true)
	srv.Protocols = &protocols
	srv.ConnState = func(_ net.Conn, st http.ConnState) {
		switch st {
		case http.StateNew: // in Serve, before it can return
			g.conns.Add(1)
		case http.StateClosed, http.StateHijacked:
			// The server's goroutine of the connection ends. (A hijacked
			// connection is its hijacker's, which Stop does not wait for:
			// no handler served this way hijacks.)
			g.conns.Done()
		}
	}
	for _, ln := range lns {
		g.serving.Add(1)
		go func() {
			defer g.serving.Done()
			if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
				g.failed <- err
			}
		}()
	}
	return g
}

// Failed yields the error of a Serve that ended before Stop (a listener
// that broke).
func (g *Server) Failed() <-chan error { return g.failed }

// Stop ends the long requests (Stopping, UntilStop), lets the others
// answer for at most wait, closes every connection still open (which
// cancels the requests' contexts), and returns once every handler and
// connection goroutine has.
func (g *Server) Stop(wait time.Duration) {
	g.stop(ErrStopping)
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	if err := g.srv.Shutdown(ctx); err != nil {
		_ = g.srv.Close()
	}
	// Every Serve has returned, so no connection is counted any more
	// (StateNew comes before Serve returns): conns.Wait is safe.
	g.serving.Wait()
	g.conns.Wait()
}
