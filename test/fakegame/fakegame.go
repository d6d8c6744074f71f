// Package fakegame is a misbehaving game server for tests, as a library: it
// starts slowly, never gets ready, crashes with an exit code or a signal,
// exits, hangs, leaks memory, ignores SIGTERM, or floods its logs, as its
// flags say. It talks to its LSPM through the Go SDK, from the environment
// the LSPM gives it.
//
// A test binary becomes the fake game server by re-executing itself
// (DESIGN.md's "Tests"):
//
//	func TestMain(m *testing.M) {
//		if os.Getenv(fakegame.Env) == "1" {
//			os.Exit(fakegame.Main(os.Args[1:]))
//		}
//		os.Exit(m.Run())
//	}
//
// and spawns os.Args[0] with DEDI_FAKEGAME=1 in its environment and the
// fake's flags as arguments (run `Main([]string{"-h"})` for the list).
package fakegame

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

	sdk "dedi.dev/dedi/sdk/go"
)

// Env is the environment variable that, set to "1", tells a test binary to
// run Main instead of its tests.
const Env = "DEDI_FAKEGAME"

// options are the parsed flags. The *Set fields say whether a duration flag
// was given, so that 0 means "at once" rather than "never".
type options struct {
	readyDelay  time.Duration
	noReady     bool
	crashAfter  time.Duration
	crashSet    bool
	exitCode    int
	crashSignal syscall.Signal // 0: exit with exitCode
	exitAfter   time.Duration
	exitSet     bool
	hangAfter   time.Duration
	hangSet     bool
	leakMiB     int
	ignoreTerm  bool
	logLines    int
	logEvery    time.Duration
	stderrLine  string
	marker      string
	noSDK       bool
	players     int
	driver      string // a scripted driver instead (drivers.go)
}

// signals are the values of -crash-signal.
var signals = map[string]syscall.Signal{
	"SEGV": syscall.SIGSEGV,
	"KILL": syscall.SIGKILL,
	"ABRT": syscall.SIGABRT,
}

func parse(args []string, stderr io.Writer) (options, error) {
	var o options
	var sig string
	fs := flag.NewFlagSet("fakegame", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.DurationVar(&o.readyDelay, "ready-delay", 0, "sleep this long before calling Ready (slow start)")
	fs.BoolVar(&o.noReady, "no-ready", false, "never call Ready (heartbeats still run)")
	fs.DurationVar(&o.crashAfter, "crash-after", 0, "crash this long after ready: exit with -exit-code, or die by -crash-signal")
	fs.IntVar(&o.exitCode, "exit-code", 3, "exit code of -crash-after")
	fs.StringVar(&sig, "crash-signal", "", "with -crash-after, die by this signal instead: SEGV, KILL or ABRT")
	fs.DurationVar(&o.exitAfter, "exit-after", 0, "call sdk Shutdown and exit 0 this long after ready")
	fs.DurationVar(&o.hangAfter, "hang-after", 0, "stop heartbeating this long after ready, but stay alive")
	fs.IntVar(&o.leakMiB, "leak-mib-per-sec", 0, "allocate, touch and keep this many MiB every second")
	fs.BoolVar(&o.ignoreTerm, "ignore-term", false, "ignore SIGTERM (otherwise SIGTERM exits 0)")
	fs.IntVar(&o.logLines, "log-lines", 0, `print this many lines "line i" to stdout at start`)
	fs.DurationVar(&o.logEvery, "log-every", 0, `print a line "tick i" to stdout at this period`)
	fs.StringVar(&o.stderrLine, "stderr-line", "", "print this line to stderr at start")
	fs.StringVar(&o.marker, "marker", "", `append "<pid> <unix nanos>" to this file first thing`)
	fs.BoolVar(&o.noSDK, "no-sdk", false, "do not use the SDK at all (no LSPM needed); timers count from start")
	fs.IntVar(&o.players, "players", 0, "player count carried by heartbeats")
	fs.StringVar(&o.driver, "driver", "", "run a scripted driver instead: conformance, agones-rest-conformance or agones-rest-docs (drivers.go)")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("fakegame: unexpected arguments %q", fs.Args())
	}
	fs.Visit(func(f *flag.Flag) {
		switch f.Name {
		case "crash-after":
			o.crashSet = true
		case "exit-after":
			o.exitSet = true
		case "hang-after":
			o.hangSet = true
		}
	})
	if sig != "" {
		s, ok := signals[strings.TrimPrefix(strings.ToUpper(sig), "SIG")]
		if !ok {
			return o, fmt.Errorf("fakegame: -crash-signal %q: want SEGV, KILL or ABRT", sig)
		}
		o.crashSignal = s
	}
	if o.readyDelay < 0 || o.crashAfter < 0 || o.exitAfter < 0 || o.hangAfter < 0 || o.logEvery < 0 ||
		o.leakMiB < 0 || o.logLines < 0 {
		return o, errors.New("fakegame: negative flag value")
	}
	return o, nil
}

// Main runs the fake game server with the flags in args (without the
// program name) and returns its exit code. It writes to os.Stdout and
// os.Stderr, and may kill its own process (-crash-signal).
func Main(args []string) int {
	return run(args, os.Stdout, os.Stderr)
}

