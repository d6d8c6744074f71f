// Package qemu is the provider whose machines are virtual machines run
// by qemu-system-x86_64, booted from a qemu image (internal/image): the
// image's kernel and initramfs, with a small per-machine cpio appended
// that holds the machine's identity, token and VMM URL (so they never
// show on a command line). The guest's init ("dedi init") starts the LSPM.
//
// Networking is qemu's user-mode network: the guest is 10.0.2.15 behind
// a gateway 10.0.2.2 that is the host's 127.0.0.1. Each machine gets a
// loopback address of its own, 127.0.0.N, where qemu forwards the LSPM's
// port and the machine's game port range, TCP and UDP, to the same port
// numbers in the guest; the LSPM inside runs with that --port-range, so no
// port is ever translated. The address plan is the local provider's: N
// picks one game port range, so the two providers never clash.
//
// It owns the state dir Config.Dir:
//
//	DIR/lock                          serializes the choice of N between providers on DIR
//	DIR/accel.json                    the KVM probe's result, for this host boot
//	DIR/cache/<key>.cpio              an image's initramfs, unpacked once for all its machines
//	DIR/cache/<key>.vmlinux           its kernel, uncompressed, booted through the PVH entry (empty: none)
//	DIR/machines/<id>/machine.json    the machine: id, fleet, N, ports, image, qemu's pid and start time
//	DIR/machines/<id>/token           its machine token (0600), for the drain on Delete
//	DIR/machines/<id>/initrd          the image's initramfs + the machine's config (0600), removed once qemu has read it
//	DIR/machines/<id>/qemu.pid        qemu's pidfile
//	DIR/machines/<id>/console.log     the guest's serial console: kernel, init and LSPM logs, the crash evidence
//	DIR/machines/<id>/qemu.log        qemu's own errors
//
// qemu runs daemonized, in a session of its own, and outlives the
// provider (a VMM restart finds it through machine.json, and checks the
// pid against /proc/<pid>/cmdline); only Delete stops it.
package qemu

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"dedi.dev/dedi/api"
	"dedi.dev/dedi/internal/image"
	"dedi.dev/dedi/internal/names"
	"dedi.dev/dedi/internal/procstat"
	"dedi.dev/dedi/internal/provider"
	"dedi.dev/dedi/internal/provider/statedir"
)

var _ provider.Provider = (*QEMU)(nil)

// The guest's side of qemu's user-mode network.
const (
	guestIP   = "10.0.2.15/24"
	gatewayIP = "10.0.2.2" // the host's 127.0.0.1, seen from the guest
)

// Grace is how long Delete lets the game servers of a machine stop
// before it powers the machine off, and how long qemu has to exit on
// SIGTERM before SIGKILL.
const Grace = 10 * time.Second

// Config configures a QEMU provider. Zero fields take their defaults.
type Config struct {
	// Dir is the state dir (required).
	Dir string
	// Binary is the emulator (default qemu-system-x86_64 from PATH).
	Binary string
	// Accel is "auto" (default: KVM if a probe boot works, else TCG),
	// "kvm" or "tcg".
	Accel string
	// MemoryMiB and CPUs size each VM (defaults 256 and 1).
	MemoryMiB, CPUs int
	// Hosts places the machines on 127.0.0.N (N from 2), each with its
	// LSPM's port forwarded on LSPMPort and its game ports as the local
	// provider does (provider.Hosts; its defaults). Each game port is two
	// qemu forwards (TCP and UDP).
	provider.Hosts
	// Logger receives the provider's logs (default: discarded).
	Logger *slog.Logger
}

