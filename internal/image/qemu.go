package image

import (
	"bufio"
	"compress/gzip"
	"context"
	"debug/elf"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"
)

// The qemu format: a directory OutDir/NAME holding
//
//	vmlinuz             the kernel (Debian's cloud kernel by default)
//	initramfs.cpio.gz   the root file system: dedi, the game build, the
//	                    manifest, the virtio network modules
//	manifest.json       the manifest, also at /etc/dedi/manifest.json inside
//	qemu.json           the kernel version and the modules' load order
//
// Its reference is "qemu:" and the directory's absolute path. The
// initramfs is reproducible: the same inputs (and manifest, whose
// createdAt follows SOURCE_DATE_EPOCH when set) give the same bytes.

// KernelGlob finds the default kernel: the newest Debian cloud kernel.
const KernelGlob = "/boot/vmlinuz-*-cloud-amd64"

// netModules are the modules the guest needs for its network, loaded
// with their dependencies (from modules.dep) first.
var netModules = []string{"virtio_pci", "virtio_net"}

// qemuBuild is where buildQEMU reads the host's kernel and modules;
// tests point it at a fake tree.
type qemuBuild struct {
	kernelGlob string
	modRoot    string // /lib/modules
}

func buildQEMU(ctx context.Context, o Options, m Manifest) (string, error) {
	return qemuBuild{kernelGlob: KernelGlob, modRoot: "/lib/modules"}.build(ctx, o, m)
}

func (b qemuBuild) build(ctx context.Context, o Options, m Manifest) (string, error) {
	if o.OutDir == "" {
		return "", errors.New("qemu image: no output dir")
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if sde := os.Getenv("SOURCE_DATE_EPOCH"); sde != "" {
		// Reproducible builds: the manifest's time is the source's.
		secs, err := strconv.ParseInt(sde, 10, 64)
		if err != nil {
			return "", fmt.Errorf("SOURCE_DATE_EPOCH %q: %w", sde, err)
		}
		m.CreatedAt = time.Unix(secs, 0).UTC()
	}
	kernel := o.Kernel
	if kernel == "" {
		var err error
		if kernel, err = newestKernel(b.kernelGlob); err != nil {
			return "", err
		}
	}
	kver, ok := strings.CutPrefix(filepath.Base(kernel), "vmlinuz-")
	if !ok || kver == "" {
		return "", fmt.Errorf("kernel %s: want a file named vmlinuz-VERSION, with its modules in %s/VERSION", kernel, b.modRoot)
	}
	if st, err := os.Stat(kernel); err != nil {
		return "", fmt.Errorf("kernel: %w (install Debian's linux-image-cloud-amd64)", err)
	} else if !st.Mode().IsRegular() {
		return "", fmt.Errorf("kernel %s is not a file", kernel)
	}
	if err := checkStatic(o.DediBinary, "dedi"); err != nil {
		return "", err
	}
	main := filepath.Join(o.BuildDir, filepath.FromSlash(strings.TrimPrefix(m.Command[0], GameDir+"/")))
	if err := checkStatic(main, "the game server"); err != nil {
		return "", err
	}
	for _, e := range m.Executables {
		p := filepath.Join(o.BuildDir, filepath.FromSlash(strings.TrimPrefix(e.Path, GameDir+"/")))
		if e.Path != m.Command[0] && checkStatic(p, "executable") != nil {
			o.Log.Warn("executable the VM cannot run (not a static x86-64 ELF); spawns of it will fail", "path", e.Path)
		}
	}
	mods, err := resolveModules(filepath.Join(b.modRoot, kver), netModules)
	if err != nil {
		return "", err
	}
	img := QEMUImage{KernelVersion: kver}
	for _, mod := range mods {
		img.Modules = append(img.Modules, guestModulePath(kver, mod))
	}
	if err := ctx.Err(); err != nil {
		return "", err
	}

	outDir, err := filepath.Abs(o.OutDir)
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return "", fmt.Errorf("qemu image: %w", err)
	}
	tmp, err := os.MkdirTemp(outDir, "."+o.Name+".build-")
	if err != nil {
		return "", fmt.Errorf("qemu image: %w", err)
	}
	defer os.RemoveAll(tmp) // after the rename, nothing is left to remove
	if err := os.Chmod(tmp, 0o755); err != nil {
		return "", err
	}
	if err := writeInitramfs(ctx, filepath.Join(tmp, QEMUInitramfsFile), o, m, img, filepath.Join(b.modRoot, kver), mods); err != nil {
		return "", fmt.Errorf("qemu image: initramfs: %w", err)
	}
	if err := copyFile(kernel, filepath.Join(tmp, QEMUKernelFile), 0o644); err != nil {
		return "", fmt.Errorf("qemu image: kernel: %w", err)
	}
	mraw, err := marshalManifest(m)
	if err != nil {
		return "", err
	}
	iraw, err := json.MarshalIndent(img, "", "  ")
	if err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(tmp, ManifestFile), append(mraw, '\n'), 0o644); err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(tmp, QEMUImageFile), append(iraw, '\n'), 0o644); err != nil {
		return "", err
	}
	final := filepath.Join(outDir, o.Name)
	if err := replaceDir(tmp, final); err != nil {
		return "", fmt.Errorf("qemu image: %w", err)
	}
	o.Log.Info("qemu image built", "dir", final, "kernel", kver, "modules", len(mods))
	return QEMURefPrefix + final, nil
}

