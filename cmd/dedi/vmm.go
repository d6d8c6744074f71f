package main

import (
	"crypto/sha256"
	"encoding/hex"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"dedi.dev/dedi/api"
	"dedi.dev/dedi/internal/lspm"
	"dedi.dev/dedi/internal/provider"
	"dedi.dev/dedi/internal/provider/docker"
	"dedi.dev/dedi/internal/provider/local"
	"dedi.dev/dedi/internal/provider/qemu"
	"dedi.dev/dedi/internal/provider/sim"
	"dedi.dev/dedi/internal/vmm"
)

// vmmFlags are the flags "dedi vmm" and "dedi up" share.
type vmmFlags struct {
	cfg         vmm.Config
	logLevel    string
	firstIP     int
	lastIP      int
	portBase    int
	gameUIDBase int    // --local-game-uids
	simDir      string // --sim-provider-dir: the sim provider, for load tests
	pprof       string // --pprof-listen
	docker      docker.Config
	qemu        qemu.Config
	closers     []io.Closer // providers with connections to close
}

func (f *vmmFlags) register(fs *flag.FlagSet, defListen, defLevel string) {
	fs.StringVar(&f.cfg.Listen, "listen", defListen, "address of the REST API")
	fs.StringVar(&f.cfg.DataDir, "data-dir", defaultDataDir(), "where the VMM keeps its store, its admin token and the local machines")
	fs.StringVar(&f.cfg.URL, "url", "", "the VMM's URL as machines reach it (default: from --listen)")
	fs.DurationVar(&f.cfg.ReportInterval, "report-interval", 0, "LSPM status report period (default 2s)")
	fs.DurationVar(&f.cfg.BootTimeout, "boot-timeout", 0, "time a new machine has to report (default 60s)")
	fs.IntVar(&f.firstIP, "local-first-host", 10, "the local provider's first machine address is 127.0.0.N")
	fs.IntVar(&f.lastIP, "local-last-host", 0, "the local provider's last machine address is 127.0.0.N (default: the one before the qemu provider's first, or 250)")
	fs.IntVar(&f.portBase, "local-port-base", 30000, "the local provider's first game port")
	fs.IntVar(&f.gameUIDBase, "local-game-uids", 0, "the local provider's machines run each game as a user of its own, from users BASE up (1,024 per machine address, e.g. 2000000000; needs root, and game files readable by other users; default: games run as the VMM's user)")
	fs.StringVar(&f.logLevel, "log-level", defLevel, "debug, info, warn or error")
	fs.TextVar(&f.docker.FirstAddress, "docker-first-address", netip.MustParseAddr("127.0.1.1"), "the docker provider's first machine address (its machines take the next ones)")
	fs.IntVar(&f.docker.Machines, "docker-machines", 100, "the most machines the docker provider runs at once")
	fs.IntVar(&f.docker.PortBase, "docker-port-base", 10000, "the docker provider's first game port (100 per machine)")
	fs.StringVar(&f.docker.Instance, "docker-instance", "", "labels this VMM's containers apart from other VMMs' on the engine (default: from --data-dir)")
	fs.StringVar(&f.qemu.Binary, "qemu-binary", "qemu-system-x86_64", "the qemu provider's emulator")
	fs.StringVar(&f.qemu.Accel, "qemu-accel", "auto", "the qemu provider's accelerator: auto (KVM if a probe boot works, else TCG), kvm or tcg")
	fs.IntVar(&f.qemu.MemoryMiB, "qemu-memory", 256, "memory of each qemu VM, MiB")
	fs.IntVar(&f.qemu.CPUs, "qemu-cpus", 1, "vCPUs of each qemu VM")
	fs.IntVar(&f.qemu.FirstHost, "qemu-first-host", 130, "the qemu provider's first machine address is 127.0.0.N (after the local provider's)")
	fs.IntVar(&f.qemu.LastHost, "qemu-last-host", 250, "the qemu provider's last machine address is 127.0.0.N")
	fs.IntVar(&f.qemu.PortBase, "qemu-port-base", 45000, "the qemu provider's first game port (after the local provider's)")
	fs.IntVar(&f.qemu.PortsPerMachine, "qemu-ports-per-machine", 100, "game ports forwarded to each qemu VM (TCP and UDP)")
	fs.StringVar(&f.pprof, "pprof-listen", "", "serve Go's profiles (net/http/pprof) on this address, loopback only; off by default")
	fs.StringVar(&f.simDir, "sim-provider-dir", "", "load tests only: add the simulated provider \"sim\" over DIR (test/loadgen)")
}