func (c Config) withDefaults() Config {
	if c.Binary == "" {
		c.Binary = "qemu-system-x86_64"
	}
	if c.Accel == "" {
		c.Accel = "auto"
	}
	if c.MemoryMiB == 0 {
		c.MemoryMiB = 256
	}
	if c.CPUs == 0 {
		c.CPUs = 1
	}
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
		return errors.New("qemu provider: Dir is required")
	case strings.ContainsAny(c.Dir, ",\x00"):
		return fmt.Errorf("qemu provider: Dir %q: qemu options cannot name a path with a comma", c.Dir)
	case !slices.Contains([]string{"auto", "kvm", "tcg"}, c.Accel):
		return fmt.Errorf("qemu provider: accel %q: want auto, kvm or tcg", c.Accel)
	case c.MemoryMiB < 64:
		return fmt.Errorf("qemu provider: %d MiB of memory is too little to boot", c.MemoryMiB)
	case c.CPUs < 1:
		return fmt.Errorf("qemu provider: %d CPUs", c.CPUs)
	}
	if err := c.Hosts.Validate(2); err != nil {
		return fmt.Errorf("qemu provider: %w", err)
	}
	return nil
}

// QEMU creates machines as qemu VMs. Its methods are safe for concurrent
// use; several QEMUs (in this or other processes) may share a Dir. It
// runs no goroutine of its own.
type QEMU struct {
	cfg  Config
	log  *slog.Logger
	http *http.Client

	mu       sync.Mutex      // serializes Create; guards accel and verified
	accel    string          // "kvm" or "tcg" once decided
	verified map[string]bool // cached initramfs -> its executables match its manifest
}

// New returns a provider over cfg.Dir, creating it if needed. It does not
// need qemu until the first Create.
func New(cfg Config) (*QEMU, error) {
	cfg = cfg.withDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	dir, err := filepath.Abs(cfg.Dir)
	if err != nil {
		return nil, err
	}
	cfg.Dir = dir
	if err := os.MkdirAll(filepath.Join(dir, "machines"), 0o700); err != nil {
		return nil, fmt.Errorf("qemu provider: %w", err)
	}
	q := &QEMU{cfg: cfg, log: cfg.Logger.With("provider", "qemu"), http: &http.Client{Timeout: 3 * time.Second}}
	if cfg.Accel != "auto" {
		q.accel = cfg.Accel
	}
	return q, nil
}

// Name is "qemu".
func (q *QEMU) Name() string { return "qemu" }

// machineRecord is DIR/machines/<id>/machine.json.
type machineRecord struct {
	MachineID string    `json:"machineId"`
	Fleet     string    `json:"fleet"`
	Address   string    `json:"address"`
	Host      int       `json:"host"` // N of 127.0.0.N
	PortMin   int       `json:"portMin"`
	PortMax   int       `json:"portMax"`
	LSPMURL   string    `json:"lspmUrl"`
	Image     string    `json:"image"`
	Accel     string    `json:"accel"`
	CreatedAt time.Time `json:"createdAt"`
	PID       int       `json:"pid,omitempty"`      // qemu, once started
	PIDStart  uint64    `json:"pidStart,omitempty"` // its start time (/proc/<pid>/stat field 22)
}

func (r machineRecord) machine() provider.Machine {
	return provider.Machine{ProviderID: r.MachineID, MachineID: r.MachineID, Fleet: r.Fleet,
		Address: r.Address, LSPMURL: r.LSPMURL, CreatedAt: r.CreatedAt}
}

// Files of a machine dir.
const (
	tokenFile   = "token"
	initrdFile  = "initrd"
	pidFile     = "qemu.pid"
	consoleFile = "console.log"
	qemuLogFile = "qemu.log"
)

func (q *QEMU) machineDir(id string) string { return filepath.Join(q.cfg.Dir, "machines", id) }

// ConsoleLog returns the path of a machine's serial console log, the
// evidence of what its kernel, init and LSPM did.
func (q *QEMU) ConsoleLog(providerID string) string {
	return filepath.Join(q.machineDir(providerID), consoleFile)
}

