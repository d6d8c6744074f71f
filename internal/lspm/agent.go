// Package lspm is the local server process manager: the agent on every
// machine that spawns game server processes on REST request, watches them by
// heartbeat, kills hung ones, records how each one ended with its evidence,
// and reports the machine's state to the VMM. Game servers outlive it: each
// runs under a shim of its own (see shim.go), so the LSPM can be killed,
// restarted or upgraded without a game noticing.
package lspm

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
	"golang.org/x/sys/unix"

	"dedi.dev/dedi/api"
	"dedi.dev/dedi/internal/clock"
	"dedi.dev/dedi/internal/rest"
)

// Agent is one LSPM.
type Agent struct {
	cfg       Config
	log       *slog.Logger
	clock     clock.Clock
	allow     *allowList
	hardware  api.Hardware
	startedAt time.Time
	address   string
	sdkURL    string
	machineTH string // hash of the machine token

	cmds     chan func(*table)
	changed  chan struct{}
	loopDone chan struct{}
	table    *table  // handed to the loop in Run; not touched elsewhere
	adopted  []*proc // processes found alive at start, watched once Run starts
	ln       net.Listener
	lock     *os.File // flock on DataDir/lock: one LSPM per data dir
	bootID   string
	shims    *shimPool
	persist  *persister
	runCtx   context.Context
	wg       sync.WaitGroup

	// wrapAgonesREST, set by tests before Run, wraps the REST handler of
	// each process's Agones SDK (to hold a request in flight).
	wrapAgonesREST func(http.Handler) http.Handler
}

// New prepares an LSPM: it validates cfg, binds the listener, and reads back
// the processes a previous run left (they are re-adopted when Run starts).
func New(cfg Config, log *slog.Logger, clk clock.Clock) (*Agent, error) {
	cfg = cfg.withDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if clk == nil {
		clk = clock.Real{}
	}
	if cfg.ShimPath == "" {
		exe, err := os.Executable()
		if err != nil {
			return nil, fmt.Errorf("find own executable for the shim: %w", err)
		}
		cfg.ShimPath = exe
	}
	allow, err := newAllowList(cfg.DefaultCommand, cfg.Allow)
	if err != nil {
		return nil, err
	}
	if n := allow.seed(cfg.Verified); n < len(cfg.Verified) {
		log.Warn("some --verified files are not pinned executables with that hash; they are hashed at their first spawn", "taken", n, "given", len(cfg.Verified))
	}
	a := &Agent{
		cfg: cfg, log: log.With("machine", cfg.MachineID), clock: clk, allow: allow,
		hardware: readHardware(), startedAt: clk.Now().UTC(),
		cmds: make(chan func(*table), 64), changed: make(chan struct{}, 1), loopDone: make(chan struct{}),
	}
	if cfg.Token != "" {
		a.machineTH = rest.TokenHash(cfg.Token)
	}
	a.shims = newShimPool(cfg.ShimPath, cfg.ShimPool, cfg.ShimPoolIdle, a.log)
	a.persist = newPersister(func(dir string, err error) {
		a.log.Error("persist process dir", "dir", dir, "err", err)
	})
	if err := os.MkdirAll(a.procsDir(), 0o700); err != nil {
		return nil, fmt.Errorf("data dir: %w", err)
	}
	lock, err := os.OpenFile(filepath.Join(cfg.DataDir, "lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("data dir: %w", err)
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lock.Close()
		return nil, fmt.Errorf("data dir %s is in use by another LSPM (%v)", cfg.DataDir, err)
	}
	a.lock = lock
	if raw, err := os.ReadFile("/proc/sys/kernel/random/boot_id"); err == nil {
		a.bootID = strings.TrimSpace(string(raw))
	}
	a.table = &table{a: a, live: map[string]*proc{}, endedByID: map[string]*proc{},
		byToken: map[string]string{}, ports: map[int]string{}}
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		lock.Close()
		return nil, fmt.Errorf("listen %s: %w", cfg.Listen, err)
	}
	a.ln = ln
	host, port, _ := net.SplitHostPort(ln.Addr().String())
	sdkHost := host
	if ip := net.ParseIP(host); ip == nil || ip.IsUnspecified() {
		sdkHost = "127.0.0.1"
	}
	a.address = cfg.Address
	if a.address == "" {
		a.address = sdkHost
	}
	a.sdkURL = cfg.SDKURL
	if a.sdkURL == "" {
		a.sdkURL = "http://" + net.JoinHostPort(sdkHost, port)
	}
	if cfg.GameUIDMin != 0 {
		if err := mountMqueue(); err != nil {
			a.log.Warn("POSIX message queues a game leaves cannot be found, so they outlive it", "err", err)
		}
	}
	if a.adopted, err = a.table.load(); err != nil {
		ln.Close()
		lock.Close()
		return nil, fmt.Errorf("read process records: %w", err)
	}
	return a, nil
}

