// Package echoserver is the echo example game server as a library, so the
// dedi binary can host it for "dedi up" without a separate build. The
// command examples/echo is a thin wrapper around Run.
package echoserver

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"syscall"
	"time"

	"golang.org/x/net/ipv4"

	"dedi.dev/dedi/api"
	sdk "dedi.dev/dedi/sdk/go"
)

// playerWindow is how recently a client must have sent a datagram to count
// as a player.
const playerWindow = 30 * time.Second

// Run serves until SIGTERM or SIGINT or the end of its process, and returns
// the exit code.
func Run() int {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	port, err := strconv.Atoi(os.Getenv(api.EnvPortPrefix + "GAME"))
	if err != nil || port <= 0 || port > 65535 {
		fmt.Fprintf(os.Stderr, "echo: %sGAME must be a port number, got %q\n", api.EnvPortPrefix, os.Getenv(api.EnvPortPrefix+"GAME"))
		return 2
	}
	cfg, err := sdk.ConfigFromEnv()
	if err != nil {
		fmt.Fprintln(os.Stderr, "echo:", err)
		return 2
	}
	ended := make(chan string, 1) // the terminal state the LSPM reported
	cfg.OnState = func(p api.Process) {
		if api.IsTerminal(p.State) {
			select {
			case ended <- p.State:
			default:
			}
		}
	}
	cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, nil))
	client, err := sdk.New(cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "echo:", err)
		return 2
	}
	defer client.Close()

	conn, err := net.ListenPacket("udp", net.JoinHostPort("0.0.0.0", strconv.Itoa(port)))
	if err != nil {
		fmt.Fprintln(os.Stderr, "echo:", err)
		return 1
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		serve(conn, client)
	}()
	closeSocket := func() {
		fmt.Println("echo: closing socket")
		conn.Close()
		wg.Wait()
	}

	if _, err := client.Ready(ctx); err != nil {
		if ctx.Err() != nil { // stopped before the LSPM answered
			fmt.Println("echo: signal before ready; shutting down")
			closeSocket()
			return 0
		}
		fmt.Fprintln(os.Stderr, "echo: ready:", err)
		closeSocket()
		return 1
	}
	fmt.Printf("echo: ready on udp port %d\n", port)
	client.Start(ctx)

	select {
	case <-ctx.Done():
		fmt.Println("echo: signal; shutting down")
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, _ = client.Shutdown(sctx) // best effort: the LSPM sees the exit anyway
		cancel()
	case state := <-ended:
		fmt.Printf("echo: lspm reports process %s; shutting down\n", state)
	}
	closeSocket()
	client.Close()
	fmt.Println("echo: bye")
	return 0
}

// serve echoes datagrams until conn is closed and keeps the SDK's player
// count at the number of clients heard from within playerWindow.
func serve(conn net.PacketConn, client *sdk.Client) {
	// A machine may have several addresses (dedi's local machines are
	// 127.0.0.N): answer from the address the datagram came to, or a client
	// that connected its socket would drop the reply.
	pc := ipv4.NewPacketConn(conn)
	withDst := pc.SetControlMessage(ipv4.FlagDst, true) == nil
	buf := make([]byte, 64<<10)
	seen := map[string]time.Time{}
	client.SetPlayers(0)
	nextPrune := time.Now().Add(time.Second)
	for {
		// The deadline wakes the loop up to expire idle clients.
		_ = conn.SetReadDeadline(time.Now().Add(time.Second))
		n, cm, addr, err := pc.ReadFrom(buf)
		now := time.Now()
		switch {
		case err == nil:
			var reply *ipv4.ControlMessage
			if withDst && cm != nil && cm.Dst != nil {
				reply = &ipv4.ControlMessage{Src: cm.Dst}
			}
			_, _ = pc.WriteTo(buf[:n], reply, addr) // a lost echo is a lost datagram
			if _, ok := seen[addr.String()]; !ok {
				seen[addr.String()] = now
				client.SetPlayers(len(seen))
			}
			seen[addr.String()] = now
		case !errors.Is(err, os.ErrDeadlineExceeded):
			return // closed
		}
		if now.After(nextPrune) {
			for a, t := range seen {
				if now.Sub(t) > playerWindow {
					delete(seen, a)
				}
			}
			client.SetPlayers(len(seen))
			nextPrune = now.Add(time.Second)
		}
	}
}