// Create boots a VM from spec.Image and returns once qemu runs with its
// forwards bound; the guest is still booting.
func (q *QEMU) Create(ctx context.Context, spec provider.Spec) (provider.Machine, error) {
	switch {
	case !names.ID(spec.MachineID):
		return provider.Machine{}, fmt.Errorf("qemu provider: invalid machine id %q", spec.MachineID)
	case spec.Token == "":
		return provider.Machine{}, fmt.Errorf("qemu provider: machine %s has no token", spec.MachineID)
	}
	imgDir, err := image.ParseQEMURef(spec.Image)
	if err != nil {
		return provider.Machine{}, fmt.Errorf("qemu provider: machine %s: %w", spec.MachineID, err)
	}
	if strings.Contains(imgDir, ",") {
		return provider.Machine{}, fmt.Errorf("qemu provider: image dir %q: qemu options cannot name a path with a comma", imgDir)
	}
	m, _, err := image.LoadQEMU(imgDir)
	if err != nil {
		return provider.Machine{}, fmt.Errorf("qemu provider: machine %s: %w", spec.MachineID, err)
	}
	if err := checkCommand(m, spec); err != nil {
		return provider.Machine{}, fmt.Errorf("qemu provider: machine %s: %w", spec.MachineID, err)
	}
	vmmURL, err := guestURL(spec.VMMURL)
	if err != nil {
		return provider.Machine{}, fmt.Errorf("qemu provider: machine %s: %w", spec.MachineID, err)
	}
	if err := ctx.Err(); err != nil {
		return provider.Machine{}, err
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	accel, err := q.decideAccel(ctx, filepath.Join(imgDir, image.QEMUKernelFile))
	if err != nil {
		return provider.Machine{}, err
	}
	unlock, err := q.lockDir()
	if err != nil {
		return provider.Machine{}, err
	}
	defer unlock()

	dir := q.machineDir(spec.MachineID)
	if err := os.Mkdir(dir, 0o700); err != nil {
		return provider.Machine{}, fmt.Errorf("create %s: %w", spec.MachineID, err)
	}
	rec, err := q.boot(ctx, dir, imgDir, accel, vmmURL, spec)
	if err != nil {
		_ = os.RemoveAll(dir)
		return provider.Machine{}, fmt.Errorf("create %s: %w", spec.MachineID, err)
	}
	q.log.Info("machine started", "machine", spec.MachineID, "fleet", spec.Fleet, "lspm", rec.LSPMURL,
		"pid", rec.PID, "accel", accel, "ports", fmt.Sprintf("%d-%d", rec.PortMin, rec.PortMax))
	return rec.machine(), nil
}

// boot picks an address, writes the machine's files and starts qemu. An
// address whose forwards someone else bound in the meantime (a local
// machine of another provider) is skipped for the next one.
func (q *QEMU) boot(ctx context.Context, dir, imgDir, accel, vmmURL string, spec provider.Spec) (machineRecord, error) {
	if err := os.WriteFile(filepath.Join(dir, tokenFile), []byte(spec.Token), 0o600); err != nil {
		return machineRecord{}, err
	}
	kernel, err := q.kernel(imgDir)
	if err != nil {
		return machineRecord{}, err
	}
	skip := map[int]bool{}
	for attempt := 0; ; attempt++ {
		n, err := q.freeHost(skip)
		if err != nil {
			return machineRecord{}, err
		}
		addr := "127.0.0." + strconv.Itoa(n)
		lo, hi := q.cfg.Ports(n)
		rec := machineRecord{MachineID: spec.MachineID, Fleet: spec.Fleet, Address: addr, Host: n,
			PortMin: lo, PortMax: hi, LSPMURL: "http://" + net.JoinHostPort(addr, strconv.Itoa(q.cfg.LSPMPort)),
			Image: spec.Image, Accel: accel, CreatedAt: time.Now().UTC().Round(0)}
		// The record comes first: a qemu started by a Create that is then
		// interrupted is still found, and Delete finds its qemu by the pidfile.
		if err := writeRecord(dir, rec); err != nil {
			return rec, err
		}
		gc := image.GuestConfig{MachineID: spec.MachineID, Token: spec.Token, VMMURL: vmmURL, Address: addr,
			LSPMPort: q.cfg.LSPMPort, PortMin: lo, PortMax: hi, MaxProcesses: spec.MaxProcesses,
			ReportInterval: spec.ReportInterval, Command: spec.Command, Allow: spec.Allow, IP: guestIP, Gateway: gatewayIP}
		_ = os.Remove(filepath.Join(dir, initrdFile)) // from an attempt on a busy address
		if err := q.writeInitrd(filepath.Join(dir, initrdFile), imgDir, gc); err != nil {
			return rec, err
		}
		if err := ctx.Err(); err != nil {
			return rec, err
		}
		err = q.startQEMU(dir, kernel, accel, rec)
		var busy errForwardBusy
		if errors.As(err, &busy) && attempt < 5 {
			q.log.Info("address taken while qemu started; trying another", "address", addr, "err", err)
			skip[n] = true
			continue
		}
		if err != nil {
			return rec, err
		}
		_ = os.Remove(filepath.Join(dir, initrdFile)) // qemu read it into the guest's memory
		pid, err := readPidfile(dir)
		if err == nil {
			_, rec.PIDStart, err = procstat.Stat(pid)
			rec.PID = pid
		}
		if err == nil {
			err = writeRecord(dir, rec)
		}
		if err != nil {
			q.kill(rec, dir)
			return rec, err
		}
		return rec, nil
	}
}

// writeInitrd writes the machine's initrd: the image's initramfs,
// unpacked (the guest boots faster without inflating it), followed by the
// machine's config cpio; readable only by this user.
func (q *QEMU) writeInitrd(dst, imgDir string, gc image.GuestConfig) error {
	plain, err := q.plainInitramfs(imgDir)
	if err != nil {
		return err
	}
	gc.Verified = q.verifiedInitramfs(plain)
	extra, err := image.MachineInitramfs(gc)
	if err != nil {
		return err
	}
	in, err := os.Open(plain)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	// io.Copy between files uses copy_file_range: an in-kernel copy.
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	if _, err := out.Write(extra); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// plainInitramfs returns the image's initramfs unpacked, from
// DIR/cache, unpacking it on first use. The caller holds the dir lock.
func (q *QEMU) plainInitramfs(imgDir string) (string, error) {
	src := filepath.Join(imgDir, image.QEMUInitramfsFile)
	return q.cached(src, imgDir, ".cpio", func(in io.Reader, out io.Writer) error {
		zr, err := gzip.NewReader(bufio.NewReaderSize(in, 1<<20))
		if err != nil {
			return fmt.Errorf("initramfs %s: %w", src, err)
		}
		if _, err := io.Copy(out, zr); err != nil {
			return fmt.Errorf("initramfs %s: %w", src, err)
		}
		return nil
	})
}

// verifiedInitramfs reports whether the executables of an unpacked
// initramfs match its manifest's pins (image.VerifyInitramfs), checked
// once per cache entry and provider: on the host it takes milliseconds,
// in a TCG guest the LSPM's own hashing took a second or more of the
// first spawn. One that does not match boots all the same: its LSPM
// hashes the files itself, and refuses the spawn. The caller holds q.mu.
func (q *QEMU) verifiedInitramfs(plain string) bool {
	if ok, done := q.verified[plain]; done {
		return ok
	}
	f, err := os.Open(plain)
	if err != nil {
		return false
	}
	defer f.Close()
	_, err = image.VerifyInitramfs(f)
	if err != nil {
		q.log.Warn("the image's initramfs does not match its manifest: its machines hash their executables themselves", "initramfs", plain, "err", err)
	}
	if q.verified == nil {
		q.verified = map[string]bool{}
	}
	q.verified[plain] = err == nil
	return err == nil
}

// kernel returns the kernel qemu boots for an image: the uncompressed
// kernel, from DIR/cache, which qemu starts through its PVH entry (no
// emulated BIOS, no emulated decompressor: about 0.5 s less per boot under
// TCG), or the image's bzImage when it holds none (image.ErrNoPVH: the
// cache then keeps an empty file, so the answer is not sought again). The
// caller holds the dir lock.
func (q *QEMU) kernel(imgDir string) (string, error) {
	src := filepath.Join(imgDir, image.QEMUKernelFile)
	p, err := q.cached(src, imgDir, ".vmlinux", func(in io.Reader, out io.Writer) error {
		raw, err := io.ReadAll(in)
		if err != nil {
			return err
		}
		k, err := image.PVHKernel(raw)
		if errors.Is(err, image.ErrNoPVH) {
			q.log.Info("the image's kernel boots through the BIOS", "kernel", src, "why", err)
			return nil
		}
		if err != nil {
			return err
		}
		_, err = out.Write(k)
		return err
	})
	if err != nil {
		return "", err
	}
	if st, err := os.Stat(p); err != nil || st.Size() == 0 {
		return src, nil
	}
	return p, nil
}

// cached returns the file unpack makes of src, kept in DIR/cache for all
// the machines of an image: made on first use. The cache key is the
// image dir and src's identity, so a rebuilt image is unpacked again (and
// its new entry replaces the older one). The caller holds the dir lock.
func (q *QEMU) cached(src, imgDir, ext string, unpack func(io.Reader, io.Writer) error) (string, error) {
	st, err := os.Stat(src)
	if err != nil {
		return "", err
	}
	var ino uint64
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		ino = sys.Ino
	}
	dirKey := sha256.Sum256([]byte(imgDir))
	fileKey := sha256.Sum256(fmt.Appendf(nil, "%d %d %d", st.Size(), st.ModTime().UnixNano(), ino))
	prefix := hex.EncodeToString(dirKey[:8]) + "-"
	cacheDir := filepath.Join(q.cfg.Dir, "cache")
	dst := filepath.Join(cacheDir, prefix+hex.EncodeToString(fileKey[:8])+ext)
	if _, err := os.Stat(dst); err == nil {
		return dst, nil
	}
	if err := os.MkdirAll(cacheDir, 0o700); err != nil {
		return "", err
	}
	old, _ := filepath.Glob(filepath.Join(cacheDir, prefix+"*"+ext))
	in, err := os.Open(src)
	if err != nil {
		return "", err
	}
	defer in.Close()
	tmp, err := os.CreateTemp(cacheDir, ".unpack-")
	if err != nil {
		return "", err
	}
	defer os.Remove(tmp.Name())
	if err := unpack(in, tmp); err != nil {
		tmp.Close()
		return "", err
	}
	if err := tmp.Close(); err != nil {
		return "", err
	}
	if err := os.Rename(tmp.Name(), dst); err != nil {
		return "", err
	}
	for _, o := range old {
		_ = os.Remove(o)
	}
	return dst, nil
}

// errForwardBusy is qemu failing to bind a host forward.
type errForwardBusy struct{ msg string }

func (e errForwardBusy) Error() string { return e.msg }

// args is qemu's command line for a machine: nothing secret in it.
func (q *QEMU) args(dir, kernel, accel string, rec machineRecord) []string {
	var fwd strings.Builder
	fmt.Fprintf(&fwd, "user,id=n0,net=10.0.2.0/24,host=%s,hostfwd=tcp:%s:%d-:%d", gatewayIP, rec.Address, q.cfg.LSPMPort, q.cfg.LSPMPort)
	for p := rec.PortMin; p <= rec.PortMax; p++ {
		fmt.Fprintf(&fwd, ",hostfwd=tcp:%s:%d-:%d,hostfwd=udp:%s:%d-:%d", rec.Address, p, p, rec.Address, p, p)
	}
	args := []string{"-name", "dedi-" + rec.MachineID,
		"-machine", "q35", "-accel", accel}
	if accel == "kvm" {
		args = append(args, "-cpu", "host")
	} else {
		// qemu's default CPU, with RDRAND (qemu answers it from the host's
		// getrandom): the guest kernel seeds its random number generator
		// at once instead of gathering timer jitter for a second, which
		// held up the LSPM's first game token (see image.QEMUCmdline).
		args = append(args, "-cpu", "qemu64,+rdrand")
	}
	return append(args,
		"-m", strconv.Itoa(q.cfg.MemoryMiB), "-smp", strconv.Itoa(q.cfg.CPUs),
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-kernel", kernel,
		"-initrd", filepath.Join(dir, initrdFile),
		"-append", image.QEMUCmdline,
		"-serial", "file:"+filepath.Join(dir, consoleFile),
		"-netdev", fwd.String(),
		"-device", "virtio-net-pci,netdev=n0,romfile=",
		"-pidfile", filepath.Join(dir, pidFile),
		"-daemonize")
}

// startQEMU runs qemu daemonized: it returns once qemu has loaded the
// kernel and initrd and bound its forwards, or failed to.
func (q *QEMU) startQEMU(dir, kernel, accel string, rec machineRecord) error {
	logf, err := os.OpenFile(filepath.Join(dir, qemuLogFile), os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(q.cfg.Binary, q.args(dir, kernel, accel, rec)...)
	cmd.Dir = dir
	cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
	cmd.Stdout, cmd.Stderr = logf, logf
	// Not CommandContext: killing the parent while it daemonizes could
	// leave the daemon; it takes well under a second either way.
	if err := cmd.Run(); err != nil {
		out, _ := os.ReadFile(logf.Name())
		msg := strings.TrimSpace(string(out))
		if strings.Contains(msg, "host forwarding rule") {
			return errForwardBusy{msg: "qemu: " + msg}
		}
		if errors.Is(err, exec.ErrNotFound) {
			return fmt.Errorf("qemu: %w (install qemu-system-x86)", err)
		}
		return fmt.Errorf("qemu: %w: %s", err, msg)
	}
	// qemu runs now: even if ctx ended meanwhile, the machine is made and
	// recorded, so the caller gets it rather than a leak.
	return nil
}

// checkCommand allows only the image's executables: a spec's command
// and extra allows must name them.
func checkCommand(m image.Manifest, spec provider.Spec) error {
	ok := func(p string) bool {
		return slices.ContainsFunc(m.Executables, func(e image.Executable) bool { return e.Path == p })
	}
	if len(spec.Command) > 0 && !ok(spec.Command[0]) {
		return fmt.Errorf("command %q is not an executable of image %s", spec.Command[0], m.Name)
	}
	for _, a := range spec.Allow {
		p, _, _ := strings.Cut(a, "=")
		if !ok(p) {
			return fmt.Errorf("allowed executable %q is not an executable of image %s", p, m.Name)
		}
	}
	return nil
}

// guestURL is the VMM's URL as the guest reaches it: qemu's user network
// maps the gateway 10.0.2.2 to the host's 127.0.0.1, and other host
// addresses are reached as they are; other loopback addresses of the
// host cannot be reached.
func guestURL(raw string) (string, error) {
	if raw == "" {
		return "", nil
	}
	u, err := url.Parse(raw)
	if err != nil {
		return "", fmt.Errorf("VMM URL: %w", err)
	}
	host := u.Hostname()
	if host == "localhost" {
		host = "127.0.0.1"
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return raw, nil // a name the guest cannot resolve; see docs/QEMU.md
	}
	switch {
	case ip == netip.MustParseAddr("127.0.0.1") || ip.IsUnspecified():
		host = gatewayIP
	case ip.IsLoopback():
		return "", fmt.Errorf("VMM URL %s: a VM reaches the host's 127.0.0.1 (as %s) but no other loopback address; have the VMM listen on 127.0.0.1 or a non-loopback address", raw, gatewayIP)
	default:
		return raw, nil
	}
	if p := u.Port(); p != "" {
		u.Host = net.JoinHostPort(host, p)
	} else {
		u.Host = host
	}
	return u.String(), nil
}

// decideAccel returns the accelerator: the configured one, or for
// "auto" the result of a probe made once per host boot (kept in
// DIR/accel.json): KVM when /dev/kvm opens and a kernel boots under it
// (on some hosts, nested ones, KVM is there but the guest hangs), else
// TCG. The caller holds q.mu.
func (q *QEMU) decideAccel(ctx context.Context, kernel string) (string, error) {
	if q.accel != "" {
		return q.accel, nil
	}
	if f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0); err != nil {
		q.log.Info("no usable /dev/kvm; VMs run under TCG (slower)", "err", err)
		q.accel = "tcg"
		return q.accel, nil
	} else {
		f.Close()
	}
	type probed struct {
		BootID string `json:"bootId"`
		Binary string `json:"binary"`
		Accel  string `json:"accel"`
	}
	cache := filepath.Join(q.cfg.Dir, "accel.json")
	bootID, _ := os.ReadFile("/proc/sys/kernel/random/boot_id")
	want := probed{BootID: strings.TrimSpace(string(bootID)), Binary: q.cfg.Binary}
	var got probed
	if raw, err := os.ReadFile(cache); err == nil && json.Unmarshal(raw, &got) == nil &&
		got.BootID == want.BootID && got.Binary == want.Binary && (got.Accel == "kvm" || got.Accel == "tcg") {
		q.accel = got.Accel
		return q.accel, nil
	}
	start := time.Now()
	want.Accel = "kvm"
	if err := q.probeKVM(ctx, kernel); err != nil {
		if ctx.Err() != nil {
			return "", ctx.Err()
		}
		want.Accel = "tcg"
		q.log.Warn("KVM is present but a probe boot failed; VMs run under TCG (slower)", "err", err, "took", time.Since(start).Round(time.Millisecond))
	} else {
		q.log.Info("VMs run under KVM", "probe", time.Since(start).Round(time.Millisecond))
	}
	q.accel = want.Accel
	if raw, err := json.Marshal(want); err == nil && want.BootID != "" {
		_ = os.WriteFile(cache, raw, 0o600)
	}
	return q.accel, nil
}

// probeTimeout bounds the KVM probe; a kernel prints its banner within
// a fraction of a second under KVM.
const probeTimeout = 2 * time.Second

// probeKVM boots kernel under KVM with no initrd and waits for its
// banner on the serial console.
func (q *QEMU) probeKVM(ctx context.Context, kernel string) error {
	ctx, cancel := context.WithTimeout(ctx, probeTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, q.cfg.Binary, "-machine", "q35", "-accel", "kvm", "-cpu", "host", "-m", "128",
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio",
		"-kernel", kernel, "-append", "console=ttyS0 panic=-1")
	out, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return err
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		if strings.Contains(sc.Text(), "Linux version") {
			return nil
		}
	}
	if ctx.Err() != nil {
		return fmt.Errorf("no kernel banner within %v", probeTimeout)
	}
	_ = cmd.Wait()
	return fmt.Errorf("qemu exited before the kernel banner: %s", strings.TrimSpace(stderr.String()))
}

