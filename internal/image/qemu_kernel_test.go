package image

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/pierrec/lz4/v4"
)

// fakeELF is a minimal x86-64 ELF with one PT_NOTE segment holding the
// given notes.
func fakeELF(notes []byte) []byte {
	const ehsize, phsize = 64, 56
	b := make([]byte, ehsize+phsize)
	copy(b, "\x7fELF")
	b[4], b[5], b[6] = 2, 1, 1 // 64-bit, little endian, version 1
	le := binary.LittleEndian
	le.PutUint16(b[16:], 2)  // ET_EXEC
	le.PutUint16(b[18:], 62) // EM_X86_64
	le.PutUint32(b[20:], 1)
	le.PutUint64(b[32:], ehsize) // phoff
	le.PutUint16(b[52:], ehsize)
	le.PutUint16(b[54:], phsize)
	le.PutUint16(b[56:], 1) // phnum
	ph := b[ehsize:]
	le.PutUint32(ph[0:], 4)                     // PT_NOTE
	le.PutUint64(ph[8:], uint64(ehsize+phsize)) // offset
	le.PutUint64(ph[32:], uint64(len(notes)))   // filesz
	le.PutUint64(ph[40:], uint64(len(notes)))   // memsz
	return append(b, notes...)
}

func xenNote(typ uint32, desc []byte) []byte {
	le := binary.LittleEndian
	b := le.AppendUint32(nil, 4)
	b = le.AppendUint32(b, uint32(len(desc)))
	b = le.AppendUint32(b, typ)
	b = append(b, "Xen\x00"...)
	b = append(b, desc...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

// fakeBzImage wraps payload the way the kernel's build does: setup
// sectors with the boot header, then the payload at payload_offset.
func fakeBzImage(payload []byte) []byte {
	const setupSects = 3
	start := (setupSects + 1) * 512
	b := make([]byte, start+100)
	b[0x1f1] = setupSects
	copy(b[0x202:], "HdrS")
	binary.LittleEndian.PutUint16(b[0x206:], 0x20f)
	binary.LittleEndian.PutUint32(b[0x248:], 100)
	binary.LittleEndian.PutUint32(b[0x24c:], uint32(len(payload)))
	return append(append(b, payload...), "trailing setup data"...)
}

// lz4Legacy compresses like "lz4 -l" plus the kernel build's size_append,
// in blocks of blockSize.
func lz4Legacy(t *testing.T, raw []byte, blockSize int) []byte {
	t.Helper()
	out := []byte{0x02, 0x21, 0x4c, 0x18}
	var c lz4.Compressor
	for rest := raw; len(rest) > 0; {
		chunk := rest[:min(blockSize, len(rest))]
		rest = rest[len(chunk):]
		buf := make([]byte, lz4.CompressBlockBound(len(chunk)))
		n, err := c.CompressBlock(chunk, buf)
		if err != nil || n == 0 {
			t.Fatalf("compress: %d %v", n, err)
		}
		out = binary.LittleEndian.AppendUint32(out, uint32(n))
		out = append(out, buf[:n]...)
	}
	return binary.LittleEndian.AppendUint32(out, uint32(len(raw)))
}

func TestPVHKernel(t *testing.T) {
	notes := append(xenNote(6, []byte("linux\x00")), xenNote(xenElfnotePhys32Entry, []byte{0x50, 8, 0, 1})...)
	kernel := fakeELF(notes)
	kernel = append(kernel, bytes.Repeat([]byte("kernel text "), 2<<20)...) // > one 8 MiB block

	for _, blockSize := range []int{8 << 20, 4096} {
		got, err := PVHKernel(fakeBzImage(lz4Legacy(t, kernel, blockSize)))
		if err != nil || !bytes.Equal(got, kernel) {
			t.Fatalf("lz4 (blocks of %d): %d bytes, %v; want the %d-byte kernel", blockSize, len(got), err, len(kernel))
		}
	}
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write(kernel)
	zw.Close()
	gz.Write([]byte{1, 2, 3, 4}) // the size the build appends
	if got, err := PVHKernel(fakeBzImage(gz.Bytes())); err != nil || !bytes.Equal(got, kernel) {
		t.Fatalf("gzip: %d bytes, %v", len(got), err)
	}

	good := lz4Legacy(t, kernel, 8<<20)
	noPVH := fakeELF(xenNote(6, []byte("linux\x00")))
	for name, img := range map[string][]byte{
		"not a bzImage":     bytes.Repeat([]byte{0}, 4096),
		"xz payload":        fakeBzImage(append([]byte{0xfd, '7', 'z', 'X', 'Z', 0}, make([]byte, 64)...)),
		"no PVH note":       fakeBzImage(lz4Legacy(t, noPVH, 8<<20)),
		"not an ELF":        fakeBzImage(lz4Legacy(t, bytes.Repeat([]byte("x"), 1000), 8<<20)),
		"truncated payload": fakeBzImage(append(good[:len(good)/2:len(good)/2], good[len(good)-4:]...)),
		"wrong size":        fakeBzImage(append(good[:len(good)-4:len(good)-4], 1, 0, 0, 0)),
		"payload past end":  fakeBzImage(good)[:2048+100+len(good)/2],
	} {
		if got, err := PVHKernel(img); !errors.Is(err, ErrNoPVH) || got != nil {
			t.Errorf("%s: %d bytes, %v; want ErrNoPVH", name, len(got), err)
		}
	}
}

// TestPVHKernelCloud unpacks this host's cloud kernel, when there is one:
// Debian's is LZ4 and built with CONFIG_PVH.
func TestPVHKernelCloud(t *testing.T) {
	ks, _ := filepath.Glob(KernelGlob)
	if len(ks) == 0 {
		t.Skip("no Debian cloud kernel in /boot")
	}
	raw, err := os.ReadFile(ks[len(ks)-1])
	if err != nil {
		t.Skip(err) // /boot/vmlinuz-* may be readable by root only
	}
	k, err := PVHKernel(raw)
	if err != nil {
		t.Fatal(err)
	}
	if len(k) < 2*len(raw) {
		t.Errorf("%s: %d bytes uncompressed from %d", ks[len(ks)-1], len(k), len(raw))
	}
}

func FuzzPVHKernel(f *testing.F) {
	kernel := fakeELF(xenNote(xenElfnotePhys32Entry, []byte{1, 2, 3, 4}))
	var c lz4.Compressor
	buf := make([]byte, lz4.CompressBlockBound(len(kernel)))
	n, _ := c.CompressBlock(kernel, buf)
	payload := binary.LittleEndian.AppendUint32([]byte{0x02, 0x21, 0x4c, 0x18}, uint32(n))
	payload = binary.LittleEndian.AppendUint32(append(payload, buf[:n]...), uint32(len(kernel)))
	f.Add(fakeBzImage(payload))
	f.Add(fakeBzImage([]byte{0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0}))
	f.Fuzz(func(t *testing.T, b []byte) {
		k, err := PVHKernel(b)
		if err != nil && (k != nil || !errors.Is(err, ErrNoPVH)) {
			t.Fatalf("error %v with %d bytes", err, len(k))
		}
		if err == nil && checkPVHEntry(k) != nil {
			t.Fatal("a kernel without the PVH note accepted")
		}
	})
}
