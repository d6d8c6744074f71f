package image

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// cpioEntry is one entry read back by readCPIO.
type cpioEntry struct {
	name         string
	mode         uint32
	major, minor uint32
	data         []byte
}

// readCPIO parses the newc archives of an initramfs (gzip members or
// plain, concatenated, as the kernel reads them) for the tests.
func readCPIO(t *testing.T, raw []byte) []cpioEntry {
	t.Helper()
	var out []cpioEntry
	for len(raw) > 0 {
		if raw[0] == 0x1f { // a gzip member: a bytes.Reader is not read past its end
			br := bytes.NewReader(raw)
			zr, err := gzip.NewReader(br)
			if err != nil {
				t.Fatal(err)
			}
			zr.Multistream(false)
			plain, err := io.ReadAll(zr)
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, readCPIO(t, plain)...)
			raw = raw[len(raw)-br.Len():]
			continue
		}
		if raw[0] == 0 {
			raw = raw[1:]
			continue
		}
		if len(raw) < 110 || string(raw[:6]) != "070701" {
			t.Fatalf("bad cpio header %q", raw[:min(len(raw), 16)])
		}
		field := func(i int) uint32 {
			v, err := strconv.ParseUint(string(raw[6+8*i:14+8*i]), 16, 32)
			if err != nil {
				t.Fatal(err)
			}
			return uint32(v)
		}
		mode, size, major, minor, nameSize := field(1), field(6), field(9), field(10), field(11)
		name := string(raw[110 : 110+nameSize-1])
		off := (110 + int(nameSize) + 3) &^ 3
		data := raw[off : off+int(size)]
		raw = raw[(off+int(size)+3)&^3:]
		if name == "TRAILER!!!" {
			continue
		}
		out = append(out, cpioEntry{name: name, mode: mode, major: major, minor: minor, data: data})
	}
	return out
}

func TestCPIORoundTrip(t *testing.T) {
	var buf bytes.Buffer
	c := NewCPIO(&buf)
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(c.Dir("/etc", 0o755))
	must(c.File("/etc/a", 0o600, []byte("hello")))
	must(c.File("etc/b", 0o755, []byte{}))
	must(c.Symlink("/etc/c", "a"))
	must(c.CharDev("/dev/console", 0o600, 5, 1))
	must(c.Close())
	if buf.Len()%4 != 0 {
		t.Errorf("archive of %d bytes is not 4-aligned", buf.Len())
	}
	got := readCPIO(t, buf.Bytes())
	want := []cpioEntry{
		{name: "etc", mode: 0o040755},
		{name: "etc/a", mode: 0o100600, data: []byte("hello")},
		{name: "etc/b", mode: 0o100755, data: []byte{}},
		{name: "etc/c", mode: 0o120777, data: []byte("a")},
		{name: "dev/console", mode: 0o020600, major: 5, minor: 1},
	}
	if len(got) != len(want) {
		t.Fatalf("read %d entries, want %d: %+v", len(got), len(want), got)
	}
	for i := range want {
		if got[i].name != want[i].name || got[i].mode != want[i].mode || !bytes.Equal(got[i].data, want[i].data) ||
			got[i].major != want[i].major || got[i].minor != want[i].minor {
			t.Errorf("entry %d = %+v, want %+v", i, got[i], want[i])
		}
	}
	for _, bad := range []string{"", "/", "TRAILER!!!", "a\x00b"} {
		if err := NewCPIO(io.Discard).File(bad, 0o644, nil); err == nil {
			t.Errorf("File(%q) accepted", bad)
		}
	}
	if err := c.File("/late", 0o644, nil); err == nil {
		t.Error("File after Close accepted")
	}
	// cpio(1), where installed, agrees.
	if _, err := exec.LookPath("cpio"); err == nil {
		cmd := exec.Command("cpio", "-t")
		cmd.Stdin = bytes.NewReader(buf.Bytes())
		out, err := cmd.CombinedOutput()
		if err != nil || !strings.Contains(string(out), "etc/a") {
			t.Errorf("cpio -t: %v\n%s", err, out)
		}
	}
}

func TestCompareVersions(t *testing.T) {
	sorted := []string{"vmlinuz-5.10.0-9-cloud-amd64", "vmlinuz-6.1.0-9-cloud-amd64", "vmlinuz-6.1.0-10-cloud-amd64", "vmlinuz-6.1.0-56-cloud-amd64", "vmlinuz-6.12.0-1-cloud-amd64"}
	for i := range sorted {
		for j := range sorted {
			got := compareVersions(sorted[i], sorted[j])
			if (i < j && got >= 0) || (i > j && got <= 0) || (i == j && got != 0) {
				t.Errorf("compareVersions(%s, %s) = %d", sorted[i], sorted[j], got)
			}
		}
	}
}

