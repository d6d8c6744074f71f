// Command guestprobe runs inside a qemu machine as a game server and checks
// what a game of its own user (--game-uids) can reach there: it prints one
// line per check, then exits 3 on purpose when every check holds (the e2e
// test reads the lines as crash evidence), and 1 when one does not.
package main

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

func main() {
	failed := false
	check := func(name string, err error) {
		if err != nil {
			failed = true
			fmt.Printf("guestprobe: FAIL %s: %v\n", name, err)
			return
		}
		fmt.Printf("guestprobe: ok %s\n", name)
	}
	uid := os.Getuid()
	check("own user", func() error {
		if uid == 0 {
			return fmt.Errorf("runs as root")
		}
		return nil
	}())
	check("root dir read-only", func() error {
		st, err := os.Stat("/")
		if err != nil {
			return err
		}
		if st.Mode().Perm()&0o022 != 0 {
			return fmt.Errorf("/ is %v", st.Mode())
		}
		// Refused for want of permission, not for a missing parent.
		for _, path := range []string{"/planted", "/usr", "/etc/planted", "/bin/planted", "/opt/game/planted"} {
			if err := os.Mkdir(path, 0o755); !errors.Is(err, fs.ErrPermission) {
				return fmt.Errorf("mkdir %s: %v, want permission denied", path, err)
			}
		}
		return nil
	}())
	check("no privileges by exec", func() error {
		raw, err := os.ReadFile("/proc/self/status")
		if err != nil {
			return err
		}
		if !strings.Contains(string(raw), "\nNoNewPrivs:\t1\n") {
			return fmt.Errorf("no_new_privs is not set")
		}
		var st syscall.Statfs_t
		if err := syscall.Statfs("/tmp", &st); err != nil {
			return err
		}
		if st.Flags&0x2 == 0 { // ST_NOSUID
			return fmt.Errorf("/tmp is not nosuid (flags %#x)", st.Flags)
		}
		return nil
	}())
	check("POSIX shared memory and message queues", func() error {
		for _, dir := range []string{"/tmp", "/dev/shm", "/dev/mqueue"} {
			st, err := os.Stat(dir)
			if err != nil {
				return err
			}
			if st.Mode()&(fs.ModeSticky|0o777) != fs.ModeSticky|0o777 {
				return fmt.Errorf("%s is %v, want drwxrwxrwt", dir, st.Mode())
			}
		}
		return nil
	}())
	check("own home", func() error {
		home := os.Getenv("HOME")
		if !strings.HasPrefix(home, "/tmp/dedi-game-") || os.Getenv("TMPDIR") != home {
			return fmt.Errorf("HOME %q, TMPDIR %q", home, os.Getenv("TMPDIR"))
		}
		st, err := os.Stat(home)
		if err != nil {
			return err
		}
		if s, ok := st.Sys().(*syscall.Stat_t); !ok || int(s.Uid) != uid || st.Mode().Perm() != 0o700 {
			return fmt.Errorf("%s is %v, owned by %v", home, st.Mode(), st.Sys())
		}
		return os.WriteFile(filepath.Join(home, "state"), []byte("x"), 0o600)
	}())
	if failed {
		os.Exit(1)
	}
	fmt.Println("guestprobe: every check held; crashing on purpose")
	os.Exit(3)
}