// build makes the VMM with its providers.
func (f *vmmFlags) build(stderr io.Writer) (*vmm.VMM, *local.Local, *slog.Logger, error) {
	dir, err := filepath.Abs(f.cfg.DataDir)
	if err != nil {
		return nil, nil, nil, err
	}
	f.cfg.DataDir = dir
	f.cfg.AdminToken = os.Getenv(api.EnvAdminToken)
	os.Unsetenv(api.EnvAdminToken)
	_ = unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0) // keep tokens out of /proc for other processes
	log, err := newLogger(stderr, f.logLevel)
	if err != nil {
		return nil, nil, nil, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, nil, nil, err
	}
	if f.lastIP == 0 {
		f.lastIP = 250
		if f.qemu.FirstHost > f.firstIP {
			f.lastIP = f.qemu.FirstHost - 1
		}
	}
	lc := local.Config{Dir: filepath.Join(dir, "machines"),
		Hosts:       provider.Hosts{FirstHost: f.firstIP, LastHost: f.lastIP, PortBase: f.portBase},
		GameUIDBase: f.gameUIDBase, Logger: log.With("provider", "local")}
	if f.gameUIDBase != 0 {
		lo, hi := lc.GameUIDRange()
		if err := lspm.CheckUIDRange(lo, hi); err != nil {
			return nil, nil, nil, fmt.Errorf("--local-game-uids %d: users %d-%d: %w", f.gameUIDBase, lo, hi, err)
		}
	}
	loc, err := local.New(lc)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("local provider: %w", err)
	}
	f.cfg.Providers = map[string]provider.Provider{"local": loc}
	if f.docker.Instance == "" { // stable across restarts on one data dir
		h := sha256.Sum256([]byte(dir))
		f.docker.Instance = "vmm-" + hex.EncodeToString(h[:6])
	}
	f.docker.Logger = log
	dk, err := docker.New(f.docker) // contacts no engine: a VMM runs without Docker
	if err != nil {
		loc.Close()
		return nil, nil, nil, err
	}
	f.closers = append(f.closers, dk)
	f.cfg.Providers["docker"] = dk
	f.qemu.Dir, f.qemu.Logger = filepath.Join(dir, "qemu"), log
	qm, err := qemu.New(f.qemu) // runs no qemu until a qemu fleet needs a machine
	if err != nil {
		loc.Close()
		return nil, nil, nil, err
	}
	f.cfg.Providers["qemu"] = qm
	if f.simDir != "" {
		f.cfg.Providers["sim"] = sim.New(f.simDir)
	}
	v, err := vmm.New(f.cfg, log, nil)
	if err != nil {
		loc.Close()
		f.close()
		return nil, nil, nil, err
	}
	if f.pprof != "" {
		ln, err := servePprof(f.pprof, log)
		if err != nil {
			loc.Close()
			f.close()
			return nil, nil, nil, err
		}
		f.closers = append(f.closers, ln)
	}
	return v, loc, log, nil
}

// close closes what build opened besides the local provider.
func (f *vmmFlags) close() {
	for _, c := range f.closers {
		_ = c.Close()
	}
}

// servePprof serves Go's profiles on a loopback address, for measuring a
// VMM under load (go tool pprof http://ADDR/debug/pprof/profile).
func servePprof(addr string, log *slog.Logger) (net.Listener, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil || !ap.Addr().IsLoopback() {
		return nil, fmt.Errorf("--pprof-listen %q: want a loopback address and port, such as 127.0.0.1:6060", addr)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("--pprof-listen: %w", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	log.Info("profiles served", "addr", ln.Addr().String())
	go func() { _ = http.Serve(ln, mux) }() // ends when close() closes ln
	return ln, nil
}

func runVMM(args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("dedi vmm", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var f vmmFlags
	f.register(fs, "127.0.0.1:7700", "info")
	if err := fs.Parse(args); err != nil {
		return errUsage
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("dedi vmm takes no arguments, got %q", fs.Args())
	}
	v, loc, _, err := f.build(stderr)
	if err != nil {
		return err
	}
	defer loc.Close()
	defer f.close()
	ctx, cancel := signalContext()
	defer cancel()
	return v.Run(ctx)
}
