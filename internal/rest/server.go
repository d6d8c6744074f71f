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
type Server struct {
	srv     *http.Server
	cancel  context.CancelFunc // ends the context of every request
	serving sync.WaitGroup     // the Serve calls
	conns   sync.WaitGroup     // the connections: each has a goroutine until it is closed
	failed  chan error         // a Serve that ended before Stop, with its error
}

// Serve serves srv on lns until Stop. It sets srv's BaseContext and
// ConnState.
func Serve(srv *http.Server, lns ...net.Listener) *Server {
	ctx, cancel := context.WithCancel(context.Background())
	g := &Server{srv: srv, cancel: cancel, failed: make(chan error, len(lns))}
	srv.BaseContext = func(net.Listener) context.Context { return ctx }
	srv.ConnState = func(_ net.Conn, st http.ConnState) {
		switch st {
		case http.StateNew: // in Serve, before it can return
			g.conns.Add(1)
		case http.StateClosed, http.StateHijacked: // the connection's goroutine ends
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

// Stop ends the requests' contexts, lets their handlers answer for at most
// wait, closes every connection still open, and returns once every handler
// and connection goroutine has.
func (g *Server) Stop(wait time.Duration) {
	g.cancel()
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
