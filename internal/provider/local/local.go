// Package local is the provider whose machines are `dedi lspm` child
// processes on this host, each on a loopback address of its own
// (127.0.0.N) with a game port range of its own.
//
// It owns the state dir Config.Dir:
//
//	DIR/lock                         serializes the choice of N between providers on DIR
//	DIR/machines/<id>/machine.json   the machine: id, fleet, N, ports, LSPM pid and start time
//	DIR/machines/<id>/lspm.log       the LSPM's stdout and stderr
//	DIR/machines/<id>/lspm/          the LSPM's data dir (process records, logs)
//
// The LSPMs run in sessions of their own and outlive the provider (a VMM
// restart finds them through machine.json); only Delete stops them.
package local

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"dedi.dev/dedi/api"
	"dedi.dev/dedi/internal/names"
	"dedi.dev/dedi/internal/procstat"
	"dedi.dev/dedi/internal/provider"
	"dedi.dev/dedi/internal/provider/statedir"
)

var _ provider.Provider = (*Local)(nil)

// Config configures a Local provider. Zero fields take their defaults.
type Config struct {
	// Dir is the state dir (required).
	Dir string
	// Binary is the dedi binary run as "Binary lspm ..."; default the
	// running executable.
	Binary string
	// Hosts places the machines on 127.0.0.N, each with its LSPM on
	// LSPMPort and its own game ports (provider.Hosts; its defaults).
	provider.Hosts
	// GameUIDBase, when set (the VMM runs as root), makes every machine's
	// LSPM run each game as a user of its own (lspm --game-uids): the
	// machine on 127.0.0.N takes the GameUIDStride users from
	// GameUIDBase + (N - FirstHost) * GameUIDStride, so no two machines of
	// the host share one (an LSPM kills every process of a game's user
	// when the game ends). The game's files must be readable by other
	// users. Zero: games run as the LSPM's user, the VMM's.
	GameUIDBase int
	// Logger receives the provider's logs (default: discarded).
	Logger *slog.Logger
}

// GameUIDStride is how many users of GameUIDBase each machine takes: its
// LSPM's sweeper and up to 1,023 games (a fleet runs at most 1,000 per
// machine).
const GameUIDStride = 1024

// GameUIDs is the --game-uids range of the machine on 127.0.0.N, or ""
// without GameUIDBase.
func (c Config) GameUIDs(n int) string {
	if c.GameUIDBase == 0 {
		return ""
	}
	lo := c.GameUIDBase + (n-c.FirstHost)*GameUIDStride
	return fmt.Sprintf("%d-%d", lo, lo+GameUIDStride-1)
}

// GameUIDRange is every user the provider's machines may take with
// GameUIDBase, for checking it against the system's users.
func (c Config) GameUIDRange() (lo, hi int) {
	c.Hosts = c.Hosts.WithDefaults()
	return c.GameUIDBase, c.GameUIDBase + (c.LastHost-c.FirstHost+1)*GameUIDStride - 1
}

func (c Config) withDefaults() Config {
	c.Hosts = c.Hosts.WithDefaults()
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return c
}

// Validate reports a configuration the provider cannot run with.
func (c Config) Validate() error {
	switch {
	case c.Dir == "":
		return errors.New("local provider: Dir is required")
	}
	if err := c.Hosts.Validate(1); err != nil {
		return fmt.Errorf("local provider: %w", err)
	}
	if c.GameUIDBase != 0 && os.Geteuid() != 0 {
		return errors.New("local provider: game users need the VMM to run as root")
	}
	return nil
}

// Local creates machines as `dedi lspm` processes. Its methods are safe
// for concurrent use; several Locals (in this or other processes) may
// share a Dir.
type Local struct {
	cfg Config
	log *slog.Logger

	// wake's read end becomes readable when Close closes its write end:
	// the reapers stop waiting and leave the machines running.
	wakeR, wakeW int
	reapers      sync.WaitGroup

	mu     sync.Mutex // serializes Create and Close
	closed bool
}

// New returns a provider over cfg.Dir, creating it if needed.
func New(cfg Config) (*Local, error) {
	cfg = cfg.withDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	dir, err := filepath.Abs(cfg.Dir)
	if err != nil {
		return nil, err
	}
	cfg.Dir = dir
	if cfg.Binary == "" {
		if cfg.Binary, err = os.Executable(); err != nil {
			return nil, fmt.Errorf("local provider: find the dedi binary: %w", err)
		}
	}
	if err := os.MkdirAll(filepath.Join(dir, "machines"), 0o700); err != nil {
		return nil, fmt.Errorf("local provider: %w", err)
	}
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		return nil, fmt.Errorf("local provider: %w", err)
	}
	return &Local{cfg: cfg, log: cfg.Logger.With("provider", "local"), wakeR: p[0], wakeW: p[1]}, nil
}

// Name is "local".
func (l *Local) Name() string { return "local" }