// Addr is the address the API listens on.
func (a *Agent) Addr() string { return a.ln.Addr().String() }

func (a *Agent) procsDir() string { return filepath.Join(a.cfg.DataDir, "processes") }

// healthOf resolves a process's health settings against the defaults.
func (a *Agent) healthOf(h api.Health) (period time.Duration, threshold int, startTimeout time.Duration) {
	period, threshold, startTimeout = a.cfg.HealthPeriod, a.cfg.FailureThreshold, a.cfg.StartTimeout
	if h.PeriodSeconds > 0 {
		period = time.Duration(h.PeriodSeconds * float64(time.Second))
	}
	if h.FailureThreshold > 0 {
		threshold = h.FailureThreshold
	}
	if h.StartTimeoutSeconds > 0 {
		startTimeout = time.Duration(h.StartTimeoutSeconds * float64(time.Second))
	}
	return
}

// Run serves until ctx is done. Game servers keep running when it returns,
// unless cfg.DrainOnExit, in which case each is stopped first.
func (a *Agent) Run(ctx context.Context) error {
	runCtx, cancel := context.WithCancel(context.Background())
	a.runCtx = runCtx
	defer func() {
		cancel()
		a.wg.Wait()
		a.lock.Close()
	}()
	loopCtx, stopLoop := context.WithCancel(context.Background())
	loopExited := make(chan struct{})
	go func() {
		defer close(loopExited)
		a.loop(loopCtx)
	}()
	defer func() {
		stopLoop()
		<-loopExited
	}()

	// The records read at start are adopted on the loop: its health clock
	// already runs and owns every proc.
	adopted := a.adopted
	a.adopted = nil
	if err := a.do(func(t *table) {
		for _, p := range adopted {
			a.adopt(t, p)
		}
	}); err != nil {
		return err
	}

	if err := writeFileAtomic(filepath.Join(a.cfg.DataDir, "lspm.addr"), []byte(a.Addr())); err != nil {
		return err
	}
	srv := &http.Server{Handler: a.Handler(), ReadHeaderTimeout: 10 * time.Second, ReadTimeout: 30 * time.Second,
		IdleTimeout: 2 * time.Minute, ErrorLog: slog.NewLogLogger(a.log.Handler(), slog.LevelWarn)}
	gw := rest.Serve(srv, a.ln)
	a.goOwned(a.sampleMemory)
	a.goOwned(a.shims.fill)
	a.goOwned(a.allow.prewarm)
	a.goOwned(a.persist.run)
	if a.cfg.VMMURL != "" {
		// The first report goes at once: it is how the VMM learns that a
		// new machine booted.
		select {
		case a.changed <- struct{}{}:
		default:
		}
		a.goOwned(a.report)
	}
	a.log.Info("lspm listening", "addr", a.Addr(), "sdkUrl", a.sdkURL, "maxProcesses", a.cfg.MaxProcesses,
		"adopted", len(a.table0Live()), "vmm", a.cfg.VMMURL)

	var err error
	select {
	case <-ctx.Done():
	case err = <-gw.Failed():
	}
	if a.cfg.DrainOnExit {
		a.drain() // the games' SDK calls are still answered meanwhile
	}
	// Followed logs end at once; other calls get apiStopWait to answer.
	// No handler runs once Run returns.
	gw.Stop(apiStopWait)
	return err
}

// apiStopWait is how long a stopping LSPM lets the API requests in flight
// finish before it closes their connections.
const apiStopWait = 2 * time.Second

// table0Live counts live processes through the loop (for the start log).
func (a *Agent) table0Live() []api.Process {
	var out []api.Process
	a.do(func(t *table) { out = t.liveViews() })
	return out
}

// goOwned runs f in a goroutine that Run waits for; f gets the run context.
func (a *Agent) goOwned(f func(ctx context.Context)) {
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		f(a.runCtx)
	}()
}