// replaceDir moves the built dir tmp to final, replacing an older image
// of the same name. Machines already booted from the older one are not
// affected: qemu read its files at start.
func replaceDir(tmp, final string) error {
	if err := os.Rename(tmp, final); err == nil {
		return nil
	} else if _, serr := os.Stat(final); serr != nil {
		return err
	}
	old := tmp + ".old"
	if err := os.Rename(final, old); err != nil {
		return err
	}
	if err := os.Rename(tmp, final); err != nil {
		_ = os.Rename(old, final)
		return err
	}
	return os.RemoveAll(old)
}

// newestKernel picks the newest kernel matching glob, by version order.
func newestKernel(glob string) (string, error) {
	ks, err := filepath.Glob(glob)
	if err != nil {
		return "", err
	}
	if len(ks) == 0 {
		return "", fmt.Errorf("no kernel matches %s: install Debian's linux-image-cloud-amd64, or name a kernel", glob)
	}
	slices.SortFunc(ks, func(a, b string) int { return compareVersions(filepath.Base(a), filepath.Base(b)) })
	return ks[len(ks)-1], nil
}

// compareVersions orders strings such as vmlinuz-6.1.0-9-cloud-amd64 and
// vmlinuz-6.1.0-10-cloud-amd64: runs of digits compare as numbers.
func compareVersions(a, b string) int {
	for a != "" && b != "" {
		da, db := digitRun(a), digitRun(b)
		if da > 0 && db > 0 {
			na, _ := strconv.ParseUint(a[:da], 10, 64)
			nb, _ := strconv.ParseUint(b[:db], 10, 64)
			if na != nb {
				if na < nb {
					return -1
				}
				return 1
			}
			a, b = a[da:], b[db:]
			continue
		}
		if a[0] != b[0] {
			if a[0] < b[0] {
				return -1
			}
			return 1
		}
		a, b = a[1:], b[1:]
	}
	return len(a) - len(b)
}

func digitRun(s string) int {
	i := 0
	for i < len(s) && s[i] >= '0' && s[i] <= '9' {
		i++
	}
	return i
}

// checkStatic refuses an executable the guest cannot run: the image has
// no C library and no dynamic loader.
func checkStatic(p, what string) error {
	f, err := elf.Open(p)
	if err != nil {
		return fmt.Errorf("%s %s: not an ELF executable the VM can run: %w", what, p, err)
	}
	defer f.Close()
	if f.Machine != elf.EM_X86_64 {
		return fmt.Errorf("%s %s: built for %v, the VM is x86-64", what, p, f.Machine)
	}
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			return fmt.Errorf("%s %s is dynamically linked, and a qemu image has no C library: build it statically (for Go: CGO_ENABLED=0 go build)", what, p)
		}
	}
	return nil
}

// module is one kernel module: its path relative to the modules dir.
type module struct {
	rel  string
	deps []string // rels, as modules.dep lists them
}

// moduleName is a module's name as modprobe knows it: virtio-rng and
// virtio_rng are the same.
func moduleName(rel string) string {
	b := path.Base(rel)
	for _, ext := range []string{".gz", ".xz", ".zst"} {
		b = strings.TrimSuffix(b, ext)
	}
	return strings.ReplaceAll(strings.TrimSuffix(b, ".ko"), "-", "_")
}

