// Command guestprobe runs inside a qemu machine as a game server and checks
// what a game of its own user (--game-uids) can reach there: it prints one
// line per check, then exits 3 on purpose when every check holds (the e2e
// test reads the lines as crash evidence), and 1 when one does not.
package main

import (
	"fmt"
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
		for _, dir := range []string{"/", "/usr", "/etc", "/bin", "/opt/game"} {
			if err := os.Mkdir(filepath.Join(dir, "planted"), 0o755); err == nil {
				return fmt.Errorf("created %s/planted", dir)
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
