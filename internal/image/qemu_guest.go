package image

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// What a qemu image holds, as paths inside the guest. The kernel starts
// GuestDedi with the arguments "init" (see QEMUCmdline): "dedi init" is the
// guest's PID 1.
const (
	GuestDedi          = "/bin/dedi"
	GuestManifest      = "/etc/dedi/" + ManifestFile
	GuestImageConfig   = "/etc/dedi/image.json"
	GuestMachineConfig = "/etc/dedi/machine.json"
	GuestDataDir       = "/var/lib/dedi"
)

// Files of a qemu image's directory on the host.
const (
	QEMUKernelFile    = "vmlinuz"
	QEMUInitramfsFile = "initramfs.cpio.gz"
	QEMUImageFile     = "qemu.json"
)

// QEMURefPrefix starts every qemu image reference: "qemu:" and the
// image directory's absolute path.
const QEMURefPrefix = "qemu:"

// QEMUCmdline is the kernel command line a qemu image boots with: the
// serial console, no reboot on panic (the VM powers off and its console
// log is the evidence), and dedi as init. It holds no secret: the
// host's ps shows it to every user.
//
// random.trust_cpu=on seeds the kernel's random number generator from
// the CPU's RDRAND (the provider gives the emulated CPU one, which qemu
// answers from the host's getrandom): without a seed, the first
// getrandom in the guest (the LSPM's first game token) waited about a
// second under TCG while the kernel gathered timer jitter. Debian's
// kernels trust RDRAND by default; the option says so for any kernel.
//
// Two options make the boot shorter (under TCG, 0.5-1 s each):
// cryptomgr.notests skips the kernel's self-tests of its crypto
// algorithms against test vectors, and mitigations=off the patching of
// the kernel for CPU side-channel mitigations. Those mitigations protect
// the guest's kernel and processes from each other; in the VM every
// process is the image's (the LSPM runs only its pinned executables) and
// runs as root, so they protect nothing. The host's protection from the
// guest is the host's (KVM) or qemu's (TCG), which no guest option changes.
const QEMUCmdline = "console=ttyS0 quiet panic=-1 random.trust_cpu=on cryptomgr.notests mitigations=off rdinit=" + GuestDedi + " -- init"

// QEMUImage is qemu.json in the image dir and GuestImageConfig in the
// guest: what the build found out about the kernel.
type QEMUImage struct {
	KernelVersion string   `json:"kernelVersion"`
	Modules       []string `json:"modules"` // guest paths, in load order
}

// GuestConfig is one machine's identity and settings, GuestMachineConfig
// in the guest. The provider writes it into a small cpio appended to the
// image's initramfs, so it never shows on a command line; "dedi init"
// reads it and starts the LSPM with it.
type GuestConfig struct {
	MachineID      string        `json:"machineId"`
	Token          string        `json:"token"`
	VMMURL         string        `json:"vmmUrl,omitempty"`
	Address        string        `json:"address"`  // where game clients reach the machine (the host's forward)
	LSPMPort       int           `json:"lspmPort"` // the LSPM listens on it, in the guest and forwarded on the host
	PortMin        int           `json:"portMin"`  // game ports, the same numbers in the guest and on the host
	PortMax        int           `json:"portMax"`
	MaxProcesses   int           `json:"maxProcesses,omitempty"`
	ReportInterval time.Duration `json:"reportInterval,omitempty"`
	Command        []string      `json:"command,omitempty"` // the LSPM's default command; empty: the manifest's
	Allow          []string      `json:"allow,omitempty"`   // more --allow values, each naming an executable of the manifest
	// Verified says the host checked this boot's initramfs with
	// VerifyInitramfs: every executable of its manifest has its pinned
	// hash, so the guest need not hash them again as long as each is the
	// file unpacked at boot.
	Verified bool   `json:"verified,omitempty"`
	IP       string `json:"ip"` // the guest's address with prefix length
	Gateway  string `json:"gateway"`
}

// Validate reports a config the init cannot boot with.
func (c GuestConfig) Validate() error {
	switch {
	case c.MachineID == "":
		return errors.New("machine config: no machine id")
	case c.Token == "":
		return errors.New("machine config: no token")
	case c.LSPMPort < 1 || c.LSPMPort > 65535:
		return fmt.Errorf("machine config: LSPM port %d out of range", c.LSPMPort)
	case c.PortMin < 1 || c.PortMax > 65535 || c.PortMin > c.PortMax:
		return fmt.Errorf("machine config: game ports %d-%d", c.PortMin, c.PortMax)
	case c.IP == "" || c.Gateway == "":
		return errors.New("machine config: no guest address or gateway")
	}
	return nil
}

// MachineInitramfs returns the gzipped cpio holding one machine's
// config, to be appended to the image's initramfs: the kernel unpacks
// concatenated archives in order, over each other.
func MachineInitramfs(c GuestConfig) ([]byte, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	raw, err := json.Marshal(c)
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	cp := NewCPIO(zw)
	// The image's cpio already made /etc/dedi; a directory entry again
	// would be harmless, but is not needed.
	if err := cp.File(GuestMachineConfig, 0o600, raw); err != nil {
		return nil, err
	}
	if err := cp.Close(); err != nil {
		return nil, err
	}
	if err := zw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}
