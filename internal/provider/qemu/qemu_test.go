package qemu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"dedi.dev/dedi/api"
	"dedi.dev/dedi/internal/image"
	"dedi.dev/dedi/internal/procstat"
	"dedi.dev/dedi/internal/provider"
	"dedi.dev/dedi/internal/provider/providertest"
)

// The tests boot real VMs from an image of dedi's echo example, built
// once in TestMain. They use the loopback addresses 127.0.0.170-179 and
// game ports 42000-42099 (10 per machine); test/e2e's qemu tests use
// 127.0.0.180-189 and 42100-42199.

var (
	imageRef string // qemu:/... built in TestMain
	skipWhy  string // why VMs cannot run on this machine at all
)

func TestMain(m *testing.M) {
	os.Exit(testMain(m))
}

func testMain(m *testing.M) int {
	// A VM under TCG boots in 3-10 s, and more while the rest of the
	// suite loads both cores.
	providertest.BootTimeout = 60 * time.Second
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		skipWhy = "qemu-system-x86_64 is not installed (scripts/ci-deps.sh installs it)"
		return m.Run()
	}
	if ks, _ := filepath.Glob(image.KernelGlob); len(ks) == 0 {
		skipWhy = "no kernel matches " + image.KernelGlob + " (scripts/ci-deps.sh installs linux-image-cloud-amd64)"
		return m.Run()
	}
	dir, err := os.MkdirTemp("", "dedi-qemu-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	build := filepath.Join(dir, "build")
	for _, b := range []struct{ out, pkg string }{
		{filepath.Join(dir, "dedi"), "dedi.dev/dedi/cmd/dedi"},
		{filepath.Join(build, "echo"), "dedi.dev/dedi/examples/echo"},
	} {
		if err := providertest.GoBuild(b.out, b.pkg, "-trimpath", "-ldflags=-s -w"); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
	}
	imageRef, err = image.Build(context.Background(), image.Options{Format: "qemu", Name: "echo", BuildDir: build,
		Command: []string{"echo"}, OutDir: filepath.Join(dir, "images"), DediBinary: filepath.Join(dir, "dedi"), DediVersion: "test"})
	if err != nil {
		fmt.Fprintln(os.Stderr, "build image:", err)
		return 1
	}
	return m.Run()
}

func needVMs(t *testing.T) {
	t.Helper()
	if skipWhy != "" {
		t.Skip(skipWhy)
	}
}

func testConfig(t *testing.T, dir string) Config {
	return Config{Dir: dir, Accel: "tcg", MemoryMiB: 256, Hosts: provider.Hosts{FirstHost: 170, LastHost: 179, LSPMPort: 7701,
		PortBase: 42000, PortsPerMachine: 10}, Logger: providertest.Logger(t)}
}

func newQEMU(t *testing.T, dir string) *QEMU {
	t.Helper()
	q, err := New(testConfig(t, dir))
	if err != nil {
		t.Fatal(err)
	}
	return q
}