// loop owns the table: every command and the health clock run here.
func (a *Agent) loop(ctx context.Context) {
	defer close(a.loopDone)
	tick := a.clock.NewTicker(a.cfg.CheckInterval)
	defer tick.Stop()
	t := a.table
	for {
		select {
		case fn := <-a.cmds:
			fn(t)
		case <-tick.C():
			t.checkHealth()
		case <-ctx.Done():
			return
		}
	}
}

var errStopped = rest.Errorf(rest.Unavailable, "stopping", "the LSPM is stopping")

// do runs fn on the loop and waits for it.
func (a *Agent) do(fn func(t *table)) error {
	done := make(chan struct{})
	select {
	case a.cmds <- func(t *table) { fn(t); close(done) }:
	case <-a.loopDone:
		return errStopped
	}
	select {
	case <-done:
		return nil
	case <-a.loopDone:
		return errStopped
	}
}

// post queues fn on the loop without waiting for it to run.
func (a *Agent) post(fn func(t *table)) {
	select {
	case a.cmds <- fn:
	case <-a.loopDone:
	}
}

// newToken returns 32 random bytes in hex.
func newToken() string {
	b := make([]byte, 32)
	_, _ = rand.Read(b) // crypto/rand.Read never fails on Linux
	return hex.EncodeToString(b)
}

// baseEnv is what a game server inherits from the LSPM's environment: only
// harmless variables, never the machine token.
var baseEnv = []string{"PATH", "HOME", "USER", "LANG", "LC_ALL", "TZ", "TMPDIR", "SSL_CERT_FILE", "SSL_CERT_DIR"}

// Spawn starts a game server process (POST /v1/processes).
func (a *Agent) Spawn(req api.SpawnRequest) (api.Process, error) {
	if err := validateSpawn(&req); err != nil {
		return api.Process{}, err
	}
	argv := req.Command
	if len(argv) == 0 {
		argv = a.cfg.DefaultCommand
	}
	if len(argv) == 0 {
		return api.Process{}, rest.Errorf(rest.Invalid, "", "the request names no command and this LSPM has no default command")
	}
	exe, err := a.allow.check(argv[0])
	if err != nil {
		return api.Process{}, err
	}
	id := req.ID
	if id == "" {
		id = "p-" + uuid.NewString()
	}
	portNames := req.Ports
	if portNames == nil {
		portNames = []string{"game"}
	}
	token := newToken()
	var plan spawnPlan
	var reserveErr error
	if err := a.do(func(t *table) {
		plan, reserveErr = t.reserve(id, req, argv, rest.TokenHash(token), portNames)
	}); err != nil {
		return api.Process{}, err
	}
	if reserveErr != nil {
		return api.Process{}, reserveErr
	}
	// The Agones SDK ports are bound before the game starts, so they
	// answer at once (the kernel queues early connections until serving
	// starts with the commit below).
	var agones *agonesListeners
	if plan.agones != nil {
		if agones, err = listenAgones(plan.agones); err != nil {
			a.post(func(t *table) { t.abort(id) })
			return api.Process{}, rest.Errorf(rest.Internal, "spawn_failed", "start the Agones SDK: %v", err)
		}
	}
	l, err := a.launch(plan, req, exe, argv, token)
	if err != nil {
		if agones != nil {
			agones.close()
		}
		_ = os.RemoveAll(plan.dir)
		// The shim may have started the game before it failed.
		clean := a.sweepGameUser(id, plan.uid, plan.home)
		a.post(func(t *table) {
			if !clean {
				t.markDirtyUID(plan.uid)
			}
			t.abort(id)
		})
		return api.Process{}, rest.Errorf(rest.Internal, "spawn_failed", "start %s: %v", argv[0], err)
	}
	var view api.Process
	if err := a.do(func(t *table) {
		view = t.commit(id, l)
		// Started from the loop, which stops before Run waits for its
		// goroutines: no watcher can be added to a WaitGroup being waited.
		a.watch(id, plan.dir, l.shimPID, l.shimStart, l)
		if agones != nil {
			a.serveAgones(t.live[id], agones, ownerOf(t.live[id]))
			agones = nil
		}
	}); err != nil {
		if agones != nil {
			agones.close()
		}
		// The LSPM stops: the game runs on; the next LSPM finds it by the
		// shim's started.json and stops it, as nobody was told it runs.
		return api.Process{}, err
	}
	return view, nil
}