// Close stops watching the LSPMs this Local started and waits for its
// goroutines. The machines keep running.
func (l *Local) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	l.mu.Unlock()
	_ = unix.Close(l.wakeW)
	l.reapers.Wait()
	return unix.Close(l.wakeR)
}

// machineRecord is DIR/machines/<id>/machine.json.
type machineRecord struct {
	MachineID string    `json:"machineId"`
	Fleet     string    `json:"fleet"`
	Address   string    `json:"address"`
	Host      int       `json:"host"` // N of 127.0.0.N
	PortMin   int       `json:"portMin"`
	PortMax   int       `json:"portMax"`
	LSPMURL   string    `json:"lspmUrl"`
	CreatedAt time.Time `json:"createdAt"`
	PID       int       `json:"pid,omitempty"`      // the LSPM, once started
	PIDStart  uint64    `json:"pidStart,omitempty"` // its start time (/proc/<pid>/stat field 22)
}

func (r machineRecord) machine() provider.Machine {
	return provider.Machine{ProviderID: r.MachineID, MachineID: r.MachineID, Fleet: r.Fleet,
		Address: r.Address, LSPMURL: r.LSPMURL, CreatedAt: r.CreatedAt}
}

func (l *Local) machineDir(id string) string { return filepath.Join(l.cfg.Dir, "machines", id) }

// Create starts the machine's LSPM and returns once the process runs.
func (l *Local) Create(ctx context.Context, spec provider.Spec) (provider.Machine, error) {
	switch {
	case !names.ID(spec.MachineID):
		return provider.Machine{}, fmt.Errorf("local provider: invalid machine id %q", spec.MachineID)
	case spec.Token == "":
		return provider.Machine{}, fmt.Errorf("local provider: machine %s has no token", spec.MachineID)
	case spec.Image != "":
		return provider.Machine{}, fmt.Errorf("local provider: machine %s: images are not supported (image %q)", spec.MachineID, spec.Image)
	}
	if err := ctx.Err(); err != nil {
		return provider.Machine{}, err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return provider.Machine{}, errors.New("local provider: closed")
	}
	unlock, err := l.lockDir()
	if err != nil {
		return provider.Machine{}, err
	}
	defer unlock()

	n, err := l.freeHost()
	if err != nil {
		return provider.Machine{}, fmt.Errorf("create %s: %w", spec.MachineID, err)
	}
	dir := l.machineDir(spec.MachineID)
	if err := os.Mkdir(dir, 0o700); err != nil {
		return provider.Machine{}, fmt.Errorf("create %s: %w", spec.MachineID, err)
	}
	addr := "127.0.0." + strconv.Itoa(n)
	listen := net.JoinHostPort(addr, strconv.Itoa(l.cfg.LSPMPort))
	lo, hi := l.cfg.Ports(n)
	rec := machineRecord{MachineID: spec.MachineID, Fleet: spec.Fleet, Address: addr, Host: n,
		PortMin: lo, PortMax: hi, LSPMURL: "http://" + listen, CreatedAt: time.Now().UTC().Round(0)}
	if err := writeRecord(dir, rec); err != nil {
		_ = os.RemoveAll(dir)
		return provider.Machine{}, fmt.Errorf("create %s: %w", spec.MachineID, err)
	}
	cmd, err := l.start(dir, listen, addr, lo, hi, n, spec)
	if err != nil {
		_ = os.RemoveAll(dir)
		return provider.Machine{}, fmt.Errorf("create %s: start lspm: %w", spec.MachineID, err)
	}
	rec.PID = cmd.Process.Pid
	_, rec.PIDStart, err = procstat.Stat(rec.PID) // our unreaped child: the pid is still its
	if err == nil {
		err = writeRecord(dir, rec)
	}
	if err != nil {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		_ = os.RemoveAll(dir)
		return provider.Machine{}, fmt.Errorf("create %s: %w", spec.MachineID, err)
	}
	l.reapers.Add(1)
	go l.reap(cmd, l.log.With("machine", spec.MachineID, "pid", rec.PID))
	l.log.Info("machine started", "machine", spec.MachineID, "fleet", spec.Fleet, "lspm", rec.LSPMURL, "pid", rec.PID)
	return rec.machine(), nil
}

