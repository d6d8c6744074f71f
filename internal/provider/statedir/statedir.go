// Package statedir is the on-disk state that host-side providers (local,
// qemu) keep: a dir with one subdir per machine holding a JSON record, a
// lock that serialises creations, and the choice of a free loopback
// address 127.0.0.N for a new machine.
package statedir

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"

	"dedi.dev/dedi/internal/provider"
)

// RecordFile is a machine's record in its dir.
const RecordFile = "machine.json"

// Lock takes the exclusive lock of dir (a file "lock" in it), held until
// unlock; it serialises the creations of processes sharing the dir.
func Lock(dir string) (unlock func(), err error) {
	f, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", f.Name(), err)
	}
	return func() { f.Close() }, nil
}

// Read reads the record of the machine dir dir.
func Read[T any](dir string) (T, error) {
	var r T
	raw, err := os.ReadFile(filepath.Join(dir, RecordFile))
	if err != nil {
		return r, err
	}
	if err := json.Unmarshal(raw, &r); err != nil {
		return r, fmt.Errorf("%s: %w", RecordFile, err)
	}
	return r, nil
}

// Write replaces the record of the machine dir dir through a rename, so a
// reader never sees a torn file.
func Write[T any](dir string, r T) error {
	raw, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, RecordFile+".tmp")
	if err := os.WriteFile(tmp, append(raw, '\n'), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(dir, RecordFile))
}

// All reads the record of every machine dir under machines. A dir
// without a readable record (a creation interrupted before it wrote one)
// is skipped; one whose record does not decode is logged and skipped.
func All[T any](machines string, log *slog.Logger) ([]T, error) {
	ents, err := os.ReadDir(machines)
	if err != nil {
		return nil, err
	}
	var recs []T
	for _, e := range ents {
		if !e.IsDir() {
			continue
		}
		r, err := Read[T](filepath.Join(machines, e.Name()))
		if err != nil {
			if !errors.Is(err, fs.ErrNotExist) {
				log.Warn("unreadable machine record", "machine", e.Name(), "err", err)
			}
			continue
		}
		recs = append(recs, r)
	}
	return recs, nil
}

// FreeHost picks N in [first, last] for a new machine at 127.0.0.N: one
// that taken does not name and whose port lspmPort nobody has bound.
func FreeHost(first, last, lspmPort int, taken func(n int) bool) (int, error) {
	for n := first; n <= last; n++ {
		if taken(n) {
			continue
		}
		ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0."+strconv.Itoa(n), strconv.Itoa(lspmPort)))
		if err != nil {
			continue
		}
		ln.Close()
		return n, nil
	}
	return 0, provider.ErrNoCapacity
}
