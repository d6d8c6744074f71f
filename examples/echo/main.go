// Command echo is the smallest dedi game server: a UDP echo. It listens on
// 0.0.0.0:$DEDI_PORT_GAME, sends every datagram back to its sender, and
// talks to its LSPM through the Go SDK: ready once the socket is open, then
// heartbeats carrying the number of distinct clients heard from in the last
// 30 seconds as its player count.
//
// It exits 0 on SIGTERM or SIGINT (after telling the LSPM it shuts down), and
// when the LSPM reports its process as ended. It does nothing slow before
// Ready: its startup time is benchmarked against a bare fork/exec.
package main

import (
	"os"

	"dedi.dev/dedi/examples/echo/echoserver"
)

func main() { os.Exit(run()) }

func run() int { return echoserver.Run() }
