package lspm

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"
)

// cappedLog is a log file that never grows past max: when a write would
// pass it, the file is renamed to NAME.1 (replacing the older one) and a
// new file is started. At most two files, 2*max bytes, per process.
//
// It never fails a write: a game server blocked on a full stdout pipe is
// worse than lost log lines. While the disk refuses writes (full, gone),
// output is dropped and the file is reopened every few seconds.
type cappedLog struct {
	path    string
	max     int64
	f       *os.File
	size    int64
	retryAt time.Time // while f is nil: when to try to reopen
	dropped int64
}

func openCappedLog(path string, max int64) (*cappedLog, error) {
	l := &cappedLog{path: path, max: max}
	if err := l.open(os.O_APPEND); err != nil {
		return nil, err
	}
	return l, nil
}

func (l *cappedLog) open(mode int) error {
	f, err := os.OpenFile(l.path, os.O_CREATE|os.O_WRONLY|mode, 0o600)
	if err != nil {
		return err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return err
	}
	l.f, l.size = f, st.Size()
	return nil
}

func (l *cappedLog) Write(p []byte) (int, error) {
	n := len(p)
	for len(p) > 0 {
		if l.f == nil && !l.reopen() {
			l.dropped += int64(len(p))
			return n, nil
		}
		if l.size >= l.max {
			l.rotate()
			continue
		}
		chunk := p
		if room := l.max - l.size; int64(len(chunk)) > room {
			chunk = chunk[:room]
		}
		w, err := l.f.Write(chunk)
		l.size += int64(w)
		p = p[w:]
		if err != nil {
			l.broken()
		}
	}
	return n, nil
}

// broken drops the file after a failed write; reopen tries again later.
func (l *cappedLog) broken() {
	if l.f != nil {
		l.f.Close()
		l.f = nil
	}
	l.retryAt = time.Now().Add(5 * time.Second)
}

func (l *cappedLog) reopen() bool {
	if time.Now().Before(l.retryAt) {
		return false
	}
	if err := l.open(os.O_APPEND); err != nil {
		l.retryAt = time.Now().Add(5 * time.Second)
		return false
	}
	if l.dropped > 0 {
		msg := fmt.Sprintf("[dedi: %d bytes of output dropped: the log could not be written]\n", l.dropped)
		l.dropped = 0
		w, _ := l.f.WriteString(msg)
		l.size += int64(w)
	}
	return true
}

func (l *cappedLog) rotate() {
	l.f.Close()
	l.f = nil
	if err := os.Rename(l.path, l.path+".1"); err != nil {
		l.retryAt = time.Now().Add(5 * time.Second)
		return
	}
	if err := l.open(os.O_TRUNC); err != nil {
		l.retryAt = time.Now().Add(5 * time.Second)
	}
}

func (l *cappedLog) Close() error {
	if l.f == nil {
		return nil
	}
	return l.f.Close()
}

// maxTailLine caps each line of an exit's log tail: the tail rides in
// status reports, which must stay small whatever a game prints.
const maxTailLine = 512

// tailLines returns the last n lines of the log at path (n > 0), reaching
// into its rotated predecessor when the current file holds too few (a line
// cut by the rotation is joined again). It reads only the end of the files.
func tailLines(path string, n int) []string {
	cur := readTail(path, n)
	if lines := splitLines(cur); len(lines) > n {
		return lines[len(lines)-n:]
	}
	old := readTail(path+".1", n)
	lines := splitLines(append(old, cur...))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return lines
}

// readTail returns the end of a file holding at least n+1 line breaks, or
// the whole file.
func readTail(path string, n int) []byte {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil
	}
	const chunk = 64 << 10
	end := st.Size()
	var buf []byte
	for end > 0 && bytes.Count(buf, []byte("\n")) <= n {
		start := max(end-chunk, 0)
		part := make([]byte, end-start)
		if _, err := f.ReadAt(part, start); err != nil && err != io.EOF {
			break
		}
		buf = append(part, buf...)
		end = start
	}
	return buf
}

// capLines shortens long lines for an exit's evidence.
func capLines(lines []string) []string {
	for i, l := range lines {
		if len(l) > maxTailLine {
			lines[i] = l[:maxTailLine] + "…"
		}
	}
	return lines
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

func splitLines(b []byte) []string {
	b = bytes.TrimSuffix(b, []byte("\n"))
	if len(b) == 0 {
		return nil
	}
	return strings.Split(string(b), "\n")
}