func TestNewestKernel(t *testing.T) {
	dir := t.TempDir()
	for _, v := range []string{"6.1.0-9", "6.1.0-10", "6.1.0-2"} {
		if err := os.WriteFile(filepath.Join(dir, "vmlinuz-"+v+"-cloud-amd64"), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	got, err := newestKernel(filepath.Join(dir, "vmlinuz-*-cloud-amd64"))
	if err != nil || filepath.Base(got) != "vmlinuz-6.1.0-10-cloud-amd64" {
		t.Errorf("newestKernel = %q, %v", got, err)
	}
	if _, err := newestKernel(filepath.Join(dir, "nothing-*")); err == nil || !strings.Contains(err.Error(), "linux-image-cloud-amd64") {
		t.Errorf("no kernel: %v, want a hint to install one", err)
	}
}

// fakeModules writes a modules tree like Debian's cloud kernel's.
func fakeModules(t *testing.T, dir string, gz bool) {
	t.Helper()
	mods := map[string][]string{
		"kernel/drivers/virtio/virtio_ring.ko":           nil,
		"kernel/drivers/virtio/virtio.ko":                {"kernel/drivers/virtio/virtio_ring.ko"},
		"kernel/drivers/virtio/virtio_pci_legacy_dev.ko": nil,
		"kernel/drivers/virtio/virtio_pci_modern_dev.ko": nil,
		"kernel/drivers/virtio/virtio_pci.ko":            {"kernel/drivers/virtio/virtio_pci_legacy_dev.ko", "kernel/drivers/virtio/virtio_pci_modern_dev.ko", "kernel/drivers/virtio/virtio.ko", "kernel/drivers/virtio/virtio_ring.ko"},
		"kernel/net/core/failover.ko":                    nil,
		"kernel/drivers/net/net_failover.ko":             {"kernel/net/core/failover.ko"},
		"kernel/drivers/net/virtio_net.ko":               {"kernel/drivers/net/net_failover.ko", "kernel/net/core/failover.ko", "kernel/drivers/virtio/virtio.ko", "kernel/drivers/virtio/virtio_ring.ko"},
		"kernel/drivers/char/hw_random/virtio-rng.ko":    {"kernel/drivers/virtio/virtio.ko", "kernel/drivers/virtio/virtio_ring.ko"},
	}
	var dep strings.Builder
	names := make([]string, 0, len(mods))
	for m := range mods {
		names = append(names, m)
	}
	slices.Sort(names)
	suffix := func(s string) string {
		if gz {
			return s + ".gz"
		}
		return s
	}
	for _, m := range names {
		var deps []string
		for _, d := range mods[m] {
			deps = append(deps, suffix(d))
		}
		fmt.Fprintf(&dep, "%s: %s\n", suffix(m), strings.Join(deps, " "))
		p := filepath.Join(dir, suffix(m))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		content := []byte("module " + m)
		if gz {
			var b bytes.Buffer
			zw := gzip.NewWriter(&b)
			zw.Write(content)
			zw.Close()
			content = b.Bytes()
		}
		if err := os.WriteFile(p, content, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "modules.dep"), []byte(dep.String()), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestResolveModules: the network modules come with their dependencies,
// each after what it needs; the installed cloud kernel gives the issue's
// list.
func TestResolveModules(t *testing.T) {
	want := []string{"virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci", "failover", "net_failover", "virtio_net"}
	check := func(t *testing.T, modDir string) {
		t.Helper()
		got, err := resolveModules(modDir, netModules)
		if err != nil {
			t.Fatal(err)
		}
		deps, _ := readModulesDep(filepath.Join(modDir, "modules.dep"))
		pos := map[string]int{}
		var names []string
		for i, m := range got {
			pos[m] = i
			names = append(names, moduleName(m))
		}
		for _, m := range deps {
			if _, ok := pos[m.rel]; !ok {
				continue
			}
			for _, d := range m.deps {
				if pd, ok := pos[d]; !ok || pd > pos[m.rel] {
					t.Errorf("%s loads before its dependency %s: %v", m.rel, d, got)
				}
			}
		}
		s1, s2 := slices.Clone(names), slices.Clone(want)
		slices.Sort(s1)
		slices.Sort(s2)
		if !slices.Equal(s1, s2) {
			t.Errorf("modules %v, want %v", names, want)
		}
	}
	t.Run("fake", func(t *testing.T) {
		dir := t.TempDir()
		fakeModules(t, dir, false)
		check(t, dir)
	})
	t.Run("builtin", func(t *testing.T) {
		dir := t.TempDir()
		fakeModules(t, dir, false)
		os.WriteFile(filepath.Join(dir, "modules.builtin"), []byte("kernel/drivers/virtio/virtio_pci.ko\n"), 0o644)
		got, err := resolveModules(dir, netModules)
		if err != nil || slices.ContainsFunc(got, func(s string) bool { return moduleName(s) == "virtio_pci" }) {
			t.Errorf("with virtio_pci built in: %v, %v", got, err)
		}
	})
	t.Run("missing", func(t *testing.T) {
		dir := t.TempDir()
		os.WriteFile(filepath.Join(dir, "modules.dep"), []byte("kernel/x.ko:\n"), 0o644)
		if _, err := resolveModules(dir, netModules); err == nil {
			t.Error("resolved modules a kernel does not have")
		}
	})
	t.Run("installed", func(t *testing.T) {
		ks, _ := filepath.Glob(KernelGlob)
		if len(ks) == 0 {
			t.Skip("no cloud kernel installed")
		}
		k, _ := newestKernel(KernelGlob)
		check(t, filepath.Join("/lib/modules", strings.TrimPrefix(filepath.Base(k), "vmlinuz-")))
	})
}

func TestModuleData(t *testing.T) {
	dir := t.TempDir()
	fakeModules(t, dir, true)
	raw, err := moduleData(filepath.Join(dir, "kernel/drivers/net/virtio_net.ko.gz"))
	if err != nil || string(raw) != "module kernel/drivers/net/virtio_net.ko" {
		t.Errorf("gzip module = %q, %v", raw, err)
	}
	if got := guestModulePath("6.1", "kernel/drivers/net/virtio_net.ko.gz"); got != "/lib/modules/6.1/kernel/drivers/net/virtio_net.ko" {
		t.Errorf("guest path %s", got)
	}
	p := filepath.Join(dir, "x.ko.zst")
	os.WriteFile(p, []byte("z"), 0o644)
	if _, err := moduleData(p); err == nil {
		t.Error("a zstd module was accepted")
	}
}

// buildBins builds a static dedi and game (the echo example) once.
var buildBins = sync.OnceValues(func() ([2]string, error) {
	dir, err := os.MkdirTemp("", "dedi-image-test-")
	if err != nil {
		return [2]string{}, err
	}
	bins := [2]string{filepath.Join(dir, "dedi"), filepath.Join(dir, "build", "echo")}
	for i, pkg := range []string{"dedi.dev/dedi/cmd/dedi", "dedi.dev/dedi/examples/echo"} {
		cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", bins[i], pkg)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			return bins, fmt.Errorf("build %s: %v\n%s", pkg, err, out)
		}
	}
	return bins, nil
})

func TestMain(m *testing.M) {
	code := m.Run()
	if bins, err := buildBins(); err == nil && bins[0] != "" {
		os.RemoveAll(filepath.Dir(bins[0]))
	}
	os.Exit(code)
}

// fakeKernel makes a kernel and modules tree for builds that do not boot.
func fakeKernel(t *testing.T) qemuBuild {
	root := t.TempDir()
	os.MkdirAll(filepath.Join(root, "boot"), 0o755)
	os.WriteFile(filepath.Join(root, "boot", "vmlinuz-6.1.0-1-cloud-amd64"), []byte("kernel"), 0o644)
	fakeModules(t, filepath.Join(root, "modules", "6.1.0-1-cloud-amd64"), false)
	return qemuBuild{kernelGlob: filepath.Join(root, "boot", "vmlinuz-*-cloud-amd64"), modRoot: filepath.Join(root, "modules")}
}

func buildOptions(t *testing.T, out string) Options {
	bins, err := buildBins()
	if err != nil {
		t.Fatal(err)
	}
	dedi, echo := bins[0], bins[1]
	return Options{Format: "qemu", Name: "echo", BuildDir: filepath.Dir(echo), Command: []string{"echo", "--flag"},
		OutDir: out, DediBinary: dedi, DediVersion: "test"}
}

// TestBuildQEMU: the image dir holds the kernel, the initramfs with
// everything the init needs, and the manifest; a second build of the same
// inputs gives the same bytes.
func TestBuildQEMU(t *testing.T) {
	t.Setenv("SOURCE_DATE_EPOCH", "1700000000")
	b := fakeKernel(t)
	out := t.TempDir()
	o := buildOptions(t, out)
	m, err := scan(o)
	if err != nil {
		t.Fatal(err)
	}
	ref, err := b.build(t.Context(), o, m)
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(out, "echo")
	if ref != "qemu:"+dir {
		t.Fatalf("ref %q", ref)
	}
	if got, err := ParseQEMURef(ref); err != nil || got != dir {
		t.Errorf("ParseQEMURef(%q) = %q, %v", ref, got, err)
	}
	lm, img, err := LoadQEMU(dir)
	if err != nil {
		t.Fatal(err)
	}
	if lm.Command[0] != "/opt/game/echo" || lm.Command[1] != "--flag" || img.KernelVersion != "6.1.0-1-cloud-amd64" || len(img.Modules) != 8 {
		t.Errorf("manifest %+v, image %+v", lm, img)
	}
	if k, _ := os.ReadFile(filepath.Join(dir, QEMUKernelFile)); string(k) != "kernel" {
		t.Errorf("kernel copied as %q", k)
	}
	raw, err := os.ReadFile(filepath.Join(dir, QEMUInitramfsFile))
	if err != nil {
		t.Fatal(err)
	}
	entries := map[string]cpioEntry{}
	var order []string
	for _, e := range readCPIO(t, raw) {
		entries["/"+e.name] = e
		order = append(order, "/"+e.name)
	}
	dedi, _ := os.ReadFile(o.DediBinary)
	echo, _ := os.ReadFile(filepath.Join(o.BuildDir, "echo"))
	if e := entries[GuestDedi]; !bytes.Equal(e.data, dedi) || e.mode != 0o100755 {
		t.Errorf("%s: mode %o, %d bytes", GuestDedi, e.mode, len(e.data))
	}
	if e := entries["/opt/game/echo"]; !bytes.Equal(e.data, echo) || e.mode&0o111 == 0 {
		t.Errorf("/opt/game/echo: mode %o, %d bytes", e.mode, len(e.data))
	}
	if e := entries["/dev/console"]; e.mode != 0o020600 || e.major != 5 || e.minor != 1 {
		t.Errorf("/dev/console: %+v", e)
	}
	var gm Manifest
	if err := json.Unmarshal(entries[GuestManifest].data, &gm); err != nil || gm.Executables[0].SHA256 != fmt.Sprintf("%x", sha256.Sum256(echo)) {
		t.Errorf("guest manifest %+v, %v", gm, err)
	}
	var gi QEMUImage
	if err := json.Unmarshal(entries[GuestImageConfig].data, &gi); err != nil || !slices.Equal(gi.Modules, img.Modules) {
		t.Errorf("guest image config %+v, %v", gi, err)
	}
	for _, p := range gi.Modules {
		if _, ok := entries[p]; !ok {
			t.Errorf("module %s not in the initramfs", p)
		}
	}
	// Every entry's directory comes before it.
	for i, p := range order {
		if d := filepath.Dir(p); d != "/" && !slices.Contains(order[:i], d) {
			t.Errorf("%s comes before its directory %s", p, d)
		}
	}
	if _, ok := entries[GuestMachineConfig]; ok {
		t.Error("the image holds a machine config")
	}

	// Reproducible: the same inputs again give the same bytes.
	m2, _ := scan(o)
	if _, err := b.build(t.Context(), o, m2); err != nil {
		t.Fatal(err)
	}
	raw2, _ := os.ReadFile(filepath.Join(dir, QEMUInitramfsFile))
	if !bytes.Equal(raw, raw2) {
		t.Error("a second build of the same inputs differs")
	}
	if left, _ := filepath.Glob(filepath.Join(out, ".*")); len(left) != 0 {
		t.Errorf("build left %v", left)
	}
}

// TestMachineInitramfs: a machine's config cpio, appended to the image's,
// is read after it and validated first.
func TestMachineInitramfs(t *testing.T) {
	gc := GuestConfig{MachineID: "m-1", Token: "0123456789abcdef0123", VMMURL: "http://10.0.2.2:7700", Address: "127.0.0.9",
		LSPMPort: 7701, PortMin: 30000, PortMax: 30009, IP: "10.0.2.15/24", Gateway: "10.0.2.2"}
	raw, err := MachineInitramfs(gc)
	if err != nil {
		t.Fatal(err)
	}
	var img bytes.Buffer
	zw := gzip.NewWriter(&img)
	c := NewCPIO(zw)
	c.Dir("/etc/dedi", 0o755)
	c.Close()
	zw.Close()
	es := readCPIO(t, append(img.Bytes(), raw...))
	if len(es) != 2 || "/"+es[1].name != GuestMachineConfig || es[1].mode != 0o100600 {
		t.Fatalf("entries %+v", es)
	}
	var back GuestConfig
	if err := json.Unmarshal(es[1].data, &back); err != nil || back.Token != gc.Token || back.MachineID != gc.MachineID {
		t.Errorf("config read back %+v, %v", back, err)
	}
	for name, mut := range map[string]func(*GuestConfig){
		"no id":    func(c *GuestConfig) { c.MachineID = "" },
		"no token": func(c *GuestConfig) { c.Token = "" },
		"ports":    func(c *GuestConfig) { c.PortMin, c.PortMax = 10, 5 },
		"lspm":     func(c *GuestConfig) { c.LSPMPort = 0 },
		"no ip":    func(c *GuestConfig) { c.IP = "" },
	} {
		bad := gc
		mut(&bad)
		if _, err := MachineInitramfs(bad); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestBuildQEMUErrors(t *testing.T) {
	b := fakeKernel(t)
	out := t.TempDir()
	o := buildOptions(t, out)
	m, err := scan(o)
	if err != nil {
		t.Fatal(err)
	}
	// A dynamic dedi is refused, saying how to build a static one.
	if sh, err := exec.LookPath("sh"); err == nil {
		if real, err := filepath.EvalSymlinks(sh); err == nil && !isStatic(real) {
			d := o
			d.DediBinary = real
			if _, err := b.build(t.Context(), d, m); err == nil || !strings.Contains(err.Error(), "CGO_ENABLED=0") {
				t.Errorf("dynamic dedi: %v, want a refusal naming CGO_ENABLED=0", err)
			}
			g := t.TempDir()
			raw, _ := os.ReadFile(real)
			os.WriteFile(filepath.Join(g, "game"), raw, 0o755)
			gopts := o
			gopts.BuildDir, gopts.Command = g, []string{"game"}
			gm, err := scan(gopts)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := b.build(t.Context(), gopts, gm); err == nil || !strings.Contains(err.Error(), "dynamically linked") {
				t.Errorf("dynamic game: %v, want a refusal", err)
			}
		}
	}
	script := t.TempDir()
	os.WriteFile(filepath.Join(script, "run.sh"), []byte("#!/bin/sh\n"), 0o755)
	so := o
	so.BuildDir, so.Command = script, []string{"run.sh"}
	sm, _ := scan(so)
	if _, err := b.build(t.Context(), so, sm); err == nil || !strings.Contains(err.Error(), "not an ELF") {
		t.Errorf("script as the game: %v", err)
	}
	ko := o
	ko.Kernel = filepath.Join(t.TempDir(), "bzImage")
	if _, err := b.build(t.Context(), ko, m); err == nil || !strings.Contains(err.Error(), "vmlinuz-VERSION") {
		t.Errorf("kernel without a version: %v", err)
	}
	ko.Kernel = filepath.Join(t.TempDir(), "vmlinuz-9.9")
	if _, err := b.build(t.Context(), ko, m); err == nil {
		t.Error("a kernel that does not exist was accepted")
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, err := b.build(ctx, o, m); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled build: %v", err)
	}
	if left, _ := os.ReadDir(out); len(left) != 0 {
		t.Errorf("failed builds left %v", left)
	}
}

func isStatic(p string) bool { return checkStatic(p, "x") == nil }

func TestParseQEMURef(t *testing.T) {
	for ref, ok := range map[string]bool{
		"qemu:/var/lib/dedi/images/echo": true,
		"qemu:relative/echo":             false,
		"/var/lib/dedi/images/echo":      false,
		"docker:echo":                    false,
		"qemu:/a/../b":                   false,
		"qemu:":                          false,
	} {
		if _, err := ParseQEMURef(ref); (err == nil) != ok {
			t.Errorf("ParseQEMURef(%q): %v, want ok=%v", ref, err, ok)
		}
	}
}

// FuzzParseQEMURef: a fleet's image string is untrusted input: a
// reference that parses names an absolute, clean path.
func FuzzParseQEMURef(f *testing.F) {
	for _, s := range []string{"qemu:/a/b", "qemu:a", "qemu:/a/../b", "qemu:/", "", "qemu:/a\x00b"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, ref string) {
		dir, err := ParseQEMURef(ref)
		if err != nil {
			return
		}
		if !filepath.IsAbs(dir) || filepath.Clean(dir) != dir || strings.ContainsRune(dir, 0) || QEMURefPrefix+dir != ref {
			t.Errorf("ParseQEMURef(%q) = %q", ref, dir)
		}
	})
}