// resolveModules returns the modules to load for names, dependencies
// first, from modDir's modules.dep; modules built into the kernel
// (modules.builtin) need no loading and are left out.
func resolveModules(modDir string, names []string) ([]string, error) {
	deps, err := readModulesDep(filepath.Join(modDir, "modules.dep"))
	if err != nil {
		return nil, fmt.Errorf("kernel modules: %w", err)
	}
	builtin := map[string]bool{}
	if raw, err := os.ReadFile(filepath.Join(modDir, "modules.builtin")); err == nil {
		for _, l := range strings.Fields(string(raw)) {
			builtin[moduleName(l)] = true
		}
	}
	byName := map[string]module{}
	for _, m := range deps {
		byName[moduleName(m.rel)] = m
	}
	var order []string
	seen := map[string]bool{}
	var visit func(rel string)
	visit = func(rel string) {
		if seen[rel] {
			return
		}
		seen[rel] = true
		m := byName[moduleName(rel)]
		// modules.dep lists every dependency, the deepest last:
		// modprobe loads them from the end.
		for i := len(m.deps) - 1; i >= 0; i-- {
			visit(m.deps[i])
		}
		order = append(order, rel)
	}
	for _, n := range names {
		if builtin[n] {
			continue
		}
		m, ok := byName[n]
		if !ok {
			return nil, fmt.Errorf("kernel modules: %s is neither a module in %s/modules.dep nor built in", n, modDir)
		}
		visit(m.rel)
	}
	for _, rel := range order {
		if _, err := os.Stat(filepath.Join(modDir, rel)); err != nil {
			return nil, fmt.Errorf("kernel modules: %w", err)
		}
	}
	return order, nil
}

func readModulesDep(p string) ([]module, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []module
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		name, deps, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		out = append(out, module{rel: strings.TrimSpace(name), deps: strings.Fields(deps)})
	}
	return out, sc.Err()
}

// guestModulePath is where a module lands in the guest: gzip ones are
// unpacked at build (the guest loads plain .ko files).
func guestModulePath(kver, rel string) string {
	return path.Join("/lib/modules", kver, strings.TrimSuffix(rel, ".gz"))
}

// moduleData reads a module for the guest. Modules compressed with xz or
// zstd would need the kernel to decompress them (finit_module's
// MODULE_INIT_COMPRESSED_FILE, Linux 6.4+); Debian's cloud kernels ship
// them plain, so only gzip is unpacked here and the others are refused.
func moduleData(p string) ([]byte, error) {
	switch {
	case strings.HasSuffix(p, ".ko"):
		return os.ReadFile(p)
	case strings.HasSuffix(p, ".ko.gz"):
		f, err := os.Open(p)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		zr, err := gzip.NewReader(f)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", p, err)
		}
		return io.ReadAll(io.LimitReader(zr, 256<<20))
	}
	return nil, fmt.Errorf("module %s: only plain and gzip-compressed modules are supported", p)
}

// writeInitramfs writes the image's root file system: a gzipped newc
// cpio with sorted entries, no times and no owners.
func writeInitramfs(ctx context.Context, dst string, o Options, m Manifest, img QEMUImage, modDir string, mods []string) error {
	f, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	bw := bufio.NewWriterSize(f, 1<<20)
	zw, err := gzip.NewWriterLevel(bw, gzip.DefaultCompression)
	if err != nil {
		return err
	}
	// No name, no time in the gzip header: reproducible.
	cp := NewCPIO(zw)
	dirs := map[string]bool{}
	mkdirs := func(p string) error {
		var chain []string
		for d := path.Dir(p); d != "/" && !dirs[d]; d = path.Dir(d) {
			chain = append(chain, d)
		}
		for i := len(chain) - 1; i >= 0; i-- {
			dirs[chain[i]] = true
			if err := cp.Dir(chain[i], 0o755); err != nil {
				return err
			}
		}
		return nil
	}
	for _, d := range []string{"/bin", "/dev", "/etc", "/etc/dedi", "/lib", "/opt", "/proc", "/root", "/run", "/sys", "/var", "/var/lib", GuestDataDir, GameDir} {
		if err := mkdirs(d + "/x"); err != nil {
			return err
		}
	}
	if err := cp.Dir("/tmp", 0o1777); err != nil {
		return err
	}
	if err := cp.CharDev("/dev/console", 0o600, 5, 1); err != nil {
		return err
	}
	if err := cp.CharDev("/dev/null", 0o666, 1, 3); err != nil {
		return err
	}
	dedi, err := os.ReadFile(o.DediBinary)
	if err != nil {
		return fmt.Errorf("dedi binary: %w", err)
	}
	if err := cp.File(GuestDedi, 0o755, dedi); err != nil {
		return err
	}
	mraw, err := marshalManifest(m)
	if err != nil {
		return err
	}
	iraw, err := json.Marshal(img)
	if err != nil {
		return err
	}
	if err := cp.File(GuestManifest, 0o644, mraw); err != nil {
		return err
	}
	if err := cp.File(GuestImageConfig, 0o644, iraw); err != nil {
		return err
	}
	for i, rel := range mods {
		data, err := moduleData(filepath.Join(modDir, rel))
		if err != nil {
			return err
		}
		if err := mkdirs(img.Modules[i]); err != nil {
			return err
		}
		if err := cp.File(img.Modules[i], 0o644, data); err != nil {
			return err
		}
	}
	if err := addTree(ctx, cp, o.BuildDir, GameDir, mkdirs); err != nil {
		return fmt.Errorf("game build: %w", err)
	}
	if err := cp.Close(); err != nil {
		return err
	}
	if err := zw.Close(); err != nil {
		return err
	}
	if err := bw.Flush(); err != nil {
		return err
	}
	return f.Close()
}