// lockDir takes DIR/lock, which serializes the choice of hosts between
// every QEMU on the dir.
func (q *QEMU) lockDir() (unlock func(), err error) {
	unlock, err = statedir.Lock(q.cfg.Dir)
	if err != nil {
		return nil, fmt.Errorf("qemu provider: %w", err)
	}
	return unlock, nil
}

// freeHost picks N for a new machine: one no machine of the dir has and
// whose LSPM port nobody else has bound.
func (q *QEMU) freeHost(skip map[int]bool) (int, error) {
	recs, err := q.records()
	if err != nil {
		return 0, err
	}
	used := map[int]bool{}
	for _, r := range recs {
		used[r.Host] = true
	}
	return statedir.FreeHost(q.cfg.FirstHost, q.cfg.LastHost, q.cfg.LSPMPort, func(n int) bool { return used[n] || skip[n] })
}

// records reads every machine record of the dir.
func (q *QEMU) records() ([]machineRecord, error) {
	recs, err := statedir.All[machineRecord](filepath.Join(q.cfg.Dir, "machines"), q.log)
	if err != nil {
		return nil, fmt.Errorf("qemu provider: %w", err)
	}
	return recs, nil
}

func readRecord(dir string) (machineRecord, error) { return statedir.Read[machineRecord](dir) }

