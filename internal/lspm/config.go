package lspm

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"dedi.dev/dedi/internal/names"
)

// Config is everything an LSPM needs; cmd/dedi fills it from flags and the
// environment, tests fill it directly.
type Config struct {
	// Listen is the address of the REST API (host:port; port 0 picks one,
	// written to DataDir/lspm.addr once listening).
	Listen string
	// DataDir holds process records, logs and the report sequence.
	DataDir string
	// MachineID names this machine in reports and in the processes' env.
	MachineID string
	// Token is the machine token; empty only with Insecure.
	Token string
	// Insecure lets the LSPM run without a machine token (local development).
	Insecure bool
	// VMMURL, when set, receives numbered status reports.
	VMMURL string
	// ReportInterval is the period of status reports (default 2s).
	ReportInterval time.Duration
	// MaxProcesses is the number of live processes this machine takes.
	MaxProcesses int
	// PortMin and PortMax bound the ports handed to processes.
	PortMin, PortMax int
	// GameUIDMin and GameUIDMax, when set (--game-uids), give each live
	// game server a user and group of its own from GameUIDMin+1 to
	// GameUIDMax, so that it can neither signal, trace nor read another
	// game's process (its environment holds that game's token). GameUIDMin
	// itself is the LSPM's, for sweeping a game's user (sweepUsers); no
	// process runs as it. It needs an LSPM run as root. Zero: games run as
	// the LSPM's user.
	GameUIDMin, GameUIDMax int
	// Address is the address game clients use to reach this machine's
	// processes (the process object's "address"); default the listen host.
	Address string
	// SDKURL is the LSPM base URL given to processes; default from Listen.
	SDKURL string
	// DefaultCommand runs when a spawn request names no command; it is
	// always allowed.
	DefaultCommand []string
	// Allow lists the executables a spawn may name, with optional SHA-256.
	Allow []Allowed
	// Verified are pinned executables already hashed by the VM's init's
	// host, with the identity the file had then (see Verified).
	Verified []Verified
	// Health holds the defaults of per-process health settings.
	HealthPeriod     time.Duration
	FailureThreshold int
	StartTimeout     time.Duration
	// MemoryLimit is the default RSS limit in bytes (0: none).
	MemoryLimit int64
	// Grace is the default time between SIGTERM and SIGKILL.
	Grace time.Duration
	// LogMaxBytes caps one process's log file; one rotated file of the same
	// size is kept beside it.
	LogMaxBytes int64
	// History is the number of ended processes kept (records and logs).
	History int
	// DrainOnExit stops every game server before the LSPM exits on
	// SIGTERM; by default they keep running.
	DrainOnExit bool
	// ShimPath is the executable run as "ShimPath shim DIR" to parent each
	// game server; default the running binary.
	ShimPath string
	// ShimPool is the number of shims started ahead of need (0: none, each
	// spawn starts its own).
	ShimPool int
	// ShimPoolIdle, when set, holds the pool's shim starts until no spawn
	// has taken a shim for that long (0: a shim is started at once, and
	// replaced shortly after a spawn takes it).
	ShimPoolIdle time.Duration
	// CheckInterval is how often health deadlines and memory are checked.
	CheckInterval time.Duration
}

// Allowed is one executable the LSPM may run.
type Allowed struct {
	Path   string
	SHA256 string // lower-case hex, or empty for any content
}

// ParseAllowed reads PATH[=SHA256].
func ParseAllowed(s string) (Allowed, error) {
	path, sum, hasSum := strings.Cut(s, "=")
	if path == "" {
		return Allowed{}, errors.New("empty path")
	}
	a := Allowed{Path: path}
	if hasSum {
		sum = strings.ToLower(sum)
		if !names.SHA256(sum) {
			return Allowed{}, fmt.Errorf("%q is not a hex SHA-256", sum)
		}
		a.SHA256 = sum
	}
	return a, nil
}

// ParsePortRange reads "MIN-MAX".
func ParsePortRange(s string) (int, int, error) {
	lo, hi, ok := strings.Cut(s, "-")
	if !ok {
		return 0, 0, fmt.Errorf("port range %q: want MIN-MAX", s)
	}
	min, err1 := strconv.Atoi(lo)
	max, err2 := strconv.Atoi(hi)
	if err1 != nil || err2 != nil || min < 1 || max > 65535 || min > max {
		return 0, 0, fmt.Errorf("port range %q: want 1 <= MIN <= MAX <= 65535", s)
	}
	return min, max, nil
}

