package lspm

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"dedi.dev/dedi/api"
	"dedi.dev/dedi/internal/rest"
)

// allowList decides which executables may run: the seed's cheat prevention,
// where only the developer's exact build runs. Paths are compared after
// resolving symlinks; a pinned hash is checked against the file's content,
// cached by (device, inode, size, mtime, ctime) so a changed file is hashed
// again and a spawn does not re-read a large binary each time.
type allowList struct {
	pinned map[string]string // resolved path -> sha256 ("" for any)

	mu       sync.Mutex
	cache    map[string]hashEntry
	inflight map[string]chan struct{} // closed when that path's hashing ends
}

type hashEntry struct {
	dev, ino, size   uint64
	mtimeNS, ctimeNS int64
	sum              string
}

func newAllowList(defaultCmd []string, allow []Allowed) (*allowList, error) {
	a := &allowList{pinned: map[string]string{}, cache: map[string]hashEntry{}, inflight: map[string]chan struct{}{}}
	add := func(path, sum string) error {
		p, err := resolveExecutable(path)
		if err != nil {
			return err
		}
		if old, ok := a.pinned[p]; ok && old != "" && sum == "" {
			return nil
		}
		a.pinned[p] = sum
		return nil
	}
	if len(defaultCmd) > 0 {
		if err := add(defaultCmd[0], ""); err != nil {
			return nil, fmt.Errorf("default command: %w", err)
		}
	}
	for _, al := range allow {
		if err := add(al.Path, al.SHA256); err != nil {
			return nil, fmt.Errorf("--allow %s: %w", al.Path, err)
		}
	}
	// A hash given with --allow pins the default command too.
	for _, al := range allow {
		if p, err := resolveExecutable(al.Path); err == nil && al.SHA256 != "" {
			a.pinned[p] = al.SHA256
		}
	}
	return a, nil
}

// Verified is a pinned executable whose content someone the LSPM trusts
// as itself (the VM's init, from the host's check of the image) already
// matched against its hash, with the identity the file had then. The LSPM
// takes that hash as long as the file keeps that identity, as it does
// with its own hashes; a file changed since is hashed again.
type Verified struct {
	Path             string
	SHA256           string
	Dev, Ino, Size   uint64
	MtimeNS, CtimeNS int64
}

// String is the --verified form: PATH=SHA256@DEV:INO:SIZE:MTIME:CTIME,
// the times in nanoseconds.
func (v Verified) String() string {
	return fmt.Sprintf("%s=%s@%d:%d:%d:%d:%d", v.Path, v.SHA256, v.Dev, v.Ino, v.Size, v.MtimeNS, v.CtimeNS)
}

// ParseVerified reads the --verified form (Verified.String).
func ParseVerified(s string) (Verified, error) {
	at := strings.LastIndexByte(s, '@')
	if at < 0 {
		return Verified{}, errors.New("want PATH=SHA256@DEV:INO:SIZE:MTIME:CTIME")
	}
	al, err := ParseAllowed(s[:at])
	if err != nil {
		return Verified{}, err
	}
	if al.SHA256 == "" || !filepath.IsAbs(al.Path) {
		return Verified{}, errors.New("want an absolute PATH=SHA256 before the @")
	}
	f := strings.Split(s[at+1:], ":")
	if len(f) != 5 {
		return Verified{}, errors.New("want DEV:INO:SIZE:MTIME:CTIME after the @")
	}
	var n [5]uint64
	for i := range f {
		if n[i], err = strconv.ParseUint(f[i], 10, 64); err != nil {
			return Verified{}, fmt.Errorf("identity field %d: %w", i+1, err)
		}
	}
	return Verified{Path: al.Path, SHA256: al.SHA256, Dev: n[0], Ino: n[1], Size: n[2],
		MtimeNS: int64(n[3]), CtimeNS: int64(n[4])}, nil
}

// VerifiedFile returns path's identity now, for a hash sum checked by
// other means; path must be a regular file, not a symlink.
func VerifiedFile(path, sum string) (Verified, error) {
	var st syscall.Stat_t
	if err := syscall.Lstat(path, &st); err != nil {
		return Verified{}, err
	}
	if st.Mode&syscall.S_IFMT != syscall.S_IFREG {
		return Verified{}, fmt.Errorf("%s is not a regular file", path)
	}
	return Verified{Path: path, SHA256: sum, Dev: st.Dev, Ino: st.Ino, Size: uint64(st.Size),
		MtimeNS: st.Mtim.Nano(), CtimeNS: st.Ctim.Nano()}, nil
}

