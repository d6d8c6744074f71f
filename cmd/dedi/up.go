package main

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"dedi.dev/dedi/internal/lspm"
)

// runUp is the quick start: one machine's LSPM hosting the example echo
// game server, with a token kept in the data dir. The VMM joins it in the
// next milestone.
func runUp(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("dedi up", flag.ContinueOnError)
	fs.SetOutput(stderr)
	dataDir := fs.String("data-dir", defaultDataDir(), "where dedi keeps its state, token and logs")
	listen := fs.String("listen", "127.0.0.1:7701", "address of the REST API")
	logLevel := fs.String("log-level", "warn", "debug, info, warn or error")
	if err := fs.Parse(args); err != nil {
		return errUsage
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("dedi up takes no arguments, got %q", fs.Args())
	}
	dir, err := filepath.Abs(*dataDir)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	tokenPath := filepath.Join(dir, "machine-token")
	token, err := loadOrCreateToken(tokenPath)
	if err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	log, err := newLogger(stderr, *logLevel)
	if err != nil {
		return err
	}
	cfg := lspm.Config{
		Listen: *listen, DataDir: filepath.Join(dir, "lspm"), MachineID: "local-1", Token: token,
		DefaultCommand: []string{self, "example", "echo"}, MaxProcesses: 8,
		PortMin: 30000, PortMax: 30999,
		// Ctrl-C stops what "dedi up" started: no game server is left behind.
		DrainOnExit: true, Grace: 3 * time.Second,
	}
	_ = unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0) // as dedi lspm
	agent, err := lspm.New(cfg, log, nil)
	if err != nil {
		return err
	}
	host, _, _ := net.SplitHostPort(agent.Addr())
	url := "http://" + agent.Addr()
	fmt.Fprintf(stdout, `dedi is up: an LSPM at %s hosting the example UDP echo game server.
The machine token is in %s

Try it (in another shell):
  TOKEN=$(cat %s)
  curl -s -H "Authorization: Bearer $TOKEN" -X POST %s/v1/processes -d '{"params":{"map":"arena"}}'
  curl -s -H "Authorization: Bearer $TOKEN" %s/v1/processes      # note the game port, e.g. 30000
  bash -c 'exec 3<>/dev/udp/%s/30000; echo hello >&3; timeout 1 head -1 <&3'   # echoes: hello
  curl -s -H "Authorization: Bearer $TOKEN" "%s/v1/processes/ID/logs?tail=20"

Ctrl-C stops dedi and every game server it started.
`, url, tokenPath, tokenPath, url, url, host, url)
	ctx, cancel := signalContext()
	defer cancel()
	return agent.Run(ctx)
}

func defaultDataDir() string {
	if d, err := os.UserHomeDir(); err == nil {
		return filepath.Join(d, ".dedi")
	}
	return ".dedi"
}

// loadOrCreateToken reads a token file, or writes a new random token there.
func loadOrCreateToken(path string) (string, error) {
	raw, err := os.ReadFile(path)
	if err == nil {
		tok := strings.TrimSpace(string(raw))
		if len(tok) < 16 {
			return "", fmt.Errorf("token file %s holds less than 16 characters", path)
		}
		return tok, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return "", err
	}
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	tok := hex.EncodeToString(b)
	if err := os.WriteFile(path, []byte(tok+"\n"), 0o600); err != nil {
		return "", err
	}
	return tok, nil
}