// ParseUIDRange reads the --game-uids range MIN-MAX. Users below 1000
// are the system's, and 65534 is nobody: neither is handed to a game.
func ParseUIDRange(s string) (int, int, error) {
	lo, hi, ok := strings.Cut(s, "-")
	if !ok {
		return 0, 0, fmt.Errorf("user range %q: want MIN-MAX", s)
	}
	min, err1 := strconv.Atoi(lo)
	max, err2 := strconv.Atoi(hi)
	if err1 != nil || err2 != nil || min < 1000 || max > 1<<31-2 || min > max || (min <= 65534 && 65534 <= max) {
		return 0, 0, fmt.Errorf("user range %q: want 1000 <= MIN <= MAX < 2^31-1, not holding 65534 (nobody)", s)
	}
	return min, max, nil
}

// CheckUIDRange checks users lo to hi as --game-uids does: the bounds
// ParseUIDRange takes, and nobody else's (uidRangeFree).
func CheckUIDRange(lo, hi int) error {
	if _, _, err := ParseUIDRange(fmt.Sprintf("%d-%d", lo, hi)); err != nil {
		return err
	}
	return uidRangeFree(lo, hi, "/etc")
}

// gameUIDs returns the first user given to games and how many there are:
// --game-uids without its first user, the LSPM's sweeper (none when unset).
func (c Config) gameUIDs() (first, n int) {
	if c.GameUIDMin == 0 {
		return 0, 0
	}
	return c.GameUIDMin + 1, c.GameUIDMax - c.GameUIDMin
}

// systemdRanges are the users systemd hands out by itself, which no file
// in /etc lists (systemd's "Users, Groups, UIDs and GIDs on systemd
// systems").
var systemdRanges = []struct {
	lo, hi int
	what   string
}{
	{60001, 60513, "systemd-homed users"},
	{61184, 65519, "systemd's dynamic users (DynamicUser=)"},
	{524288, 1879048191, "systemd-nspawn's container users (--private-users=pick)"},
	{2147352576, 2147418111, "systemd's foreign users"},
}

// uidRangeFree refuses a --game-uids range that holds a user or group the
// system has (etc/passwd, etc/group), subordinate ids given to a user for
// containers (etc/subuid, etc/subgid), or users systemd hands out: the
// LSPM kills every process of a game's user, and a game must not get
// anyone's files. A missing file holds nothing (a VM's initramfs has
// none). Users only a directory service knows (LDAP, NSS) are not seen.
func uidRangeFree(lo, hi int, etc string) error {
	for _, r := range systemdRanges {
		if lo <= r.hi && r.lo <= hi {
			return fmt.Errorf("overlaps %d-%d, %s", r.lo, r.hi, r.what)
		}
	}
	for _, name := range []string{"passwd", "group"} {
		raw, err := os.ReadFile(filepath.Join(etc, name))
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		for _, line := range strings.Split(string(raw), "\n") {
			f := strings.Split(line, ":")
			if len(f) < 3 {
				continue
			}
			if id, err := strconv.Atoi(f[2]); err == nil && lo <= id && id <= hi {
				return fmt.Errorf("holds %d, which %s gives to %q", id, filepath.Join(etc, name), f[0])
			}
		}
	}
	for _, name := range []string{"subuid", "subgid"} {
		raw, err := os.ReadFile(filepath.Join(etc, name))
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		for _, line := range strings.Split(string(raw), "\n") {
			f := strings.Split(strings.TrimSpace(line), ":")
			if len(f) != 3 {
				continue
			}
			start, err1 := strconv.Atoi(f[1])
			count, err2 := strconv.Atoi(f[2])
			if err1 == nil && err2 == nil && count > 0 && lo < start+count && start <= hi {
				return fmt.Errorf("overlaps %d-%d, which %s gives to %q", start, start+count-1, filepath.Join(etc, name), f[0])
			}
		}
	}
	return nil
}

// withDefaults returns c with zero fields set to their defaults.
func (c Config) withDefaults() Config {
	if c.Listen == "" {
		c.Listen = "127.0.0.1:7701"
	}
	if c.ReportInterval == 0 {
		c.ReportInterval = 2 * time.Second
	}
	if c.MaxProcesses == 0 {
		c.MaxProcesses = 4
	}
	if c.PortMin == 0 && c.PortMax == 0 {
		c.PortMin, c.PortMax = 30000, 30999
	}
	if c.HealthPeriod == 0 {
		c.HealthPeriod = 2 * time.Second
	}
	if c.FailureThreshold == 0 {
		c.FailureThreshold = 3
	}
	if c.StartTimeout == 0 {
		c.StartTimeout = 60 * time.Second
	}
	if c.Grace == 0 {
		c.Grace = 10 * time.Second
	}
	if c.LogMaxBytes == 0 {
		c.LogMaxBytes = 8 << 20
	}
	if c.History == 0 {
		c.History = 100
	}
	if c.CheckInterval == 0 {
		c.CheckInterval = 100 * time.Millisecond
	}
	return c
}

// Validate reports the first problem of a defaulted config.
func (c Config) Validate() error {
	if c.DataDir == "" {
		return errors.New("--data-dir is required")
	}
	if !filepath.IsAbs(c.DataDir) {
		return fmt.Errorf("--data-dir %q must be an absolute path", c.DataDir)
	}
	if !names.ID(c.MachineID) {
		return fmt.Errorf("--machine-id %q: want 1-128 of [A-Za-z0-9._-], starting with a letter or digit", c.MachineID)
	}
	if c.Token == "" && !c.Insecure {
		return errors.New("a machine token is required (--token or DEDI_MACHINE_TOKEN); --insecure runs without one, for local development only")
	}
	if c.Token != "" && len(c.Token) < 16 {
		return errors.New("the machine token must be at least 16 characters")
	}
	if _, _, err := net.SplitHostPort(c.Listen); err != nil {
		return fmt.Errorf("--listen %q: %v", c.Listen, err)
	}
	if c.MaxProcesses < 1 {
		return fmt.Errorf("--max-processes %d: want at least 1", c.MaxProcesses)
	}
	if c.PortMin < 1 || c.PortMax > 65535 || c.PortMin > c.PortMax {
		return fmt.Errorf("port range %d-%d is not valid", c.PortMin, c.PortMax)
	}
	if c.GameUIDMin != 0 || c.GameUIDMax != 0 {
		if _, _, err := ParseUIDRange(fmt.Sprintf("%d-%d", c.GameUIDMin, c.GameUIDMax)); err != nil {
			return fmt.Errorf("--game-uids: %w", err)
		}
		if n := c.GameUIDMax - c.GameUIDMin; n < c.MaxProcesses {
			return fmt.Errorf("--game-uids %d-%d holds %d users for games (the first is the LSPM's), fewer than --max-processes %d", c.GameUIDMin, c.GameUIDMax, n, c.MaxProcesses)
		}
		if os.Geteuid() != 0 {
			return errors.New("--game-uids needs the LSPM to run as root, to start each game as its own user")
		}
		if err := uidRangeFree(c.GameUIDMin, c.GameUIDMax, "/etc"); err != nil {
			return fmt.Errorf("--game-uids %d-%d: %w", c.GameUIDMin, c.GameUIDMax, err)
		}
		// With fs.suid_dumpable 1, a sweep makes the LSPM dumpable, and its
		// sweeping thread's /proc files the game user's for a moment (a
		// game could set the LSPM's oom_score_adj).
		if raw, err := os.ReadFile("/proc/sys/fs/suid_dumpable"); err == nil && strings.TrimSpace(string(raw)) == "1" {
			return errors.New("--game-uids: fs.suid_dumpable is 1 (debug): set it to 0 or 2 (sysctl fs.suid_dumpable=0)")
		}
	}
	if c.FailureThreshold < 1 || c.HealthPeriod <= 0 || c.StartTimeout <= 0 || c.Grace < 0 {
		return errors.New("health period, failure threshold and start timeout must be positive")
	}
	if c.ReportInterval <= 0 || c.CheckInterval <= 0 {
		return errors.New("report and check intervals must be positive")
	}
	if c.History < 1 || c.LogMaxBytes < 1024 {
		return errors.New("history must be at least 1 and the log cap at least 1 KiB")
	}
	if c.ShimPool < 0 || c.ShimPool > 64 {
		return errors.New("the shim pool holds 0 to 64 shims")
	}
	if c.ShimPoolIdle < 0 {
		return errors.New("the shim pool's idle time must not be negative")
	}
	if c.MemoryLimit < 0 {
		return errors.New("memory limit must not be negative")
	}
	return nil
}