// launch does a spawn's I/O off the loop: the process dir, the environment
// and the shim.
func (a *Agent) launch(plan spawnPlan, req api.SpawnRequest, exe string, argv []string, token string) (launched, error) {
	if err := os.Mkdir(plan.dir, 0o700); err != nil {
		return launched{}, err
	}
	params := req.Params
	if params == nil {
		params = map[string]any{}
	}
	pj, _ := json.Marshal(params)
	period, _, _ := a.healthOf(derefHealth(req.Health))
	env := make([]string, 0, len(baseEnv)+len(req.Env)+12)
	for _, k := range baseEnv {
		if plan.home != "" && (k == "HOME" || k == "TMPDIR" || k == "USER") {
			continue // the LSPM's, not the game's
		}
		if v, ok := os.LookupEnv(k); ok {
			env = append(env, k+"="+v)
		}
	}
	if plan.home != "" {
		if err := reachableByOthers(exe); err != nil {
			return launched{}, err
		}
		if err := makeGameHome(plan.home, plan.uid); err != nil {
			return launched{}, err
		}
		env = append(env, "HOME="+plan.home, "TMPDIR="+plan.home)
	}
	keys := make([]string, 0, len(req.Env))
	for k := range req.Env {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		env = append(env, k+"="+req.Env[k])
	}
	env = append(env,
		api.EnvProcessID+"="+plan.id,
		api.EnvProcessToken+"="+token,
		api.EnvSDKURL+"="+a.sdkURL,
		api.EnvParams+"="+string(pj),
		api.EnvMachineID+"="+a.cfg.MachineID,
		api.EnvFleet+"="+req.Fleet,
		api.EnvHeartbeatMS+"="+strconv.FormatInt(period.Milliseconds(), 10),
	)
	for name, port := range plan.ports {
		env = append(env, api.EnvPortPrefix+strings.ToUpper(name)+"="+strconv.Itoa(port))
	}
	if plan.agones != nil {
		env = append(env, EnvAgonesHTTPPort+"="+strconv.Itoa(plan.agones.HTTPPort),
			EnvAgonesGRPCPort+"="+strconv.Itoa(plan.agones.GRPCPort))
	}
	full := append([]string{exe}, argv[1:]...)
	sh, err := a.shims.get()
	if err != nil {
		return launched{}, err
	}
	l, err := sh.run(shimSpec{ProcDir: plan.dir, Argv: full, Env: env, Dir: filepath.Dir(exe), LogMaxBytes: a.cfg.LogMaxBytes,
		Record: plan.record, UID: plan.uid, SweeperUID: a.cfg.GameUIDMin})
	l.uid, l.home = plan.uid, plan.home
	return l, err
}

// reachableByOthers tells why a game of its own user could not run exe
// (and work in its directory), if it could not: every directory above it
// must let others through, and the file let others run it.
func reachableByOthers(exe string) error {
	st, err := os.Stat(exe)
	if err != nil {
		return err
	}
	if st.Mode().Perm()&0o001 == 0 {
		return fmt.Errorf("%s is %v: games of their own user (--game-uids) cannot run it; make it executable by others", exe, st.Mode())
	}
	for dir := filepath.Dir(exe); ; dir = filepath.Dir(dir) {
		if st, err := os.Stat(dir); err != nil {
			return err
		} else if st.Mode().Perm()&0o001 == 0 {
			return fmt.Errorf("directory %s is %v: games of their own user (--game-uids) cannot reach %s; let others through it (chmod o+x)", dir, st.Mode(), exe)
		}
		if dir == "/" || dir == "." {
			return nil
		}
	}
}

// makeGameHome creates a game's own HOME, 0700 and its user's. Mkdir
// fails on anything already there, a link included, and the directory is
// given away through a descriptor that cannot have followed a link.
func makeGameHome(dir string, uid int) error {
	if err := os.Mkdir(dir, 0o700); err != nil {
		return fmt.Errorf("create the game's home: %w", err)
	}
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err == nil {
		err = unix.Fchown(fd, uid, uid)
		unix.Close(fd)
	}
	if err != nil {
		_ = os.Remove(dir)
		return fmt.Errorf("give the game its home: %w", err)
	}
	return nil
}