// cleanupDir kills, when t ends, every qemu whose command line names a
// file under dir, and shows the console logs of a failed test.
func cleanupDir(t *testing.T, dir string) {
	t.Cleanup(func() {
		if t.Failed() {
			logs, _ := filepath.Glob(filepath.Join(dir, "machines", "*", consoleFile))
			for _, l := range logs {
				raw, _ := os.ReadFile(l)
				t.Logf("%s:\n%s", l, raw)
			}
		}
		for _, pid := range qemuPIDsUnder(dir) {
			t.Errorf("qemu (pid %d) left running; killing it", pid)
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	})
}

// qemuPIDsUnder lists the processes whose command line names a path
// under dir.
func qemuPIDsUnder(dir string) []int {
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		raw, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err == nil && bytes.Contains(raw, []byte(dir+"/")) && bytes.Contains(raw, []byte("qemu")) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// newVMM starts a stand-in VMM whose machines are of the echo image.
// It listens on 127.0.0.1, which the guests reach as 10.0.2.2.
func newVMM(t *testing.T) *providertest.VMM {
	return providertest.NewVMM(t, provider.Spec{Image: imageRef, MaxProcesses: 2, ReportInterval: 200 * time.Millisecond})
}

func TestProviderContract(t *testing.T) {
	needVMs(t)
	dir := t.TempDir()
	cleanupDir(t, dir)
	vmm := newVMM(t)
	providertest.Run(t, func(t *testing.T) provider.Provider { return newQEMU(t, dir) }, vmm.Spec)
}

// TestMachineLifecycle: a VM boots with its identity from the appended
// cpio (not on qemu's command line), reports to the VMM with its token,
// runs the image's echo, answers UDP on its own address through qemu's
// forward, and Delete drains the game through the LSPM before it powers
// the VM off and removes every trace.
func TestMachineLifecycle(t *testing.T) {
	needVMs(t)
	dir := t.TempDir()
	cleanupDir(t, dir)
	vmm := newVMM(t)
	q := newQEMU(t, dir)
	sp := vmm.Spec(t, "m-life", "f")
	m, err := q.Create(t.Context(), sp)
	if err != nil {
		t.Fatal(err)
	}
	rec, err := readRecord(q.machineDir(m.ProviderID))
	if err != nil {
		t.Fatal(err)
	}
	cmdline, err := os.ReadFile("/proc/" + strconv.Itoa(rec.PID) + "/cmdline")
	if err != nil {
		t.Fatalf("qemu (pid %d) not running: %v", rec.PID, err)
	}
	if bytes.Contains(cmdline, []byte(sp.Token)) || bytes.Contains(cmdline, []byte(vmm.URL)) {
		t.Errorf("qemu's command line holds the token or the VMM URL: %q", cmdline)
	}
	// The guest boots the uncompressed kernel from the cache through its
	// PVH entry, not the image's bzImage through the BIOS.
	if args := strings.Split(string(cmdline), "\x00"); !slices.ContainsFunc(args, func(a string) bool {
		return strings.HasPrefix(a, filepath.Join(dir, "cache")+"/") && strings.HasSuffix(a, ".vmlinux")
	}) {
		t.Errorf("qemu's command line names no cached kernel: %q", cmdline)
	}
	// and skips what costs most under TCG and protects nothing in this VM.
	if !bytes.Contains(cmdline, []byte("cryptomgr.notests mitigations=off")) {
		t.Errorf("the kernel's command line runs the crypto self-tests or the mitigations: %q", cmdline)
	}
	// and seeds its random numbers from the (emulated) CPU's RDRAND.
	if !bytes.Contains(cmdline, []byte("qemu64,+rdrand")) || !bytes.Contains(cmdline, []byte("random.trust_cpu=on")) {
		t.Errorf("the guest's kernel gets no RDRAND to seed its random numbers: %q", cmdline)
	}
	if _, err := os.Stat(filepath.Join(q.machineDir(m.ProviderID), initrdFile)); !os.IsNotExist(err) {
		t.Errorf("the per-machine initrd (with the token) is kept after boot: %v", err)
	}
	providertest.WaitFor(t, "a status report with the machine's token", func() bool { return vmm.Reports(sp.MachineID) > 0 })
	if hw := vmm.Last(sp.MachineID).Hardware; hw.Hostname != sp.MachineID || !strings.HasPrefix(hw.Kernel, "6.") {
		t.Errorf("reported hardware %+v, want the guest's", hw)
	}

	var p api.Process
	if code, body := providertest.DoUntilAnswered(t, http.MethodPost, m.LSPMURL+"/v1/processes", sp.Token, `{}`, &p); code != http.StatusCreated {
		t.Fatalf("spawn: %d %s", code, body)
	}
	if len(p.Command) == 0 || p.Command[0] != "/opt/game/echo" {
		t.Errorf("spawned %q, want the image's default command", p.Command)
	}
	providertest.WaitFor(t, "the echo to be ready", func() bool {
		providertest.DoUntilAnswered(t, http.MethodGet, m.LSPMURL+"/v1/processes/"+p.ID, sp.Token, "", &p)
		return p.State == api.StateReady
	})
	port := p.Ports["game"]
	if p.Address != m.Address || port < rec.PortMin || port > rec.PortMax {
		t.Fatalf("echo on %s:%d, want %s with a port of %d-%d", p.Address, port, m.Address, rec.PortMin, rec.PortMax)
	}
	if got := providertest.UDPEcho(t, m.Address, port, "ping", 10*time.Second); got != "ping" {
		t.Fatalf("echo answered %q", got)
	}
	// The hash pin: a spawn of anything else is refused.
	if code, body := providertest.DoUntilAnswered(t, http.MethodPost, m.LSPMURL+"/v1/processes", sp.Token, `{"command":["/bin/dedi","version"]}`, nil); code != http.StatusForbidden {
		t.Errorf("spawn of /bin/dedi: %d %s, want 403", code, body)
	}

	if err := q.Delete(t.Context(), m.ProviderID); err != nil {
		t.Fatal(err)
	}
	// The drain stopped the game through the LSPM, whose reports say so.
	last, ended := vmm.Last(sp.MachineID), vmm.Ended(p.ID)
	if len(last.Processes) != 0 || ended != api.StateKilled {
		t.Errorf("last report before power-off: state %s, live %+v, echo ended %q; want none live and the echo killed", last.State, last.Processes, ended)
	}
	if running(rec.PID) {
		t.Errorf("qemu (pid %d) still runs after Delete", rec.PID)
	}
	if _, err := os.Stat(q.machineDir(m.ProviderID)); !os.IsNotExist(err) {
		t.Errorf("machine dir still there after Delete: %v", err)
	}
}

// TestPoweredOffMachine: a VM whose qemu died (a guest panic, an OOM
// kill) is still listed, so the VMM can delete it; Delete cleans up.
func TestPoweredOffMachine(t *testing.T) {
	needVMs(t)
	dir := t.TempDir()
	cleanupDir(t, dir)
	vmm := newVMM(t)
	q := newQEMU(t, dir)
	m, err := q.Create(t.Context(), vmm.Spec(t, "m-dead", "f"))
	if err != nil {
		t.Fatal(err)
	}
	rec, _ := readRecord(q.machineDir(m.ProviderID))
	if err := syscall.Kill(rec.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	providertest.WaitFor(t, "qemu to die", func() bool { return !running(rec.PID) })
	ms, err := q.List(t.Context(), "f")
	if err != nil || len(ms) != 1 || ms[0].ProviderID != m.ProviderID {
		t.Fatalf("List after qemu died = %+v, %v; want the machine", ms, err)
	}
	if err := q.Delete(t.Context(), m.ProviderID); err != nil {
		t.Fatal(err)
	}
	if ms, _ := q.List(t.Context(), ""); len(ms) != 0 {
		t.Errorf("List after Delete = %+v", ms)
	}
}

// TestCreateErrors: bad specs change nothing; an address whose forward
// is taken is skipped; past the last address, ErrNoCapacity.
func TestCreateErrors(t *testing.T) {
	needVMs(t)
	dir := t.TempDir()
	cleanupDir(t, dir)
	cfg := testConfig(t, dir)
	cfg.FirstHost, cfg.LastHost = 178, 179
	q, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	vmm := newVMM(t)
	img, _ := image.ParseQEMURef(imageRef)
	for name, mut := range map[string]func(*provider.Spec){
		"bad id":             func(s *provider.Spec) { s.MachineID = "../x" },
		"no token":           func(s *provider.Spec) { s.Token = "" },
		"no image":           func(s *provider.Spec) { s.Image = "" },
		"relative image":     func(s *provider.Spec) { s.Image = "qemu:images/echo" },
		"missing image":      func(s *provider.Spec) { s.Image = "qemu:" + filepath.Join(img, "nope") },
		"foreign command":    func(s *provider.Spec) { s.Command = []string{"/bin/dedi", "example", "echo"} },
		"foreign allow":      func(s *provider.Spec) { s.Allow = []string{"/bin/dedi"} },
		"unreachable VMM":    func(s *provider.Spec) { s.VMMURL = "http://127.0.0.5:7700" },
		"VMM on IPv6 lo":     func(s *provider.Spec) { s.VMMURL = "http://[::1]:7700" },
		"comma in image dir": func(s *provider.Spec) { s.Image = "qemu:/a,b" },
	} {
		sp := vmm.Spec(t, "m-bad", "f")
		mut(&sp)
		if _, err := q.Create(t.Context(), sp); err == nil {
			t.Errorf("%s: Create succeeded", name)
		}
	}
	if ents, _ := os.ReadDir(filepath.Join(dir, "machines")); len(ents) != 0 {
		t.Fatalf("failed creates left %d machine dirs", len(ents))
	}

	// Someone holds a game port of 127.0.0.178: its forward cannot be
	// bound, and the machine goes to 127.0.0.179.
	lo, _ := cfg.withDefaults().Ports(178)
	busy, err := net.ListenPacket("udp", net.JoinHostPort("127.0.0.178", strconv.Itoa(lo+3)))
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	sp := vmm.Spec(t, "m-one", "f")
	sp.Command = []string{"/opt/game/echo"} // an executable of the image is fine
	m, err := q.Create(t.Context(), sp)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = q.Delete(context.Background(), m.ProviderID) })
	if m.Address != "127.0.0.179" {
		t.Errorf("machine on %s, want 127.0.0.179 (a port of .178 is taken)", m.Address)
	}
	if _, err := q.Create(t.Context(), vmm.Spec(t, "m-one", "f")); err == nil {
		t.Error("Create of an existing machine id succeeded")
	}
	busy.Close()
	if _, err := q.Create(t.Context(), vmm.Spec(t, "m-two", "f")); err != nil {
		t.Fatalf("Create on the freed address: %v", err)
	} else {
		t.Cleanup(func() { _ = q.Delete(context.Background(), "m-two") })
	}
	if _, err := q.Create(t.Context(), vmm.Spec(t, "m-three", "f")); !errors.Is(err, provider.ErrNoCapacity) {
		t.Errorf("Create past the last host: %v, want ErrNoCapacity", err)
	}
}

// TestAccelProbe: "auto" probes once per host boot and keeps the
// answer for the next provider on the dir.
func TestAccelProbe(t *testing.T) {
	needVMs(t)
	dir := t.TempDir()
	q, err := New(Config{Dir: dir, Logger: providertest.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	img, _ := image.ParseQEMURef(imageRef)
	kernel := filepath.Join(img, image.QEMUKernelFile)
	a, err := q.decideAccel(t.Context(), kernel)
	if err != nil || (a != "kvm" && a != "tcg") {
		t.Fatalf("decideAccel = %q, %v", a, err)
	}
	q2, _ := New(Config{Dir: dir, Logger: providertest.Logger(t)})
	start := time.Now()
	if b, err := q2.decideAccel(t.Context(), kernel); err != nil || b != a {
		t.Errorf("second provider decided %q, %v; want %q", b, err, a)
	}
	if d := time.Since(start); d > probeTimeout/2 {
		t.Errorf("second decision took %v: probed again", d)
	}
	if q3, _ := New(Config{Dir: t.TempDir(), Accel: "tcg"}); q3.accel != "tcg" {
		t.Errorf("configured accel not taken: %q", q3.accel)
	}
}

func TestGuestURL(t *testing.T) {
	for in, want := range map[string]string{
		"":                          "",
		"http://127.0.0.1:7700":     "http://10.0.2.2:7700",
		"http://localhost:7700/":    "http://10.0.2.2:7700/",
		"http://0.0.0.0:7700":       "http://10.0.2.2:7700",
		"http://192.168.1.5:7700":   "http://192.168.1.5:7700",
		"https://vmm.example:443/x": "https://vmm.example:443/x",
		"http://127.0.0.1":          "http://10.0.2.2",
		"http://127.0.0.9:7700":     "error",
		"http://[::1]:7700":         "error",
	} {
		got, err := guestURL(in)
		if err != nil {
			got = "error"
		}
		if got != want {
			t.Errorf("guestURL(%q) = %q (%v), want %q", in, got, err, want)
		}
	}
}

func TestConfig(t *testing.T) {
	c := Config{Dir: "x"}.withDefaults()
	if err := c.Validate(); err != nil {
		t.Fatalf("defaults: %v", err)
	}
	// The local provider's plan: N picks the same ports in both.
	for n, want := range map[int][2]int{10: {30000, 30099}, 250: {54000, 54099}} {
		if lo, hi := c.Ports(n); lo != want[0] || hi != want[1] {
			t.Errorf("ports(%d) = %d-%d, want %d-%d", n, lo, hi, want[0], want[1])
		}
	}
	for name, bad := range map[string]Config{
		"no dir":         {},
		"comma":          {Dir: "a,b"},
		"accel":          {Dir: "x", Accel: "hvf"},
		"memory":         {Dir: "x", MemoryMiB: 16},
		"hosts":          {Dir: "x", Hosts: provider.Hosts{FirstHost: 20, LastHost: 10}},
		"host 1":         {Dir: "x", Hosts: provider.Hosts{FirstHost: 1}},
		"ports past 64K": {Dir: "x", Hosts: provider.Hosts{PortBase: 60000}},
		"lspm in range":  {Dir: "x", Hosts: provider.Hosts{LSPMPort: 30050}},
	} {
		if err := bad.withDefaults().Validate(); err == nil {
			t.Errorf("%s: Validate accepted %+v", name, bad)
		}
	}
}

// running reports whether pid runs (a zombie does not: the daemonized
// qemu's reaper is whoever is PID 1 here).
func running(pid int) bool {
	state, _, err := procstat.Stat(pid)
	return err == nil && state != 'Z' && state != 'X'
}

// TestKernelCache: the uncompressed kernel is made once per image kernel
// and reused; a rebuilt kernel replaces its entry; a kernel that cannot
// boot through PVH is booted as it is, and the cache remembers that.
func TestKernelCache(t *testing.T) {
	needVMs(t)
	dir := t.TempDir()
	q := newQEMU(t, dir)
	img, _ := image.ParseQEMURef(imageRef)
	own := t.TempDir() // a copy of the image's kernel, to rebuild
	raw, err := os.ReadFile(filepath.Join(img, image.QEMUKernelFile))
	if err != nil {
		t.Fatal(err)
	}
	src := filepath.Join(own, image.QEMUKernelFile)
	if err := os.WriteFile(src, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	k1, err := q.kernel(own)
	if err != nil {
		t.Fatal(err)
	}
	st1, err := os.Stat(k1)
	if err != nil || filepath.Dir(k1) != filepath.Join(dir, "cache") || st1.Size() < 2*int64(len(raw)) {
		t.Fatalf("kernel %s (%v, %v): want an uncompressed kernel in the cache", k1, st1, err)
	}
	if again, err := q.kernel(own); err != nil || again != k1 {
		t.Fatalf("second lookup %s, %v; want %s", again, err, k1)
	}
	if st, _ := os.Stat(k1); !st.ModTime().Equal(st1.ModTime()) {
		t.Error("the cached kernel was made again")
	}

	// A kernel that is no bzImage (or no PVH kernel): qemu gets it as it is.
	if err := os.WriteFile(src, []byte("not a kernel"), 0o644); err != nil {
		t.Fatal(err)
	}
	k2, err := q.kernel(own)
	if err != nil || k2 != src {
		t.Fatalf("kernel of a non-PVH image %s, %v; want %s", k2, err, src)
	}
	ents, _ := filepath.Glob(filepath.Join(dir, "cache", "*.vmlinux"))
	if len(ents) != 1 || ents[0] == k1 {
		t.Fatalf("cache entries %v, want one, replacing %s", ents, k1)
	}
	if st, _ := os.Stat(ents[0]); st.Size() != 0 {
		t.Errorf("the entry of a non-PVH kernel holds %d bytes, want none", st.Size())
	}
}

// TestVerifiedInitramfs: the image's initramfs is checked against its
// manifest once on the host; one whose executable was changed is not
// vouched for (its machines hash the file themselves, and refuse it).
func TestVerifiedInitramfs(t *testing.T) {
	needVMs(t)
	dir := t.TempDir()
	q := newQEMU(t, dir)
	img, _ := image.ParseQEMURef(imageRef)
	plain, err := q.plainInitramfs(img)
	if err != nil {
		t.Fatal(err)
	}
	if !q.verifiedInitramfs(plain) {
		t.Fatal("the image's own initramfs is not verified")
	}
	raw, err := os.ReadFile(plain)
	if err != nil {
		t.Fatal(err)
	}
	i := bytes.Index(raw, []byte("opt/game/echo\x00"))
	if i < 0 {
		t.Fatal("no echo in the initramfs")
	}
	raw[i+len("opt/game/echo")+200] ^= 0xff // a byte of the echo's content
	bad := filepath.Join(dir, "bad.cpio")
	if err := os.WriteFile(bad, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	if q.verifiedInitramfs(bad) {
		t.Error("an initramfs whose executable changed is verified")
	}
}
