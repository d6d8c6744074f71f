package lspm

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
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

// FileSHA256 returns the hex SHA-256 of a file (for --allow PATH=SHA256).
func FileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