// removeGameHome removes a game's HOME if it is still the directory of the
// game's user that makeGameHome made (removeUserLeftovers usually took it
// already).
func removeGameHome(dir string, uid int) {
	var st unix.Stat_t
	if dir == "" || unix.Lstat(dir, &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFDIR || int(st.Uid) != uid {
		return
	}
	_ = os.RemoveAll(dir) // never follows a link
}

func derefHealth(h *api.Health) api.Health {
	if h == nil {
		return api.Health{}
	}
	return *h
}

// watch waits off the loop for a game server's shim to exit and posts the
// end, with its exit record and log tail, to the loop.
func (a *Agent) watch(id, dir string, shimPID int, shimStart uint64, l launched) {
	a.goOwned(func(ctx context.Context) {
		if !waitShim(ctx, shimPID, shimStart) {
			return // the LSPM stops; the game goes on, the next LSPM watches it
		}
		if l.cmd != nil {
			_ = l.cmd.Wait() // reap our own child
		}
		a.finish(id, dir, l)
	})
}

// finish reads the evidence of an ended game server and posts it.
func (a *Agent) finish(id, dir string, l launched) {
	pid, start := l.pid, l.start
	var ex *exitRecord
	detail := ""
	if raw, err := os.ReadFile(filepath.Join(dir, exitFile)); err == nil {
		var rec exitRecord
		if jsonUnmarshal(raw, &rec) == nil {
			ex = &rec
		}
	}
	if ex == nil {
		// The shim died without recording the exit: the status is lost.
		// Do not leave an unsupervised game behind.
		detail = "the process's supervisor (shim) ended without recording its exit; exit status unknown"
		if pidAlive(pid, start) {
			a.kill(pid, start, 0, nil)
			detail += "; the orphaned process group was killed"
		}
	}
	tail := capLines(tailLines(filepath.Join(dir, logFile), 50))
	// The game's user goes back to the pool with the end, so nothing may
	// run as it any more: the shim swept it, but a shim can be killed.
	clean := a.sweepGameUser(id, l.uid, l.home)
	a.post(func(t *table) {
		if !clean {
			t.markDirtyUID(l.uid)
		}
		t.end(id, ex, tail, detail)
	})
}

// sweepGameUser empties the user of an ended game (uid, or 0 for none)
// before it goes back to the pool: every process of it is killed, then
// what it left in shared places and its home are removed. It returns
// false when processes of the user may still run (the user must not be
// handed out again).
func (a *Agent) sweepGameUser(id string, uid int, home string) bool {
	switch {
	case uid == 0:
		return true
	case a.cfg.GameUIDMin == 0:
		// Started by an LSPM with --game-uids, ended under one without:
		// there is no sweeper, and the user is never handed out again.
		a.log.Warn("a game of its own user ended while --game-uids is off: what it left running as its user is not swept",
			"process", id, "uid", uid)
		return true
	}
	if len(sweepUsers(a.cfg.GameUIDMin, uid)) != 0 {
		return false
	}
	// Nothing of the user runs that could race it. (The home is the
	// user's, so it usually goes with the leftovers.)
	removeUserLeftovers(map[int]bool{uid: true})
	removeGameHome(home, uid)
	return true
}

// orphaned deals with a process dir that has no readable record: it kills
// the game server the shim says it started, if it still runs, and moves the
// dir aside as evidence.
func (a *Agent) orphaned(dir string, why error) {
	killed := killProcessOf(filepath.Base(dir))
	if !killed && errors.Is(why, os.ErrNotExist) {
		_ = os.RemoveAll(dir) // a spawn that never started a game
		return
	}
	q := filepath.Join(a.cfg.DataDir, "quarantine")
	_ = os.MkdirAll(q, 0o700)
	dest := filepath.Join(q, filepath.Base(dir))
	if err := os.Rename(dir, dest); err != nil {
		_ = os.RemoveAll(dir)
		dest = ""
	}
	a.log.Warn("process dir without a readable record", "dir", dir, "err", why,
		"killedRunningGame", killed, "movedTo", dest)
}

// adopt takes over a game server a previous LSPM started; it runs on the
// loop, which owns p (t is its table).
func (a *Agent) adopt(t *table, p *proc) {
	id, dir := p.view.ID, p.dir
	l := launched{shimPID: p.shimPID, shimStart: p.shimStart, pid: p.view.PID, start: p.start, uid: p.uid, home: p.home}
	if _, err := os.Stat(filepath.Join(dir, exitFile)); err == nil || !pidAlive(p.shimPID, p.shimStart) {
		a.goOwned(func(context.Context) { a.finish(id, dir, l) })
		return
	}
	a.log.Info("re-adopted process", "process", id, "pid", l.pid, "state", p.view.State)
	a.watch(id, dir, l.shimPID, l.shimStart, l)
	if p.agones != nil {
		// The game has the ports in its environment: serve them again.
		a.readoptAgones(p)
	}
	if p.stopReason != "" {
		grace := a.cfg.Grace
		if p.stopReason == api.ReasonMemoryLimit {
			grace = 0
		}
		a.kill(l.pid, l.start, grace, p.done)
	}
}

// sampleMemory reads every live game server's RSS off the loop and hands
// the readings to it, which kills those over their limit.
func (a *Agent) sampleMemory(ctx context.Context) {
	t := time.NewTicker(5 * a.cfg.CheckInterval)
	defer t.Stop()
	type target struct {
		id    string
		pid   int
		start uint64
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		var targets []target
		if a.do(func(tb *table) {
			for _, p := range tb.live {
				if !p.inflight {
					targets = append(targets, target{p.view.ID, p.view.PID, p.start})
				}
			}
		}) != nil {
			return
		}
		rss := make(map[string]int64, len(targets))
		for _, tg := range targets {
			if n, err := readRSS(tg.pid); err == nil && pidAlive(tg.pid, tg.start) {
				rss[tg.id] = n
			}
		}
		a.post(func(tb *table) { tb.sample(rss) })
	}
}

// drain stops every game server and waits for them (--drain).
func (a *Agent) drain() {
	var dones []chan struct{}
	if a.do(func(t *table) {
		t.shuttingDown = true
		dones = t.stopAll(a.cfg.Grace)
	}) != nil {
		return
	}
	a.log.Info("draining", "processes", len(dones))
	deadline := time.After(a.cfg.Grace + 5*time.Second)
	for _, d := range dones {
		select {
		case <-d:
		case <-deadline:
			return
		}
	}
}

// report sends numbered status reports to the VMM: every interval and at
// once on each change, retrying with backoff while the VMM is unreachable.
func (a *Agent) report(ctx context.Context) {
	client := &http.Client{Timeout: 5 * time.Second}
	url := strings.TrimSuffix(a.cfg.VMMURL, "/") + "/v1/machines/" + a.cfg.MachineID + "/status"
	tick := a.clock.NewTicker(a.cfg.ReportInterval)
	defer tick.Stop()
	backoff := time.Duration(0)
	for {
		if backoff > 0 {
			select {
			case <-ctx.Done():
				return
			case <-time.After(backoff):
			}
		} else {
			select {
			case <-ctx.Done():
				return
			case <-tick.C():
			case <-a.changed:
			}
		}
		var st api.Status
		if a.do(func(t *table) { st = t.status(true) }) != nil {
			return
		}
		applied, err := a.send(ctx, client, url, st)
		if err == nil && !applied {
			// The VMM has applied a higher number: ours went back (a lost
			// data dir, a clock step). Jump ahead and send again.
			a.post(func(t *table) { t.jumpSeq() })
			err = errors.New("the VMM ignored the report as stale")
		}
		if err != nil {
			if backoff == 0 {
				a.log.Warn("status report failed; retrying", "seq", st.Seq, "err", err)
				backoff = 100 * time.Millisecond
			} else if backoff *= 2; backoff > a.cfg.ReportInterval {
				backoff = a.cfg.ReportInterval
			}
			continue
		}
		seq := st.Seq
		a.post(func(t *table) { t.ack(seq) })
		if backoff > 0 {
			a.log.Info("status reports delivered again", "seq", st.Seq)
		}
		backoff = 0
	}
}

func (a *Agent) send(ctx context.Context, client *http.Client, url string, st api.Status) (applied bool, err error) {
	body, _ := json.Marshal(st)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return false, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+a.cfg.Token)
	resp, err := client.Do(req)
	if err != nil {
		return false, err
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return false, fmt.Errorf("vmm answered %s", resp.Status)
	}
	var ans api.ReportAnswer
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<16)).Decode(&ans); err != nil {
		return false, fmt.Errorf("vmm answer: %w", err)
	}
	return ans.Applied, nil
}

func jsonUnmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }
