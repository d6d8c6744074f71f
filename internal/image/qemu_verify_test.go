package image

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
)

// testInitramfs writes a cpio with a manifest pinning /opt/game/server,
// then calls more to add entries after it.
func testInitramfs(t testing.TB, content []byte, more func(*CPIO)) []byte {
	sum := sha256.Sum256(content)
	m := Manifest{Name: "t", Format: "qemu", Command: []string{"/opt/game/server"},
		Executables: []Executable{{Path: "/opt/game/server", SHA256: hex.EncodeToString(sum[:])}}}
	raw, _ := json.Marshal(m)
	var buf bytes.Buffer
	cp := NewCPIO(&buf)
	for _, d := range []string{"/etc", "/etc/dedi", "/opt", "/opt/game"} {
		cp.Dir(d, 0o755)
	}
	cp.File(GuestManifest, 0o644, raw)
	cp.File("/opt/game/server", 0o755, content)
	cp.File("/opt/game/data.bin", 0o644, []byte("abc"))
	if more != nil {
		more(cp)
	}
	if err := cp.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func TestVerifyInitramfs(t *testing.T) {
	good := []byte("\x7fELF the game build")
	m, err := VerifyInitramfs(bytes.NewReader(testInitramfs(t, good, nil)))
	if err != nil || len(m.Executables) != 1 || m.Executables[0].Path != "/opt/game/server" {
		t.Fatalf("a matching initramfs: %+v, %v", m, err)
	}
	// Concatenated archives (the machine's config after the image's) are
	// not what it reads; one archive followed by another's bytes is fine
	// up to the first trailer.
	for name, raw := range map[string][]byte{
		"other content":      testInitramfs(t, good, func(c *CPIO) { c.File("/opt/game/server", 0o755, []byte("cheat")) }),
		"symlinked dir":      testInitramfs(t, good, func(c *CPIO) { c.Symlink("/opt/game", "/tmp") }),
		"replaced by a link": testInitramfs(t, good, func(c *CPIO) { c.Symlink("/opt/game/server", "/bin/sh") }),
		"truncated":          testInitramfs(t, good, nil)[:300],
		"no manifest": func() []byte {
			var b bytes.Buffer
			c := NewCPIO(&b)
			c.File("/x", 0o755, good)
			c.Close()
			return b.Bytes()
		}(),
		"not a cpio": []byte(strings.Repeat("x", 200)),
		"hard link": func() []byte {
			raw := testInitramfs(t, good, nil)
			// nlink 2 on the executable's entry: its content could come from another.
			i := bytes.Index(raw, []byte("opt/game/server\x00")) - 110
			copy(raw[i+6+8*4:], fmt.Sprintf("%08x", 2))
			return raw
		}(),
	} {
		if _, err := VerifyInitramfs(bytes.NewReader(raw)); err == nil {
			t.Errorf("%s: verified", name)
		}
	}
}

func FuzzVerifyInitramfs(f *testing.F) {
	f.Add(testInitramfs(f, []byte("game"), nil))
	f.Add(testInitramfs(f, []byte("game"), func(c *CPIO) { c.Symlink("/opt", "/") }))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := VerifyInitramfs(bytes.NewReader(b))
		if err == nil && len(m.Executables) > 0 && !bytes.Contains(b, []byte(m.Executables[0].SHA256)) {
			t.Fatal("verified a manifest that is not in the archive")
		}
	})
}