// start runs the LSPM in a session of its own, its output appended to
// lspm.log and the token in its environment only.
func (l *Local) start(dir, listen, addr string, lo, hi, n int, spec provider.Spec) (*exec.Cmd, error) {
	flags := provider.LSPMFlags{Listen: listen, Address: addr, DataDir: filepath.Join(dir, "lspm"),
		MachineID: spec.MachineID, PortMin: lo, PortMax: hi, Spec: spec, Command: spec.Command}
	if uids := l.cfg.GameUIDs(n); uids != "" {
		flags.Extra = append(flags.Extra, "--game-uids", uids)
	}
	args := flags.Args()
	logf, err := os.OpenFile(filepath.Join(dir, "lspm.log"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer logf.Close() // the child has its own copy
	cmd := exec.Command(l.cfg.Binary, args...)
	cmd.Dir = dir
	cmd.Env = []string{api.EnvMachineToken + "=" + spec.Token}
	for _, k := range []string{"PATH", "HOME"} {
		if v, ok := os.LookupEnv(k); ok {
			cmd.Env = append(cmd.Env, k+"="+v)
		}
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	return cmd, nil
}

// reap waits for an LSPM this Local started to exit, and collects it; it
// gives up, leaving the LSPM running, when the Local closes.
func (l *Local) reap(cmd *exec.Cmd, log *slog.Logger) {
	defer l.reapers.Done()
	pidfd, err := unix.PidfdOpen(cmd.Process.Pid, 0)
	if err != nil {
		log.Warn("cannot watch the LSPM; it is collected only when this process exits", "err", err)
		return
	}
	defer unix.Close(pidfd)
	for {
		fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}, {Fd: int32(l.wakeR), Events: unix.POLLIN}}
		if _, err := unix.Poll(fds, -1); err != nil && !errors.Is(err, unix.EINTR) {
			log.Warn("watch LSPM", "err", err)
			return
		}
		if fds[0].Revents != 0 {
			err := cmd.Wait()
			log.Info("LSPM exited", "status", fmt.Sprint(err))
			return
		}
		if fds[1].Revents != 0 {
			return
		}
	}
}

// lockDir takes DIR/lock, which serializes the choice of hosts between
// every Local on the dir.
func (l *Local) lockDir() (unlock func(), err error) {
	unlock, err = statedir.Lock(l.cfg.Dir)
	if err != nil {
		return nil, fmt.Errorf("local provider: %w", err)
	}
	return unlock, nil
}

// freeHost picks N for a new machine: one no machine of the dir has (even
// one whose LSPM died: its games may still hold its ports), whose LSPM
// port nobody else has bound.
func (l *Local) freeHost() (int, error) {
	recs, err := l.records()
	if err != nil {
		return 0, err
	}
	used := map[int]bool{}
	for _, r := range recs {
		used[r.Host] = true
	}
	return statedir.FreeHost(l.cfg.FirstHost, l.cfg.LastHost, l.cfg.LSPMPort, func(n int) bool { return used[n] })
}

// records reads every machine record of the dir.
func (l *Local) records() ([]machineRecord, error) {
	recs, err := statedir.All[machineRecord](filepath.Join(l.cfg.Dir, "machines"), l.log)
	if err != nil {
		return nil, fmt.Errorf("local provider: %w", err)
	}
	return recs, nil
}

func readRecord(dir string) (machineRecord, error) { return statedir.Read[machineRecord](dir) }

func writeRecord(dir string, r machineRecord) error { return statedir.Write(dir, r) }

// List returns the machines of fleet ("" for all), including those whose
// LSPM died: they still are machines the VMM must delete.
func (l *Local) List(ctx context.Context, fleet string) ([]provider.Machine, error) {
	recs, err := l.records()
	if err != nil {
		return nil, err
	}
	var ms []provider.Machine
	for _, r := range recs {
		if fleet == "" || r.Fleet == fleet {
			ms = append(ms, r.machine())
		}
	}
	sort.Slice(ms, func(i, j int) bool { return ms[i].CreatedAt.Before(ms[j].CreatedAt) })
	return ms, nil
}

// Grace is how long Delete lets an LSPM drain (stop its game servers)
// after SIGTERM before it kills it.
const Grace = 15 * time.Second

// Delete stops the machine's LSPM (SIGTERM: it drains its game servers;
// SIGKILL after Grace), kills whatever game server is left, and removes
// the machine's dir. When ctx ends during the grace, the LSPM is killed at
// once. A machine that is already gone is not an error.
func (l *Local) Delete(ctx context.Context, providerID string) error {
	if !names.ID(providerID) {
		return nil // it cannot name a machine of ours
	}
	dir := l.machineDir(providerID)
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	log := l.log.With("machine", providerID)
	rec, err := readRecord(dir)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		log.Warn("unreadable machine record; removing what is left", "err", err)
	}
	if p, ok := openProc(rec.PID, rec.PIDStart); ok {
		_ = p.signal(unix.SIGTERM)
		if !p.wait(ctx, Grace) {
			log.Warn("LSPM did not stop; killing it", "pid", rec.PID)
			_ = p.signal(unix.SIGKILL)
			p.wait(context.Background(), 5*time.Second)
		}
		p.close()
	}
	reapChild(rec.PID, rec.PIDStart)
	if n := killGames(filepath.Join(dir, "lspm"), providerID, rec.LSPMURL); n > 0 {
		log.Warn("killed game servers the LSPM left", "count", n)
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("delete %s: %w", providerID, err)
	}
	log.Info("machine deleted")
	return nil
}