func writeRecord(dir string, r machineRecord) error { return statedir.Write(dir, r) }

// List returns the machines of fleet ("" for all) that have a record,
// whether their qemu still runs or not (a powered-off VM keeps its
// console log until Delete).
func (q *QEMU) List(ctx context.Context, fleet string) ([]provider.Machine, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	recs, err := q.records()
	if err != nil {
		return nil, err
	}
	var out []provider.Machine
	for _, r := range recs {
		if fleet == "" || r.Fleet == fleet {
			out = append(out, r.machine())
		}
	}
	return out, nil
}

// Delete drains the machine (the LSPM's shutdown handshake; game servers
// still running are stopped through the LSPM, within Grace), powers it
// off (SIGTERM to qemu, SIGKILL after Grace) and removes its dir. A
// machine that is already gone is not an error.
func (q *QEMU) Delete(ctx context.Context, providerID string) error {
	if !names.ID(providerID) {
		return nil // it cannot name a machine of ours
	}
	dir := q.machineDir(providerID)
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	log := q.log.With("machine", providerID)
	rec, err := readRecord(dir)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		log.Warn("unreadable machine record; removing what is left", "err", err)
	}
	if p, ok := q.openQEMU(dir, rec); ok {
		if token, err := os.ReadFile(filepath.Join(dir, tokenFile)); err == nil && rec.LSPMURL != "" {
			if err := q.drain(ctx, rec.LSPMURL, string(token)); err != nil {
				log.Warn("drain before power-off", "err", err)
			}
		}
		p.close()
	}
	q.kill(rec, dir)
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("delete %s: %w", providerID, err)
	}
	log.Info("machine deleted")
	return nil
}