// seed takes the hashes of verified files that pin an executable of the
// list with the same hash; it returns how many it took.
func (a *allowList) seed(vs []Verified) int {
	n := 0
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, v := range vs {
		p, err := resolveExecutable(v.Path)
		if err != nil || p != v.Path || a.pinned[p] != v.SHA256 {
			continue
		}
		a.cache[p] = hashEntry{dev: v.Dev, ino: v.Ino, size: v.Size, mtimeNS: v.MtimeNS, ctimeNS: v.CtimeNS, sum: v.SHA256}
		n++
	}
	return n
}

// resolveExecutable turns a command name into an absolute, symlink-free path
// of an executable regular file.
func resolveExecutable(name string) (string, error) {
	p := name
	if filepath.Base(name) == name {
		lp, err := exec.LookPath(name)
		if err != nil {
			return "", err
		}
		p = lp
	}
	abs, err := filepath.Abs(p)
	if err != nil {
		return "", err
	}
	real, err := filepath.EvalSymlinks(abs)
	if err != nil {
		return "", err
	}
	st, err := os.Stat(real)
	if err != nil {
		return "", err
	}
	if !st.Mode().IsRegular() || st.Mode().Perm()&0o111 == 0 {
		return "", fmt.Errorf("%s is not an executable file", real)
	}
	return real, nil
}

// check resolves argv0 and returns its path if it may run.
func (a *allowList) check(argv0 string) (string, error) {
	p, err := resolveExecutable(argv0)
	if err != nil {
		return "", rest.Errorf(rest.Forbidden, api.CodeExecutableNotAllowed, "executable %q: %v", argv0, err)
	}
	want, ok := a.pinned[p]
	if !ok {
		return "", rest.Errorf(rest.Forbidden, api.CodeExecutableNotAllowed, "executable %s is not allowed on this machine", p)
	}
	if want == "" {
		return p, nil
	}
	got, err := a.hash(p)
	if err != nil {
		return "", rest.Errorf(rest.Forbidden, api.CodeExecutableNotAllowed, "executable %s: %v", p, err)
	}
	if got != want {
		return "", rest.Errorf(rest.Forbidden, api.CodeExecutableNotAllowed, "executable %s has SHA-256 %s, not the allowed %s", p, got, want)
	}
	return p, nil
}

// prewarm hashes every pinned executable once, so the first spawn of
// each finds its hash cached: the LSPM runs it at start, while it waits
// for its first report's answer and the first spawn. A spawn that comes
// while a hash is being made waits for it instead of making another.
func (a *allowList) prewarm(ctx context.Context) {
	paths := make([]string, 0, len(a.pinned))
	for p, sum := range a.pinned {
		if sum != "" {
			paths = append(paths, p)
		}
	}
	sort.Strings(paths)
	for _, p := range paths {
		if ctx.Err() != nil {
			return
		}
		_, _ = a.hash(p) // an error shows again, to the spawn that names it
	}
}

func (a *allowList) hash(path string) (string, error) {
	for {
		f, err := os.Open(path)
		if err != nil {
			return "", err
		}
		st, err := f.Stat()
		if err != nil {
			f.Close()
			return "", err
		}
		sys, _ := st.Sys().(*syscall.Stat_t)
		var key hashEntry
		if sys != nil {
			key = hashEntry{dev: sys.Dev, ino: sys.Ino, size: uint64(sys.Size),
				mtimeNS: sys.Mtim.Nano(), ctimeNS: sys.Ctim.Nano()}
		}
		a.mu.Lock()
		e, ok := a.cache[path]
		if ok && sys != nil && e.dev == key.dev && e.ino == key.ino && e.size == key.size &&
			e.mtimeNS == key.mtimeNS && e.ctimeNS == key.ctimeNS {
			a.mu.Unlock()
			f.Close()
			return e.sum, nil
		}
		if wait, busy := a.inflight[path]; busy {
			// Hashed by another caller now: its result is cached when it
			// ends, and checked against the file as it is then.
			a.mu.Unlock()
			f.Close()
			<-wait
			continue
		}
		done := make(chan struct{})
		a.inflight[path] = done
		a.mu.Unlock()

		h := sha256.New()
		_, err = io.Copy(h, f)
		f.Close()
		key.sum = hex.EncodeToString(h.Sum(nil))
		a.mu.Lock()
		if err == nil && sys != nil {
			a.cache[path] = key
		}
		delete(a.inflight, path)
		close(done)
		a.mu.Unlock()
		if err != nil {
			return "", err
		}
		return key.sum, nil
	}
}
