package image

import (
	"errors"
	"fmt"
	"io"
	"path"
	"strings"
)

// CPIO writes an archive in the "newc" format (SVR4 with no CRC), the
// format the Linux kernel unpacks as an initramfs. Entries carry no
// times, owners or real inode numbers, so the same entries give the same
// bytes: images build reproducibly.
//
// Directories must be written before what they hold; the kernel creates
// each entry as it reads it.
type CPIO struct {
	w      io.Writer
	ino    uint32
	err    error
	closed bool
}

// NewCPIO returns a CPIO writing to w.
func NewCPIO(w io.Writer) *CPIO { return &CPIO{w: w, ino: 1} }

// cpio mode bits (the classic stat ones, as the format wants them).
const (
	cpioDir  = 0o040000
	cpioFile = 0o100000
	cpioLink = 0o120000
	cpioChar = 0o020000
)

// Dir adds a directory.
func (c *CPIO) Dir(name string, perm uint32) error {
	return c.entry(name, cpioDir|perm&0o7777, 0, 0, nil)
}

// File adds a regular file holding data.
func (c *CPIO) File(name string, perm uint32, data []byte) error {
	return c.entry(name, cpioFile|perm&0o7777, 0, 0, data)
}

// Symlink adds a symbolic link name -> target.
func (c *CPIO) Symlink(name, target string) error {
	return c.entry(name, cpioLink|0o777, 0, 0, []byte(target))
}

// CharDev adds a character device node (such as /dev/console, which the
// kernel opens for init's stdio before init could mount devtmpfs).
func (c *CPIO) CharDev(name string, perm, major, minor uint32) error {
	return c.entry(name, cpioChar|perm&0o7777, major, minor, nil)
}

// Close writes the trailer. It does not close the underlying writer.
func (c *CPIO) Close() error {
	if c.closed {
		return c.err
	}
	if err := c.write("TRAILER!!!", 0, 0, 0, 0, nil); err != nil {
		return err
	}
	c.closed = true
	return nil
}

func (c *CPIO) entry(name string, mode, major, minor uint32, data []byte) error {
	if c.closed {
		return errors.New("cpio: write after close")
	}
	clean := strings.TrimPrefix(path.Clean("/"+name), "/")
	if clean == "" || clean == "TRAILER!!!" || strings.ContainsRune(clean, 0) {
		return fmt.Errorf("cpio: bad entry name %q", name)
	}
	ino := c.ino
	c.ino++
	return c.write(clean, ino, mode, major, minor, data)
}

// write writes one header, the name and the data, each padded to 4 bytes.
func (c *CPIO) write(name string, ino, mode, major, minor uint32, data []byte) error {
	if c.err != nil {
		return c.err
	}
	nlink := uint32(1)
	if mode&0o170000 == cpioDir {
		nlink = 2
	}
	if name == "TRAILER!!!" {
		nlink = 1
	}
	hdr := fmt.Sprintf("070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		ino, mode, 0, 0, nlink, 0, len(data), 0, 0, major, minor, len(name)+1, 0)
	buf := make([]byte, 0, len(hdr)+len(name)+8)
	buf = append(buf, hdr...)
	buf = append(buf, name...)
	buf = append(buf, 0)
	buf = pad4(buf)
	if _, c.err = c.w.Write(buf); c.err != nil {
		return c.err
	}
	if len(data) > 0 {
		if _, c.err = c.w.Write(data); c.err != nil {
			return c.err
		}
		if n := len(data) % 4; n != 0 {
			_, c.err = c.w.Write(make([]byte, 4-n))
		}
	}
	return c.err
}

func pad4(b []byte) []byte {
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}
