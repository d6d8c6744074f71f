package lspm

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"os"
	"strings"
	"time"
)

// cappedLog is a log file that never grows past max: when a write would
// pass it, the file is renamed to NAME.1 (replacing the older one) and a
// new file is started. At most two files, 2*max bytes, per process.
type cappedLog struct {
	path string
	max  int64
	f    *os.File
	size int64
}

func openCappedLog(path string, max int64) (*cappedLog, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	return &cappedLog{path: path, max: max, f: f, size: st.Size()}, nil
}

func (l *cappedLog) Write(p []byte) (int, error) {
	written := 0
	for len(p) > 0 {
		if l.size >= l.max {
			if err := l.rotate(); err != nil {
				return written, err
			}
		}
		chunk := p
		if room := l.max - l.size; int64(len(chunk)) > room {
			chunk = chunk[:room]
		}
		n, err := l.f.Write(chunk)
		l.size += int64(n)
		written += n
		if err != nil {
			return written, err
		}
		p = p[n:]
	}
	return written, nil
}

func (l *cappedLog) rotate() error {
	l.f.Close()
	if err := os.Rename(l.path, l.path+".1"); err != nil {
		return err
	}
	f, err := os.OpenFile(l.path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	l.f, l.size = f, 0
	return nil
}

func (l *cappedLog) Close() error { return l.f.Close() }

// tailLines returns the last n lines of the log at path, reaching into its
// rotated predecessor when the current file holds too few (a line cut by
// the rotation is joined again). n <= 0 returns everything.
func tailLines(path string, n int) []string {
	cur, _ := os.ReadFile(path)
	if lines := splitLines(cur); n > 0 && len(lines) > n {
		return lines[len(lines)-n:]
	}
	old, _ := os.ReadFile(path + ".1")
	lines := splitLines(append(old, cur...))
	if n > 0 && len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return lines
}

func splitLines(b []byte) []string {
	b = bytes.TrimSuffix(b, []byte("\n"))
	if len(b) == 0 {
		return nil
	}
	return strings.Split(string(b), "\n")
}

// followLog streams the log at path to w from offset until ended is closed
// and everything written is sent, or ctx is done. A rotation (the file
// shrinking or being replaced) restarts at its beginning.
func followLog(ctx context.Context, w io.Writer, path string, offset int64, ended <-chan struct{}) {
	flusher, _ := w.(http.Flusher)
	buf := make([]byte, 32<<10)
	var f *os.File
	var ino uint64
	defer func() {
		if f != nil {
			f.Close()
		}
	}()
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for {
		if f == nil {
			var err error
			if f, err = os.Open(path); err == nil {
				ino = inode(f)
				_, _ = f.Seek(offset, io.SeekStart)
			}
		}
		wrote := false
		if f != nil {
			for {
				n, err := f.Read(buf)
				if n > 0 {
					if _, werr := w.Write(buf[:n]); werr != nil {
						return
					}
					offset += int64(n)
					wrote = true
				}
				if err != nil || n == 0 {
					break
				}
			}
			// Rotated away: read the new file from its start.
			if st, err := os.Stat(path); err == nil && statIno(st) != ino {
				f.Close()
				f, offset = nil, 0
				continue
			}
		}
		if wrote && flusher != nil {
			flusher.Flush()
		}
		select {
		case <-ended:
			select {
			case <-ctx.Done():
			case <-time.After(20 * time.Millisecond):
			}
			if f != nil {
				_, _ = io.Copy(w, f)
			}
			return
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
