package image

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path"
	"strconv"
	"strings"
)

// VerifyInitramfs reads an unpacked qemu initramfs (newc cpio) and checks
// that every executable its manifest (GuestManifest) pins is in it as a
// plain regular file with that SHA-256, as the kernel will unpack it: the
// last entry of a name wins, and a name reached through a symlinked
// directory or made a hard link is not one the check can vouch for. It
// returns the manifest.
//
// The provider runs it once per image on the host, where hashing costs
// milliseconds, so the guest's LSPM need not hash the executables again
// at its first spawn (a second or more under TCG); the guest only checks
// that each file is still the one unpacked at boot (see "dedi init").
func VerifyInitramfs(r io.Reader) (Manifest, error) {
	type entry struct {
		mode uint32
		sum  string
		link bool // nlink > 1
	}
	entries := map[string]entry{}
	var manifest []byte
	br := bufio.NewReaderSize(r, 1<<20)
	var off int64
	read := func(n int64, w io.Writer) error {
		got, err := io.CopyN(w, br, n)
		off += got
		if err != nil {
			return fmt.Errorf("cpio: truncated at %d: %w", off, err)
		}
		return nil
	}
	skipPad := func() error {
		if p := (4 - off%4) % 4; p > 0 {
			return read(p, io.Discard)
		}
		return nil
	}
	for {
		var hdr [110]byte
		if err := read(int64(len(hdr)), &sliceWriter{b: hdr[:0:len(hdr)]}); err != nil {
			return Manifest{}, err
		}
		if string(hdr[:6]) != "070701" {
			return Manifest{}, fmt.Errorf("cpio: no newc header at %d", off-110)
		}
		field := func(i int) (uint32, error) {
			v, err := strconv.ParseUint(string(hdr[6+8*i:14+8*i]), 16, 32)
			return uint32(v), err
		}
		var f [13]uint32
		for i := range f {
			v, err := field(i)
			if err != nil {
				return Manifest{}, fmt.Errorf("cpio: bad header at %d", off-110)
			}
			f[i] = v
		}
		mode, nlink, size, namesize := f[1], f[4], int64(f[6]), int64(f[11])
		if namesize < 1 || namesize > 4096 {
			return Manifest{}, fmt.Errorf("cpio: bad name size at %d", off-110)
		}
		var nb strings.Builder
		if err := read(namesize, &nb); err != nil {
			return Manifest{}, err
		}
		name := strings.TrimSuffix(nb.String(), "\x00")
		if err := skipPad(); err != nil {
			return Manifest{}, err
		}
		if name == "TRAILER!!!" {
			break
		}
		name = path.Clean("/" + name)
		e := entry{mode: mode & 0o170000, link: nlink > 1}
		switch {
		case e.mode == cpioFile && name == GuestManifest:
			if size > 1<<20 {
				return Manifest{}, errors.New("cpio: manifest too large")
			}
			var b strings.Builder
			if err := read(size, &b); err != nil {
				return Manifest{}, err
			}
			manifest = []byte(b.String())
			s := sha256.Sum256(manifest)
			e.sum = hex.EncodeToString(s[:])
		case e.mode == cpioFile:
			h := sha256.New()
			if err := read(size, h); err != nil {
				return Manifest{}, err
			}
			e.sum = hex.EncodeToString(h.Sum(nil))
		default:
			if err := read(size, io.Discard); err != nil {
				return Manifest{}, err
			}
		}
		if err := skipPad(); err != nil {
			return Manifest{}, err
		}
		entries[name] = e
	}
	if manifest == nil {
		return Manifest{}, errors.New("cpio: no manifest")
	}
	var m Manifest
	if err := json.Unmarshal(manifest, &m); err != nil {
		return Manifest{}, fmt.Errorf("cpio: manifest: %w", err)
	}
	for _, x := range m.Executables {
		p := path.Clean("/" + x.Path)
		e, ok := entries[p]
		switch {
		case !ok || e.mode != cpioFile:
			return Manifest{}, fmt.Errorf("cpio: executable %s is not a regular file in the initramfs", x.Path)
		case e.link:
			return Manifest{}, fmt.Errorf("cpio: executable %s is a hard link", x.Path)
		case e.sum != x.SHA256:
			return Manifest{}, fmt.Errorf("cpio: executable %s has SHA-256 %s, the manifest pins %s", x.Path, e.sum, x.SHA256)
		}
		for d := path.Dir(p); d != "/"; d = path.Dir(d) {
			if de, ok := entries[d]; ok && de.mode != cpioDir {
				return Manifest{}, fmt.Errorf("cpio: executable %s is under %s, which is not a directory", x.Path, d)
			}
		}
	}
	return m, nil
}

// sliceWriter appends into a fixed-capacity slice.
type sliceWriter struct{ b []byte }

func (w *sliceWriter) Write(p []byte) (int, error) {
	if len(w.b)+len(p) > cap(w.b) {
		return 0, errors.New("header overflow")
	}
	w.b = append(w.b, p...)
	return len(p), nil
}
