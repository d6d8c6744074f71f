package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"dedi.dev/dedi/api"
)

// runUp is the quick start: a VMM with the local provider and a demo fleet
// running the example echo game server, all from one command; Ctrl-C stops
// everything it started.
func runUp(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("dedi up", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var f vmmFlags
	f.register(fs, "127.0.0.1:7700", "warn")
	if err := fs.Parse(args); err != nil {
		return errUsage
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("dedi up takes no arguments, got %q", fs.Args())
	}
	v, loc, log, err := f.build(stderr)
	if err != nil {
		return err
	}
	defer loc.Close()
	defer f.close()
	self, err := os.Executable()
	if err != nil {
		return err
	}
	ctx, cancel := signalContext()
	defer cancel()
	runErr := make(chan error, 1)
	go func() { runErr <- v.Run(ctx) }()

	url := "http://" + v.Addr()
	tokenPath := filepath.Join(f.cfg.DataDir, "admin-token")
	token, err := os.ReadFile(tokenPath)
	tokenHint := "$(cat " + tokenPath + ")"
	if f.cfg.AdminToken != "" {
		token, tokenPath, tokenHint, err = []byte(f.cfg.AdminToken), "the DEDI_TOKEN environment variable", "<your DEDI_TOKEN>", nil
	}
	if err != nil {
		cancel()
		<-runErr
		return err
	}
	client := api.NewClient(url, string(trimNL(token)), &http.Client{Timeout: 10 * time.Second})
	demo := api.Fleet{Name: "demo", Provider: "local", Command: []string{self, "example", "echo"},
		ProcessesPerMachine: 4, Ports: []string{"game"}, Placement: api.PlacementPacked,
		Scaling: api.Scaling{MinMachines: 0, MaxMachines: 4, IdleShutdownSeconds: 60}}
	if _, err := client.CreateFleet(ctx, demo); err != nil {
		var p *api.Problem
		if !errors.As(err, &p) || p.Code != api.CodeExists {
			cancel()
			<-runErr
			return fmt.Errorf("create the demo fleet: %w", err)
		}
	}
	fmt.Fprintf(stdout, `dedi is up: the VMM at %s, with the local provider and the fleet "demo"
(the example UDP echo game server, 4 per machine, machines made on demand).
The admin token is in %s

Try it (in another shell):
  export DEDI_ADDR=%s DEDI_TOKEN=%s
  curl -s -H "Authorization: Bearer $DEDI_TOKEN" -X POST "$DEDI_ADDR/v1/processes?wait=ready" -d '{"fleet":"demo"}'
       # or: dedi process start --fleet demo --wait
  # note "address" and "ports" in the answer, e.g. 127.0.0.10 and 30000, then:
  bash -c 'exec 3<>/dev/udp/127.0.0.10/30000; echo hello >&3; timeout 1 head -1 <&3'   # echoes: hello
  dedi process list        # or: curl -s -H "Authorization: Bearer $DEDI_TOKEN" $DEDI_ADDR/v1/processes
  dedi events              # the stream of changes

Ctrl-C stops dedi and every machine and game server it started.
`, url, tokenPath, url, tokenHint)

	err = <-runErr
	// Leave nothing behind: every local machine drains and goes.
	dctx, dcancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer dcancel()
	machines, lerr := loc.List(dctx, "")
	if lerr != nil {
		log.Warn("list machines to stop", "err", lerr)
	}
	for _, m := range machines {
		if derr := loc.Delete(dctx, m.ProviderID); derr != nil {
			log.Warn("stop machine", "machine", m.MachineID, "err", derr)
		}
	}
	return err
}

func trimNL(b []byte) []byte {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == '\r' || b[len(b)-1] == ' ') {
		b = b[:len(b)-1]
	}
	return b
}

func defaultDataDir() string {
	if d := os.Getenv("DEDI_DATA_DIR"); d != "" {
		return d
	}
	if d, err := os.UserHomeDir(); err == nil {
		return filepath.Join(d, ".dedi")
	}
	return ".dedi"
}
