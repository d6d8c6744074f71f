package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"dedi.dev/dedi/api"
	"dedi.dev/dedi/internal/lspm"
)

func runLSPM(args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("dedi lspm", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var cfg lspm.Config
	var allow, verified listFlag
	var portRange, gameUIDs, memLimit, logMax, logLevel string
	fs.StringVar(&cfg.Listen, "listen", "127.0.0.1:7701", "address of the REST API (port 0 picks one, written to DATA-DIR/lspm.addr)")
	fs.StringVar(&cfg.DataDir, "data-dir", "", "directory for process records and logs (required)")
	fs.StringVar(&cfg.MachineID, "machine-id", "", "this machine's ID (default: the host name)")
	var tokenFile string
	fs.StringVar(&cfg.Token, "token", "", "machine token (default: env "+api.EnvMachineToken+"); visible to local users in ps, prefer --token-file or the env")
	fs.StringVar(&tokenFile, "token-file", "", "file holding the machine token")
	fs.BoolVar(&cfg.Insecure, "insecure", false, "run without a machine token: anyone on the network controls this machine (local development only)")
	fs.StringVar(&cfg.VMMURL, "vmm-url", "", "VMM base URL to send status reports to")
	fs.DurationVar(&cfg.ReportInterval, "report-interval", 0, "status report period (default 2s)")
	fs.IntVar(&cfg.MaxProcesses, "max-processes", 4, "live processes this machine takes")
	fs.StringVar(&portRange, "port-range", "30000-30999", "ports handed to processes, MIN-MAX")
	fs.StringVar(&gameUIDs, "game-uids", "", "run each game server as a user and group of its own from MIN+1-MAX (MIN is the LSPM's sweeper), e.g. 2000000000-2000000999 (no user, group or subordinate id of the system may be in it), so that no game can signal or read another (needs root; default: the LSPM's user)")
	fs.StringVar(&cfg.Address, "address", "", "address game clients use to reach this machine (default: the listen host)")
	fs.StringVar(&cfg.SDKURL, "sdk-url", "", "LSPM URL given to processes (default: from --listen)")
	fs.Var(&allow, "allow", "executable a spawn may name, PATH[=SHA256] (repeatable)")
	fs.Var(&verified, "verified", "a pinned executable already hashed, as it was then: PATH=SHA256@DEV:INO:SIZE:MTIME_NS:CTIME_NS (repeatable; set by dedi init)")
	fs.DurationVar(&cfg.HealthPeriod, "health-period", 0, "default heartbeat period (default 2s)")
	fs.IntVar(&cfg.FailureThreshold, "failure-threshold", 0, "default missed heartbeats before a process is unhealthy (default 3)")
	fs.DurationVar(&cfg.StartTimeout, "start-timeout", 0, "default time to become ready (default 60s)")
	fs.StringVar(&memLimit, "memory-limit", "0", "default RSS limit per process, e.g. 512MiB (0: none)")
	fs.DurationVar(&cfg.Grace, "grace", 0, "default time between SIGTERM and SIGKILL (default 10s)")
	fs.StringVar(&logMax, "log-max-bytes", "8MiB", "cap of one process's log file (one rotated file is kept too)")
	fs.IntVar(&cfg.History, "history", 100, "ended processes kept, with their logs")
	fs.BoolVar(&cfg.DrainOnExit, "drain", false, "on SIGTERM, stop every game server before exiting (default: leave them running)")
	fs.IntVar(&cfg.ShimPool, "shim-pool", 2, "shims started ahead of need, to take their start off the spawn path")
	fs.DurationVar(&cfg.ShimPoolIdle, "shim-pool-idle", 0, "start pooled shims only once no spawn has taken one for this long (0: at once)")
	fs.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	if err := fs.Parse(args); err != nil {
		return errUsage
	}
	cfg.DefaultCommand = fs.Args()
	if tokenFile != "" {
		raw, err := os.ReadFile(tokenFile)
		if err != nil {
			return fmt.Errorf("--token-file: %w", err)
		}
		cfg.Token = strings.TrimSpace(string(raw))
	}
	if cfg.Token == "" {
		cfg.Token = os.Getenv(api.EnvMachineToken)
	}
	os.Unsetenv(api.EnvMachineToken)
	// Not dumpable: other processes of this user (the game servers) can
	// neither read this process's environment and memory through /proc nor
	// attach to it.
	_ = unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0)
	if cfg.MachineID == "" {
		h, err := os.Hostname()
		if err != nil {
			return fmt.Errorf("--machine-id not given and no host name: %w", err)
		}
		cfg.MachineID = h
	}
	if cfg.DataDir != "" {
		abs, err := filepath.Abs(cfg.DataDir)
		if err != nil {
			return err
		}
		cfg.DataDir = abs
	}
	var err error
	if cfg.PortMin, cfg.PortMax, err = lspm.ParsePortRange(portRange); err != nil {
		return fmt.Errorf("--port-range: %w", err)
	}
	if gameUIDs != "" {
		if cfg.GameUIDMin, cfg.GameUIDMax, err = lspm.ParseUIDRange(gameUIDs); err != nil {
			return fmt.Errorf("--game-uids: %w", err)
		}
	}
	if cfg.MemoryLimit, err = parseBytes(memLimit); err != nil {
		return fmt.Errorf("--memory-limit: %w", err)
	}
	if cfg.LogMaxBytes, err = parseBytes(logMax); err != nil {
		return fmt.Errorf("--log-max-bytes: %w", err)
	}
	for _, s := range allow {
		al, err := lspm.ParseAllowed(s)
		if err != nil {
			return fmt.Errorf("--allow %s: %w", s, err)
		}
		cfg.Allow = append(cfg.Allow, al)
	}
	for _, s := range verified {
		v, err := lspm.ParseVerified(s)
		if err != nil {
			return fmt.Errorf("--verified %s: %w", s, err)
		}
		cfg.Verified = append(cfg.Verified, v)
	}
	log, err := newLogger(stderr, logLevel)
	if err != nil {
		return err
	}
	if cfg.Insecure && cfg.Token == "" {
		log.Warn("running without a machine token (--insecure): anyone who reaches the API controls this machine")
	}
	agent, err := lspm.New(cfg, log, nil)
	if err != nil {
		return err
	}
	ctx, cancel := signalContext()
	defer cancel()
	return agent.Run(ctx)
}

// parseBytes reads a size such as 512MiB, 1GiB, 1048576.
func parseBytes(s string) (int64, error) {
	units := []struct {
		suffix string
		mult   int64
	}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"KB", 1000}, {"MB", 1000_000}, {"GB", 1000_000_000}, {"B", 1}}
	mult := int64(1)
	num := strings.TrimSpace(s)
	for _, u := range units {
		if strings.HasSuffix(num, u.suffix) {
			num, mult = strings.TrimSpace(strings.TrimSuffix(num, u.suffix)), u.mult
			break
		}
	}
	n, err := strconv.ParseInt(num, 10, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("%q: want a size such as 512MiB", s)
	}
	return n * mult, nil
}