// kill stops the machine's qemu, if it runs: SIGTERM (qemu exits at
// once, as on a power cut), SIGKILL after Grace.
func (q *QEMU) kill(rec machineRecord, dir string) {
	p, ok := q.openQEMU(dir, rec)
	if !ok {
		return
	}
	defer p.close()
	_ = p.signal(unix.SIGTERM)
	if !p.wait(Grace) {
		q.log.Warn("qemu did not stop; killing it", "machine", rec.MachineID, "pid", rec.PID)
		_ = p.signal(unix.SIGKILL)
		p.wait(5 * time.Second)
	}
}

// openQEMU finds the machine's qemu: the record's pid (or the pidfile's,
// for a Create interrupted before the record had it), if that process
// still runs, started when recorded, and names this machine's pidfile
// on its command line.
func (q *QEMU) openQEMU(dir string, rec machineRecord) (proc, bool) {
	pid, start := rec.PID, rec.PIDStart
	if pid == 0 {
		var err error
		if pid, err = readPidfile(dir); err != nil {
			return proc{}, false
		}
		start = 0
	}
	return openProc(pid, start, filepath.Join(dir, pidFile))
}

func readPidfile(dir string) (int, error) {
	raw, err := os.ReadFile(filepath.Join(dir, pidFile))
	if err != nil {
		return 0, err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(raw)))
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("pidfile: bad pid %q", raw)
	}
	return pid, nil
}

