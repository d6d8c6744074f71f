package main

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"dedi.dev/dedi/api"
	"dedi.dev/dedi/internal/image"
	"dedi.dev/dedi/internal/lspm"
	"dedi.dev/dedi/internal/provider"
)

// runInit is "dedi init", PID 1 of a qemu image's VM (the kernel starts
// it with rdinit=/bin/dedi -- init, see image.QEMUCmdline). It
//
//  1. mounts /proc, /sys and /dev;
//  2. loads the virtio network modules the image build listed, in order;
//  3. brings the network up: lo, and eth0 at the machine config's address
//     (10.0.2.15/24 behind qemu's user-mode network) with its gateway;
//  4. starts the LSPM with the machine's identity, token and VMM URL, read
//     from /etc/dedi/machine.json (appended to the initramfs per machine,
//     never on a command line), allowing only the manifest's executables,
//     each pinned by its SHA-256;
//  5. reaps every orphan, as PID 1 must, and restarts the LSPM if it dies.
//
// It never returns: on a fatal error it logs to the console (the host
// keeps the serial log) and powers the VM off.
func runInit(args []string, stderr io.Writer) error {
	if os.Getpid() != 1 {
		return errors.New("dedi init is the init of a qemu image's VM and runs only as PID 1")
	}
	if len(args) > 0 {
		// The kernel passes its unknown boot options on; none are ours.
		fmt.Fprintf(stderr, "dedi init: ignoring arguments %q\n", args)
	}
	log := slog.New(slog.NewTextHandler(stderr, nil)).With("component", "init")
	start := time.Now()
	cfg, err := bootGuest(log)
	if err != nil {
		log.Error("boot failed; powering off", "err", err)
		powerOff()
	}
	log.Info("booted", "took", time.Since(start).Round(time.Millisecond), "uptime", uptime())
	superviseLSPM(log, cfg)
	return nil // not reached
}

// bootGuest runs steps 1-3 and returns the machine config. The config
// file is removed once read: the token lives on only in the init's and
// the LSPM's memory, out of the game servers' reach on the file system.
func bootGuest(log *slog.Logger) (image.GuestConfig, error) {
	var cfg image.GuestConfig
	for _, m := range []struct{ fs, dir string }{{"proc", "/proc"}, {"sysfs", "/sys"}, {"devtmpfs", "/dev"}} {
		if err := os.MkdirAll(m.dir, 0o755); err != nil {
			return cfg, err
		}
		if err := unix.Mount(m.fs, m.dir, m.fs, unix.MS_NOSUID|unix.MS_NOEXEC, ""); err != nil && !errors.Is(err, unix.EBUSY) {
			return cfg, fmt.Errorf("mount %s: %w", m.dir, err)
		}
	}
	// Room for many games' tasks (each game of its own user may have up to
	// 1,024): the kernel's default is 32,768 process ids.
	if err := os.WriteFile("/proc/sys/kernel/pid_max", []byte("4194304"), 0o644); err != nil {
		log.Warn("raise kernel.pid_max", "err", err)
	}
	// POSIX shared memory, as on any Linux host (the LSPM removes what a
	// game leaves there; it mounts /dev/mqueue itself).
	if err := os.MkdirAll("/dev/shm", 0o755); err != nil {
		return cfg, err
	}
	if err := unix.Mount("tmpfs", "/dev/shm", "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=1777"); err != nil && !errors.Is(err, unix.EBUSY) {
		return cfg, fmt.Errorf("mount /dev/shm: %w", err)
	}
	// The root of an initramfs is world-writable: a game of its own user
	// could plant /usr, /etc or /lib there for the next process to trust.
	if err := os.Chmod("/", 0o755); err != nil {
		return cfg, err
	}
	// The games' scratch space: each runs as a user of its own and can
	// write nowhere else (sticky, as /tmp is: none removes another's files).
	// The LSPM makes each game its own HOME in there (0700).
	// A tmpfs of its own, nosuid like /dev/shm: a setuid file a game
	// leaves there runs with no one's privileges.
	if err := os.MkdirAll("/tmp", 0o755); err != nil {
		return cfg, err
	}
	if err := unix.Mount("tmpfs", "/tmp", "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=1777"); err != nil && !errors.Is(err, unix.EBUSY) {
		return cfg, fmt.Errorf("mount /tmp: %w", err)
	}
	var img image.QEMUImage
	if err := readJSON(image.GuestImageConfig, &img); err != nil {
		return cfg, err
	}
	for _, m := range img.Modules {
		if err := loadModule(m); err != nil {
			return cfg, err
		}
	}
	if err := readJSON(image.GuestMachineConfig, &cfg); err != nil {
		return cfg, err
	}
	if err := os.Remove(image.GuestMachineConfig); err != nil {
		log.Warn("remove the machine config", "err", err)
	}
	if err := cfg.Validate(); err != nil {
		return cfg, err
	}
	host := cfg.MachineID
	if len(host) > 64 {
		host = host[:64]
	}
	if err := unix.Sethostname([]byte(host)); err != nil {
		log.Warn("set host name", "err", err)
	}
	return cfg, upNetwork(cfg, log)
}

