package lspm

import (
	"context"
	"errors"
	"net"
	"net/http"
	"sync"
	"time"
)

// httpGateway runs an http.Server so that its stop waits for every handler:
// http.Server.Close does not, and Shutdown waits only while no long request
// (a watch, a followed log) is open and at most as long as its context.
// Nothing of the gateway runs once stop has returned. The LSPM's API and
// each Agones game's REST SDK are served this way.
type httpGateway struct {
	srv     *http.Server
	cancel  context.CancelFunc // ends the context of every request
	serving sync.WaitGroup     // the Serve calls
	conns   sync.WaitGroup     // the connections: each has a goroutine until it is closed
	failed  chan error         // a Serve that ended before stop, with its error
}

// startHTTPGateway serves srv on lns until stop. It sets srv's BaseContext
// and ConnState.
func startHTTPGateway(srv *http.Server, lns []net.Listener) *httpGateway {
	ctx, cancel := context.WithCancel(context.Background())
	g := &httpGateway{srv: srv, cancel: cancel, failed: make(chan error, len(lns))}
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

// stop ends the requests' contexts, lets their handlers answer for at most
// wait, closes every connection still open, and returns once every handler
// and connection goroutine has.
func (g *httpGateway) stop(wait time.Duration) {
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