// addTree adds the build dir under dst in lexical order. The build is
// root's and the same for every game, whatever user the LSPM runs each one
// as (--game-uids): directories 0755, files 0644, or 0755 when the build's
// file has any execute bit; no game can change it. Symlinks are kept as
// links; other special files are left out.
func addTree(ctx context.Context, cp *CPIO, src, dst string, mkdirs func(string) error) error {
	var entries []string
	err := filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p != src {
			entries = append(entries, p)
		}
		return nil
	})
	if err != nil {
		return err
	}
	sort.Strings(entries) // WalkDir is lexical already; this makes it plain
	for _, p := range entries {
		if err := ctx.Err(); err != nil {
			return err
		}
		rel, err := filepath.Rel(src, p)
		if err != nil {
			return err
		}
		name := path.Join(dst, filepath.ToSlash(rel))
		if err := mkdirs(name); err != nil {
			return err
		}
		st, err := os.Lstat(p)
		if err != nil {
			return err
		}
		perm := uint32(0o644)
		if st.IsDir() || st.Mode().Perm()&0o111 != 0 {
			perm = 0o755
		}
		switch {
		case st.IsDir():
			err = cp.Dir(name, perm)
		case st.Mode()&fs.ModeSymlink != 0:
			var target string
			if target, err = os.Readlink(p); err == nil {
				err = cp.Symlink(name, target)
			}
		case st.Mode().IsRegular():
			var data []byte
			if data, err = os.ReadFile(p); err == nil {
				err = cp.File(name, perm, data)
			}
		}
		if err != nil {
			return err
		}
	}
	return nil
}

func copyFile(src, dst string, perm os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, perm)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// ParseQEMURef returns the image directory a qemu reference names.
func ParseQEMURef(ref string) (string, error) {
	dir, ok := strings.CutPrefix(ref, QEMURefPrefix)
	if !ok || !filepath.IsAbs(dir) || filepath.Clean(dir) != dir || strings.ContainsRune(dir, 0) {
		return "", fmt.Errorf("qemu image reference %q: want %s/ABSOLUTE/PATH, as dedi image build --format qemu prints it", ref, QEMURefPrefix)
	}
	return dir, nil
}

// LoadQEMU reads a qemu image's manifest and kernel details from its
// directory and checks that its kernel and initramfs are there.
func LoadQEMU(dir string) (Manifest, QEMUImage, error) {
	var m Manifest
	var img QEMUImage
	raw, err := os.ReadFile(filepath.Join(dir, ManifestFile))
	if err != nil {
		return m, img, fmt.Errorf("qemu image %s: %w", dir, err)
	}
	if err := json.Unmarshal(raw, &m); err != nil {
		return m, img, fmt.Errorf("qemu image %s: manifest: %w", dir, err)
	}
	if raw, err = os.ReadFile(filepath.Join(dir, QEMUImageFile)); err != nil {
		return m, img, fmt.Errorf("qemu image %s: %w", dir, err)
	}
	if err := json.Unmarshal(raw, &img); err != nil {
		return m, img, fmt.Errorf("qemu image %s: %s: %w", dir, QEMUImageFile, err)
	}
	if m.Format != "qemu" || len(m.Command) == 0 {
		return m, img, fmt.Errorf("qemu image %s: manifest is not of a qemu image with a command", dir)
	}
	for _, f := range []string{QEMUKernelFile, QEMUInitramfsFile} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			return m, img, fmt.Errorf("qemu image %s: %w", dir, err)
		}
	}
	return m, img, nil
}
