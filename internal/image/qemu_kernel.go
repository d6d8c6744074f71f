package image

import (
	"bytes"
	"compress/gzip"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"

	"github.com/pierrec/lz4/v4"
)

// ErrNoPVH is PVHKernel's answer for a kernel it cannot turn into one
// qemu boots through the PVH entry: not a bzImage, a payload compressed
// other than with LZ4 or gzip, or no PVH entry note (CONFIG_PVH). The
// bzImage then boots as it is, through the firmware.
var ErrNoPVH = errors.New("no PVH-bootable kernel in this bzImage")

// maxKernel bounds the uncompressed kernel PVHKernel makes.
const maxKernel = 512 << 20

// xenElfnotePhys32Entry is the ELF note (owner "Xen") that holds the
// kernel's 32-bit PVH entry point: qemu boots an ELF kernel that has it
// straight into the kernel, with no BIOS and no decompressor.
const xenElfnotePhys32Entry = 18

// PVHKernel returns the uncompressed kernel (an ELF "vmlinux") inside a
// bzImage, for qemu to boot through the kernel's PVH entry: under TCG
// that skips the emulated SeaBIOS and the emulated decompression of the
// kernel, about 0.5 s of each boot. It reads the x86 boot protocol's
// header for the payload and handles the compressions a VM kernel uses
// (Debian's cloud kernel is LZ4); anything else is ErrNoPVH.
func PVHKernel(bzImage []byte) ([]byte, error) {
	// The boot protocol header (Documentation/arch/x86/boot.rst):
	// "HdrS" at 0x202, the protocol version at 0x206 (payload fields
	// since 2.08), setup_sects at 0x1f1; payload_offset and
	// payload_length at 0x248 and 0x24c, from the protected-mode code
	// that starts after the (setup_sects+1) 512-byte sectors.
	if len(bzImage) < 0x250 || string(bzImage[0x202:0x206]) != "HdrS" {
		return nil, fmt.Errorf("%w: no x86 boot header", ErrNoPVH)
	}
	if v := binary.LittleEndian.Uint16(bzImage[0x206:]); v < 0x208 {
		return nil, fmt.Errorf("%w: boot protocol %#x has no payload fields", ErrNoPVH, v)
	}
	setup := int(bzImage[0x1f1])
	if setup == 0 {
		setup = 4
	}
	start := (setup + 1) * 512
	off, n := int(binary.LittleEndian.Uint32(bzImage[0x248:])), int(binary.LittleEndian.Uint32(bzImage[0x24c:]))
	if off < 0 || n < 0 || start+off < start || start+off+n > len(bzImage) || n < 8 {
		return nil, fmt.Errorf("%w: payload out of the file", ErrNoPVH)
	}
	payload := bzImage[start+off : start+off+n]
	var (
		kernel []byte
		err    error
	)
	switch {
	case bytes.HasPrefix(payload, []byte{0x02, 0x21, 0x4c, 0x18}):
		// lz4 -l: the legacy frame, with the kernel's 4-byte size appended.
		want := int(binary.LittleEndian.Uint32(payload[len(payload)-4:]))
		kernel, err = unlz4Legacy(payload[4:len(payload)-4], want)
	case bytes.HasPrefix(payload, []byte{0x1f, 0x8b}):
		kernel, err = gunzipKernel(payload)
	default:
		return nil, fmt.Errorf("%w: the payload is compressed with a method other than LZ4 or gzip", ErrNoPVH)
	}
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNoPVH, err)
	}
	if err := checkPVHEntry(kernel); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNoPVH, err)
	}
	return kernel, nil
}

// unlz4Legacy decodes LZ4's legacy frame body: blocks, each a 4-byte
// little-endian compressed size and the block, of at most 8 MiB each
// uncompressed. want is the total size the kernel's build appended.
func unlz4Legacy(src []byte, want int) ([]byte, error) {
	const blockMax = 8 << 20
	if want <= 0 || want > maxKernel {
		return nil, fmt.Errorf("lz4: kernel size %d out of range", want)
	}
	var out []byte // grown as blocks come: a bad header must not make a large allocation
	for len(src) > 0 {
		if len(src) < 4 {
			return nil, errors.New("lz4: truncated block header")
		}
		n := binary.LittleEndian.Uint32(src)
		src = src[4:]
		if uint64(n) > uint64(len(src)) {
			return nil, errors.New("lz4: truncated block")
		}
		// An LZ4 block expands at most about 255 times.
		room := min(blockMax, want-len(out), 255*int(n)+64)
		if room == 0 {
			return nil, errors.New("lz4: more data than the kernel's size")
		}
		out = slices.Grow(out, room)
		got, err := lz4.UncompressBlock(src[:n], out[len(out):len(out)+room])
		if err != nil {
			return nil, fmt.Errorf("lz4: %w", err)
		}
		out = out[:len(out)+got]
		src = src[n:]
	}
	if len(out) != want {
		return nil, fmt.Errorf("lz4: %d bytes, the kernel says %d", len(out), want)
	}
	return out, nil
}

func gunzipKernel(payload []byte) ([]byte, error) {
	zr, err := gzip.NewReader(bytes.NewReader(payload))
	if err != nil {
		return nil, err
	}
	zr.Multistream(false) // the kernel's size follows the stream
	var out bytes.Buffer
	if _, err := io.Copy(&out, io.LimitReader(zr, maxKernel+1)); err != nil {
		return nil, fmt.Errorf("gzip: %w", err)
	}
	if out.Len() > maxKernel {
		return nil, errors.New("gzip: kernel too large")
	}
	return out.Bytes(), nil
}

// checkPVHEntry reports whether kernel is a 64-bit x86 ELF with the PVH
// entry note.
func checkPVHEntry(kernel []byte) error {
	f, err := elf.NewFile(bytes.NewReader(kernel))
	if err != nil {
		return fmt.Errorf("not an ELF kernel: %w", err)
	}
	if f.Class != elf.ELFCLASS64 || f.Machine != elf.EM_X86_64 {
		return errors.New("not an x86-64 ELF kernel")
	}
	for _, p := range f.Progs {
		if p.Type != elf.PT_NOTE {
			continue
		}
		notes, err := io.ReadAll(io.LimitReader(p.Open(), 1<<20))
		if err != nil {
			return fmt.Errorf("ELF notes: %w", err)
		}
		if hasXenNote(notes, f.ByteOrder, xenElfnotePhys32Entry) {
			return nil
		}
	}
	return errors.New("no PVH entry note (a kernel built without CONFIG_PVH)")
}

// hasXenNote walks ELF notes (namesz, descsz, type, name, desc; name and
// desc padded to 4 bytes) for one of owner "Xen" and the given type.
func hasXenNote(b []byte, bo binary.ByteOrder, typ uint32) bool {
	pad := func(n uint32) uint64 { return (uint64(n) + 3) &^ 3 }
	for len(b) >= 12 {
		namesz, descsz, t := bo.Uint32(b), bo.Uint32(b[4:]), bo.Uint32(b[8:])
		b = b[12:]
		nl, dl := pad(namesz), pad(descsz)
		if nl > uint64(len(b)) || dl > uint64(len(b))-nl {
			return false
		}
		name := b[:namesz]
		if t == typ && string(bytes.TrimRight(name, "\x00")) == "Xen" {
			return true
		}
		b = b[nl+dl:]
	}
	return false
}