// drain runs the LSPM's shutdown handshake. While game servers run (409)
// it stops them through the LSPM and asks again, until Grace is out; an
// LSPM that does not answer is not waited for.
func (q *QEMU) drain(ctx context.Context, lspmURL, token string) error {
	deadline := time.Now().Add(Grace)
	stopped := false
	for {
		// A booting guest's forward accepts and then never answers: a
		// short wait. A running LSPM answers a 409 in milliseconds, and
		// its 200 within a second (it waits until the VMM acknowledged
		// the report that shows it shutting down).
		hctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		code, err := q.call(hctx, http.MethodPost, lspmURL+"/v1/shutdown", token, nil)
		cancel()
		if err != nil {
			return fmt.Errorf("shutdown handshake: %w", err)
		}
		switch {
		case code == http.StatusOK:
			return nil
		case code != http.StatusConflict:
			return fmt.Errorf("shutdown handshake: status %d", code)
		}
		if !stopped {
			var list api.List[api.Process]
			if _, err := q.call(ctx, http.MethodGet, lspmURL+"/v1/processes", token, &list); err != nil {
				return fmt.Errorf("list processes: %w", err)
			}
			for _, p := range list.Items {
				if !api.IsTerminal(p.State) {
					_, _ = q.call(ctx, http.MethodDelete, lspmURL+"/v1/processes/"+url.PathEscape(p.ID)+"?grace=5s", token, nil)
				}
			}
			stopped = true
		}
		if time.Now().After(deadline) {
			return errors.New("game servers still running after the grace period")
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func (q *QEMU) call(ctx context.Context, method, u, token string, out any) (int, error) {
	req, err := http.NewRequestWithContext(ctx, method, u, nil)
	if err != nil {
		return 0, err
	}
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := q.http.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return resp.StatusCode, err
	}
	if out != nil && resp.StatusCode/100 == 2 {
		if err := json.Unmarshal(raw, out); err != nil {
			return resp.StatusCode, err
		}
	}
	return resp.StatusCode, nil
}