func run(args []string, stdout, stderr io.Writer) int {
	o, err := parse(args, stderr)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		fmt.Fprintln(stderr, err)
		return 2
	}
	if o.driver != "" {
		return runDriver(o.driver, stdout, stderr)
	}
	if o.marker != "" {
		if err := appendMarker(o.marker); err != nil {
			fmt.Fprintln(stderr, "fakegame:", err)
			return 1
		}
	}

	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup // the helper goroutines below
	defer wg.Wait()
	defer cancel()
	term := ctx // done on SIGTERM
	if o.ignoreTerm {
		signal.Ignore(syscall.SIGTERM)
	} else {
		var stop context.CancelFunc
		term, stop = signal.NotifyContext(ctx, syscall.SIGTERM)
		defer stop()
	}

	out := &lockedWriter{w: stdout}
	if o.stderrLine != "" {
		fmt.Fprintln(stderr, o.stderrLine)
	}
	for i := 1; i <= o.logLines; i++ {
		fmt.Fprintf(out, "line %d\n", i)
	}
	if o.logEvery > 0 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tick(ctx, out, o.logEvery)
		}()
	}
	if o.leakMiB > 0 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			leak(ctx, o.leakMiB)
		}()
	}

	var client *sdk.Client
	if !o.noSDK {
		cfg, err := sdk.ConfigFromEnv()
		if err != nil {
			fmt.Fprintln(stderr, "fakegame:", err)
			return 1
		}
		cfg.Logger = slog.New(slog.NewTextHandler(stderr, nil))
		if client, err = sdk.New(cfg); err != nil {
			fmt.Fprintln(stderr, "fakegame:", err)
			return 1
		}
		defer client.Close()
		client.SetPlayers(o.players)
	}

	if o.readyDelay > 0 {
		select {
		case <-term.Done():
			fmt.Fprintln(out, "fakegame: SIGTERM before ready; exiting")
			return 0
		case <-time.After(o.readyDelay):
		}
	}
	if client != nil && !o.noReady {
		if _, err := client.Ready(term); err != nil {
			if term.Err() != nil {
				fmt.Fprintln(out, "fakegame: SIGTERM before ready; exiting")
				return 0
			}
			fmt.Fprintln(stderr, "fakegame: ready:", err)
			return 1
		}
		fmt.Fprintln(out, "fakegame: ready")
	}
	if client != nil {
		client.Start(ctx)
	}

	// finish stops the helper goroutines, then prints the last line.
	finish := func(code int, msg string) int {
		cancel()
		wg.Wait()
		fmt.Fprintln(out, msg)
		return code
	}
	crash := after(o.crashSet, o.crashAfter)
	exit := after(o.exitSet, o.exitAfter)
	hang := after(o.hangSet, o.hangAfter)
	for {
		select {
		case <-term.Done():
			return finish(0, "fakegame: SIGTERM; exiting")
		case <-crash:
			if o.crashSignal != 0 {
				fmt.Fprintf(out, "fakegame: crashing by %v\n", o.crashSignal)
				dieBySignal(o.crashSignal)
			}
			return finish(o.exitCode, fmt.Sprintf("fakegame: crashing with exit code %d", o.exitCode))
		case <-exit:
			if client != nil {
				sctx, scancel := context.WithTimeout(ctx, 2*time.Second)
				_, err := client.Shutdown(sctx)
				scancel()
				if err != nil {
					fmt.Fprintln(stderr, "fakegame: shutdown:", err)
				}
			}
			return finish(0, "fakegame: exiting")
		case <-hang:
			hang = nil
			if client != nil {
				client.Close()
			}
			fmt.Fprintln(out, "fakegame: hanging (no more heartbeats)")
		}
	}
}

// after returns a channel that fires d from now, or nil (never) if !set.
func after(set bool, d time.Duration) <-chan time.Time {
	if !set {
		return nil
	}
	return time.After(d)
}

// appendMarker appends "<pid> <unix nanos>\n" to path in one write.
func appendMarker(path string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return fmt.Errorf("marker: %w", err)
	}
	_, err = fmt.Fprintf(f, "%d %d\n", os.Getpid(), time.Now().UnixNano())
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("marker: %w", err)
	}
	return nil
}

// tick prints "tick i" every period until ctx is done.
func tick(ctx context.Context, w io.Writer, period time.Duration) {
	t := time.NewTicker(period)
	defer t.Stop()
	for i := 1; ; i++ {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			fmt.Fprintf(w, "tick %d\n", i)
		}
	}
}

// leak allocates mib MiB now and every second until ctx is done, writes to
// every page so that it counts in RSS, and keeps it all referenced.
func leak(ctx context.Context, mib int) {
	var kept [][]byte
	page := os.Getpagesize()
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		b := make([]byte, mib<<20)
		for i := 0; i < len(b); i += page {
			b[i] = 1
		}
		kept = append(kept, b)
		select {
		case <-ctx.Done():
			runtime.KeepAlive(kept)
			return
		case <-t.C:
		}
	}
}

// lockedWriter serializes writes of the goroutines that print to stdout.
type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}
