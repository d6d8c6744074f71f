// Command dedi hosts dedicated game servers: "dedi lspm" is the agent on
// every machine; more subcommands are listed by "dedi help".
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"dedi.dev/dedi/examples/echo/echoserver"
	"dedi.dev/dedi/internal/lspm"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

const usage = `dedi hosts dedicated game servers on machines you control.

Usage:
  dedi up [--data-dir DIR] [--listen ADDR]         the quick start: VMM, local machines and a demo fleet
  dedi vmm [--listen ADDR] [--data-dir DIR]        run the control plane (admin token: env DEDI_TOKEN, else DIR/admin-token)
  dedi lspm [flags] [-- DEFAULT-COMMAND ARGS...]   run the local server process manager
  dedi fleet create|list|get|delete ...            manage fleets        (VMM at DEDI_ADDR, token DEDI_TOKEN)
  dedi machine list|get|delete ...                 manage machines
  dedi process start|list|get|stop|logs ...        manage game server processes
  dedi events                                      follow the VMM's events
  dedi image build --format qemu|docker --name NAME BUILD_DIR -- COMMAND [ARGS...]
                                                   build a VM image of a game server build
  dedi example echo                                run the example UDP echo game server (needs the LSPM's environment)
  dedi version                                     print the version

Run "dedi COMMAND -h" for a command's flags.
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	cmd, rest := args[0], args[1:]
	switch cmd {
	case "shim":
		// Internal: the parent of one game server (see internal/lspm/shim.go).
		return lspm.RunShim()
	case "lspm":
		return exitCode(stderr, runLSPM(rest, stderr))
	case "up":
		return exitCode(stderr, runUp(rest, stdout, stderr))
	case "vmm":
		return exitCode(stderr, runVMM(rest, stderr))
	case "init": // Internal: PID 1 of a qemu image's VM (see init.go).
		return exitCode(stderr, runInit(rest, stderr))
	case "image":
		return exitCode(stderr, runImage(rest, stdout, stderr))
	case "fleet", "machine", "process", "events":
		return runClient(cmd, rest, stdout, stderr)
	case "example":
		// The example game servers built into dedi, hosted by "dedi up".
		if len(rest) == 1 && rest[0] == "echo" {
			return echoserver.Run()
		}
		fmt.Fprintln(stderr, "usage: dedi example echo")
		return 2
	case "version", "--version", "-version":
		fmt.Fprintln(stdout, "dedi", version)
		return 0
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	}
	fmt.Fprintf(stderr, "dedi: unknown command %q\n\n%s", cmd, usage)
	return 2
}

// errUsage marks an error already explained by the flag package.
var errUsage = errors.New("usage")

func exitCode(stderr io.Writer, err error) int {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, errUsage), errors.Is(err, flag.ErrHelp):
		return 2
	}
	fmt.Fprintf(stderr, "dedi: %v\n", err)
	return 1
}

// signalContext is cancelled on SIGINT or SIGTERM.
func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
}

func newLogger(w io.Writer, level string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", level)
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: l})), nil
}

// listFlag collects a repeated flag.
type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(s string) error { *l = append(*l, s); return nil }