func readJSON(p string, v any) error {
	raw, err := os.ReadFile(p)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(raw, v); err != nil {
		return fmt.Errorf("%s: %w", p, err)
	}
	return nil
}

func loadModule(p string) error {
	f, err := os.Open(p)
	if err != nil {
		return fmt.Errorf("module: %w", err)
	}
	defer f.Close()
	if err := unix.FinitModule(int(f.Fd()), "", 0); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("load module %s: %w", filepath.Base(p), err)
	}
	return nil
}

// upNetwork brings lo and the first other interface up with the
// config's address and default route.
func upNetwork(cfg image.GuestConfig, log *slog.Logger) error {
	prefix, err := netip.ParsePrefix(cfg.IP)
	if err != nil || !prefix.Addr().Is4() {
		return fmt.Errorf("guest address %q: want an IPv4 address/prefix", cfg.IP)
	}
	gw, err := netip.ParseAddr(cfg.Gateway)
	if err != nil || !gw.Is4() {
		return fmt.Errorf("gateway %q: want an IPv4 address", cfg.Gateway)
	}
	nl, err := newNetlink()
	if err != nil {
		return err
	}
	defer nl.close()
	lo, err := net.InterfaceByName("lo")
	if err != nil {
		return err
	}
	if err := nl.linkUp(lo.Index); err != nil {
		return fmt.Errorf("lo up: %w", err)
	}
	// virtio_net registers its interface while its module loads; wait a
	// little in case the probe runs late.
	var eth *net.Interface
	for deadline := time.Now().Add(10 * time.Second); eth == nil; {
		ifs, _ := net.Interfaces()
		for i := range ifs {
			if ifs[i].Flags&net.FlagLoopback == 0 {
				eth = &ifs[i]
				break
			}
		}
		if eth == nil {
			if time.Now().After(deadline) {
				return errors.New("no network interface: is the VM started with a virtio-net device?")
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	if err := nl.addAddr(eth.Index, prefix); err != nil {
		return fmt.Errorf("address %s on %s: %w", prefix, eth.Name, err)
	}
	if err := nl.linkUp(eth.Index); err != nil {
		return fmt.Errorf("%s up: %w", eth.Name, err)
	}
	if err := nl.addDefaultRoute(eth.Index, gw); err != nil {
		return fmt.Errorf("route via %s: %w", gw, err)
	}
	log.Info("network up", "interface", eth.Name, "address", prefix, "gateway", gw)
	return nil
}

// guestShimPoolIdle is how long the guest's LSPM waits, after its start
// and after each spawn, before it starts pooled shims.
const guestShimPoolIdle = 2 * time.Second

// guestGameUIDs are the users the guest's LSPM runs its games as, one
// each (--game-uids), after the first, its sweeper: as many as a machine
// can hold processes (processesPerMachine is at most 1000).
const guestGameUIDs = "100000-101000"

// lspmArgs is the LSPM's command line: everything but the token, which
// goes in its environment.
func lspmArgs(cfg image.GuestConfig, m image.Manifest, verified []lspm.Verified) []string {
	port := strconv.Itoa(cfg.LSPMPort)
	extra := []string{"--sdk-url", "http://127.0.0.1:" + port,
		// The VM may have a single, emulated CPU: a pooled shim starting
		// beside the LSPM's start or the first game's would hold it up
		// by the whole start of a dedi (0.2-0.4 s under TCG).
		"--shim-pool-idle", guestShimPoolIdle.String(),
		// The LSPM is root in the VM: no game may touch another.
		"--game-uids", guestGameUIDs}
	for _, v := range verified {
		extra = append(extra, "--verified", v.String())
	}
	cmd := cfg.Command
	if len(cmd) == 0 {
		cmd = m.Command
	}
	return provider.LSPMFlags{Listen: "0.0.0.0:" + port, Address: cfg.Address,
		DataDir: filepath.Join(image.GuestDataDir, "lspm"), MachineID: cfg.MachineID,
		PortMin: cfg.PortMin, PortMax: cfg.PortMax, Allow: m.Allow(), Extra: extra, Command: cmd,
		Spec: provider.Spec{VMMURL: cfg.VMMURL, MaxProcesses: cfg.MaxProcesses,
			ReportInterval: cfg.ReportInterval, Allow: cfg.Allow}}.Args()
}

// verifiedAtBoot returns, when the host checked this boot's initramfs
// against the manifest (cfg.Verified), each executable's identity as it
// is now, before any game ran: the LSPM then takes the manifest's hash for
// a file that still has that identity instead of hashing it again (a
// second or more of the first spawn under TCG), in this and every later
// LSPM of this boot. A file changed since is hashed at its spawn.
func verifiedAtBoot(log *slog.Logger, cfg image.GuestConfig, m image.Manifest) []lspm.Verified {
	if !cfg.Verified {
		return nil
	}
	var out []lspm.Verified
	for _, e := range m.Executables {
		v, err := lspm.VerifiedFile(e.Path, e.SHA256)
		if err != nil {
			log.Warn("executable of the manifest", "path", e.Path, "err", err)
			continue
		}
		out = append(out, v)
	}
	return out
}

// superviseLSPM starts the LSPM, reaps every child that ends (PID 1
// inherits the orphans) and starts the LSPM again when it dies.
func superviseLSPM(log *slog.Logger, cfg image.GuestConfig) {
	var m image.Manifest
	if err := readJSON(image.GuestManifest, &m); err != nil {
		log.Error("manifest", "err", err)
		powerOff()
	}
	args := lspmArgs(cfg, m, verifiedAtBoot(log, cfg, m))
	env := []string{"PATH=/bin", "HOME=/root", api.EnvMachineToken + "=" + cfg.Token}
	backoff := time.Second
	for {
		started := time.Now()
		p, err := os.StartProcess(image.GuestDedi, append([]string{image.GuestDedi}, args...),
			&os.ProcAttr{Dir: "/", Env: env, Files: []*os.File{nil, os.Stdout, os.Stderr}})
		if err != nil {
			log.Error("start LSPM; powering off", "err", err)
			powerOff()
		}
		log.Info("LSPM started", "pid", p.Pid, "machine", cfg.MachineID)
		for {
			var ws unix.WaitStatus
			pid, err := unix.Wait4(-1, &ws, 0, nil)
			if err != nil {
				if errors.Is(err, unix.EINTR) {
					continue
				}
				log.Error("wait", "err", err)
				time.Sleep(time.Second)
				continue
			}
			if pid == p.Pid {
				log.Error("LSPM exited", "status", exitStatus(ws))
				break
			}
		}
		if time.Since(started) > time.Minute {
			backoff = time.Second
		}
		time.Sleep(backoff)
		backoff = min(2*backoff, 30*time.Second)
	}
}

// uptime is the time since the kernel started, from /proc/uptime.
func uptime() string {
	raw, err := os.ReadFile("/proc/uptime")
	if err != nil {
		return "?"
	}
	f, _, _ := strings.Cut(string(raw), " ")
	return f + "s"
}

func exitStatus(ws unix.WaitStatus) string {
	if ws.Signaled() {
		return ws.Signal().String()
	}
	return "exit " + strconv.Itoa(ws.ExitStatus())
}

func powerOff() {
	unix.Sync()
	time.Sleep(100 * time.Millisecond) // let the console drain
	_ = unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	select {} // PID 1 must not exit
}

// netlink is a NETLINK_ROUTE socket for the few requests the init makes.
type netlink struct {
	fd  int
	seq uint32
}

func newNetlink() (*netlink, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("netlink: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("netlink: %w", err)
	}
	return &netlink{fd: fd}, nil
}

func (n *netlink) close() { unix.Close(n.fd) }

func (n *netlink) linkUp(index int) error {
	b := make([]byte, unix.SizeofIfInfomsg)
	b[0] = unix.AF_UNSPEC
	binary.NativeEndian.PutUint32(b[4:], uint32(index))
	binary.NativeEndian.PutUint32(b[8:], unix.IFF_UP)  // flags
	binary.NativeEndian.PutUint32(b[12:], unix.IFF_UP) // change
	return n.request(unix.RTM_NEWLINK, 0, b)
}

func (n *netlink) addAddr(index int, p netip.Prefix) error {
	b := make([]byte, unix.SizeofIfAddrmsg)
	b[0] = unix.AF_INET
	b[1] = byte(p.Bits())
	b[3] = unix.RT_SCOPE_UNIVERSE
	binary.NativeEndian.PutUint32(b[4:], uint32(index))
	a := p.Addr().As4()
	b = rtattr(b, unix.IFA_LOCAL, a[:])
	b = rtattr(b, unix.IFA_ADDRESS, a[:])
	return n.request(unix.RTM_NEWADDR, unix.NLM_F_CREATE|unix.NLM_F_REPLACE, b)
}

func (n *netlink) addDefaultRoute(index int, gw netip.Addr) error {
	b := make([]byte, unix.SizeofRtMsg)
	b[0] = unix.AF_INET
	b[4] = unix.RT_TABLE_MAIN
	b[5] = unix.RTPROT_BOOT
	b[6] = unix.RT_SCOPE_UNIVERSE
	b[7] = unix.RTN_UNICAST
	g := gw.As4()
	b = rtattr(b, unix.RTA_GATEWAY, g[:])
	var oif [4]byte
	binary.NativeEndian.PutUint32(oif[:], uint32(index))
	b = rtattr(b, unix.RTA_OIF, oif[:])
	return n.request(unix.RTM_NEWROUTE, unix.NLM_F_CREATE|unix.NLM_F_REPLACE, b)
}

// rtattr appends one route attribute, padded to 4 bytes.
func rtattr(b []byte, typ uint16, data []byte) []byte {
	var h [unix.SizeofRtAttr]byte
	binary.NativeEndian.PutUint16(h[0:], uint16(unix.SizeofRtAttr+len(data)))
	binary.NativeEndian.PutUint16(h[2:], typ)
	b = append(append(b, h[:]...), data...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

// request sends one message and waits for the kernel's acknowledgement.
func (n *netlink) request(typ uint16, flags uint16, body []byte) error {
	n.seq++
	msg := make([]byte, unix.SizeofNlMsghdr, unix.SizeofNlMsghdr+len(body))
	binary.NativeEndian.PutUint32(msg[0:], uint32(unix.SizeofNlMsghdr+len(body)))
	binary.NativeEndian.PutUint16(msg[4:], typ)
	binary.NativeEndian.PutUint16(msg[6:], flags|unix.NLM_F_REQUEST|unix.NLM_F_ACK)
	binary.NativeEndian.PutUint32(msg[8:], n.seq)
	msg = append(msg, body...)
	if err := unix.Sendto(n.fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return err
	}
	buf := make([]byte, 8192)
	for {
		nr, _, err := unix.Recvfrom(n.fd, buf, 0)
		if err != nil {
			return err
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:nr])
		if err != nil {
			return err
		}
		for _, m := range msgs {
			if m.Header.Seq != n.seq || m.Header.Type != unix.NLMSG_ERROR {
				continue
			}
			if len(m.Data) < 4 {
				return errors.New("netlink: short ack")
			}
			if code := int32(binary.NativeEndian.Uint32(m.Data)); code != 0 {
				return unix.Errno(-code)
			}
			return nil
		}
	}
}
