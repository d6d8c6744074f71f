package e2e

import (
	"bytes"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"dedi.dev/dedi/api"
)

// With --game-uids each game runs as a user of its own: another game can
// neither kill it nor read its environment (which holds its token), and
// what a game leaves running outside its process group dies with it.
func TestGameUsersIsolateGames(t *testing.T) {
	t.Parallel()
	if os.Geteuid() != 0 {
		t.Skipf("--game-uids needs root; these tests run as user %d", os.Geteuid())
	}
	cleanGameHomes(t, 2000000100, 2000000199)
	private := t.TempDir() // 0700: no game user gets through
	hidden := filepath.Join(private, "hidden-game")
	if err := os.WriteFile(hidden, []byte("#!/bin/sh\nexit 0\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(private, 0o700); err != nil {
		t.Fatal(err)
	}
	l := startLSPM(t, lspmOpts{noDefault: true, extra: []string{"--allow", "/bin/sh", "--allow", hidden,
		"--game-uids", "2000000100-2000000199"}})
	// A game its user cannot reach is refused, saying why.
	if code, raw := call(t, "POST", l.url+"/v1/processes", l.token, api.SpawnRequest{Ports: []string{}, Command: []string{hidden}}, nil); code != http.StatusInternalServerError ||
		!strings.Contains(string(raw), `"code":"spawn_failed"`) || !strings.Contains(string(raw), "directory "+private) {
		t.Errorf("spawn of a game in a private directory: %d %s, want 500 spawn_failed naming %s", code, raw, private)
	}
	sh := func(script string) api.SpawnRequest {
		return api.SpawnRequest{Ports: []string{}, Command: []string{"/bin/sh", "-c", script}}
	}

	victim := l.spawn(t, sh("exec sleep 600"))
	vuid := uidOf(t, victim.PID)
	if vuid < 2000000101 || vuid > 2000000199 {
		t.Fatalf("the game runs as user %d, want one of 2000000101-2000000199 (2000000100 is the sweeper)", vuid)
	}

	attacker := l.spawn(t, sh(fmt.Sprintf(
		`kill -9 %d 2>/dev/null; echo kill=$?; cat /proc/%d/environ >/dev/null 2>&1; echo environ=$?; echo uid=$(id -u)`,
		victim.PID, victim.PID)))
	l.waitState(t, attacker.ID, 10*time.Second, api.StateExited)
	out := l.waitLog(t, attacker.ID, "uid=", 5*time.Second)
	if !strings.Contains(out, "kill=1") || !strings.Contains(out, "environ=1") {
		t.Fatalf("another game reached the victim: %q", out)
	}
	if strings.Contains(out, "uid="+strconv.Itoa(vuid)+"\n") || strings.Contains(out, "uid=0\n") {
		t.Fatalf("the attacker ran as the victim's user or root: %q", out)
	}
	if !alive(victim.PID) {
		t.Fatal("the victim died")
	}

	// Its own HOME (and TMPDIR): writable by it alone, gone with it.
	homer := l.spawn(t, sh(`grep "Max processes" /proc/self/limits; touch "$HOME/x" && echo "home=$HOME tmp=$TMPDIR mode=$(stat -c %a:%u "$HOME") uid=$(id -u) end"`))
	l.waitState(t, homer.ID, 10*time.Second, api.StateExited)
	out = l.waitLog(t, homer.ID, " end", 5*time.Second)
	var home, tmp, mode, huid string
	if _, err := fmt.Sscanf(out[strings.Index(out, "home="):], "home=%s tmp=%s mode=%s uid=%s end", &home, &tmp, &mode, &huid); err != nil {
		t.Fatalf("log %q: %v", out, err)
	}
	if !strings.HasPrefix(home, os.TempDir()+"/dedi-game-") || tmp != home || mode != "700:"+huid {
		t.Fatalf("the game's home %q, TMPDIR %q, mode and owner %q (uid %s)", home, tmp, mode, huid)
	}
	// At most 1,024 tasks: one game cannot use up the machine's pids.
	if f := strings.Fields(out[strings.Index(out, "Max processes"):]); len(f) < 4 || f[2] != "1024" || f[3] != "1024" {
		t.Errorf("the game's process limit: %q, want 1024", out)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err := os.Lstat(home); os.IsNotExist(err) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the ended game's home %s is still there", home)
		}
		time.Sleep(10 * time.Millisecond)
	}

	// What a game leaves where every user can write is gone before its user
	// is another game's: files in /tmp and /dev/shm, System V IPC.
	// (The LSPM's $TMPDIR is this test's; the game's own is its home.)
	req := sh(`u=$(id -u); mkdir "$SHARED/litter.$u" && touch "$SHARED/litter.$u/f" "$SHARED/litter-file.$u" /dev/shm/litter.$u &&
ipcmk -M 4096 >/dev/null && ipcmk -S 1 >/dev/null && ipcmk -Q >/dev/null && echo littered=$u`)
	req.Env = map[string]string{"SHARED": os.TempDir()}
	litter := l.spawn(t, req)
	l.waitState(t, litter.ID, 10*time.Second, api.StateExited)
	out = l.waitLog(t, litter.ID, "littered=", 5*time.Second)
	luid := strings.TrimSpace(out[strings.Index(out, "littered=")+len("littered="):])
	for _, path := range []string{filepath.Join(os.TempDir(), "litter."+luid), filepath.Join(os.TempDir(), "litter-file."+luid), "/dev/shm/litter." + luid} {
		if _, err := os.Lstat(path); !os.IsNotExist(err) {
			t.Errorf("%s is left after its game ended (%v)", path, err)
		}
	}
	for _, table := range []string{"shm", "sem", "msg"} {
		raw, err := os.ReadFile("/proc/sysvipc/" + table)
		if err != nil {
			t.Fatal(err)
		}
		lines := strings.Split(string(raw), "\n")
		col := slices.Index(strings.Fields(lines[0]), "uid")
		for _, line := range lines[1:] {
			if f := strings.Fields(line); len(f) > col && f[col] == luid {
				t.Errorf("System V %s of the ended game's user is left: %s", table, line)
			}
		}
	}

	// A setuid file one game plants gives another game nothing: games run
	// with no_new_privs. (A game could leave one for the next game of its
	// user in a directory another game owns, beyond the leftover removal.)
	opener := sh(`d="$SHARED/open.$(id -u)"; mkdir -m 777 "$d" && echo "dir=$d end"
i=0; while [ ! -e "$d/id" ] && [ $i -lt 1000 ]; do sleep 0.01; i=$((i+1)); done; "$d/id"; echo ran`)
	opener.Env = map[string]string{"SHARED": os.TempDir()}
	victimOfSuid := l.spawn(t, opener)
	out = l.waitLog(t, victimOfSuid.ID, " end", 5*time.Second)
	dir := strings.Fields(out[strings.Index(out, "dir=")+len("dir="):])[0]
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	planter := l.spawn(t, sh(`cp /usr/bin/id "`+dir+`/.id" && chmod 4755 "`+dir+`/.id" && mv "`+dir+`/.id" "`+dir+`/id" && echo planted`))
	l.waitState(t, planter.ID, 10*time.Second, api.StateExited)
	out = l.waitLog(t, victimOfSuid.ID, "ran", 10*time.Second)
	if strings.Contains(out, "euid=") || !strings.Contains(out, "uid=") {
		t.Errorf("a game ran another game's setuid file and took its user: %q", out)
	}

	// A daemon in a session of its own, left behind when its game exits
	// (which waits until the daemon has left its process group).
	leaver := l.spawn(t, sh(`setsid sleep 600 & pid=$!
while [ "$(cut -d' ' -f6 /proc/$pid/stat)" != "$pid" ]; do sleep 0.01; done
echo left=$pid`))
	l.waitState(t, leaver.ID, 10*time.Second, api.StateExited)
	out = l.waitLog(t, leaver.ID, "left=", 5*time.Second)
	pid, err := strconv.Atoi(strings.TrimSpace(out[strings.Index(out, "left=")+len("left="):]))
	if err != nil {
		t.Fatalf("log %q", out)
	}
	waitDead(t, pid, 5*time.Second)
}

// A descriptor the LSPM inherited (from a service manager, a shell) is not
// the game's to have.
func TestGameInheritsNoDescriptors(t *testing.T) {
	t.Parallel()
	secret, err := os.Create(filepath.Join(t.TempDir(), "lspm-only"))
	if err != nil {
		t.Fatal(err)
	}
	defer secret.Close()
	l := startLSPM(t, lspmOpts{noDefault: true, extra: []string{"--allow", "/bin/sh"}, inherit: []*os.File{secret}})
	if raw, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/3", l.cmd.Process.Pid)); err != nil || !strings.HasSuffix(raw, "lspm-only") {
		t.Fatalf("the LSPM's fd 3 is %q (%v): the test does not test", raw, err)
	}
	p := l.spawn(t, api.SpawnRequest{Ports: []string{}, Command: []string{"/bin/sh", "-c",
		`ls -l /proc/$$/fd; echo done`}})
	l.waitState(t, p.ID, 10*time.Second, api.StateExited)
	out := l.waitLog(t, p.ID, "done", 5*time.Second)
	var fds []string
	for _, line := range strings.Split(out, "\n") {
		if before, _, ok := strings.Cut(line, " -> "); ok {
			f := strings.Fields(before)
			fds = append(fds, f[len(f)-1])
		}
	}
	if strings.Join(fds, ",") != "0,1,2" {
		t.Fatalf("the game holds descriptors %v, want 0, 1 and 2 only:\n%s", fds, out)
	}
}

// Games do not share the LSPM's session keyring (a service manager or a
// login gives it one): each game gets one of its own, so no game reads or
// leaves keys there for another. (/proc/keys lists the keys a process
// may view: a game of its own user views root's keyring only by
// possessing it.)
func TestGamesHaveSessionKeyringsOfTheirOwn(t *testing.T) {
	t.Parallel()
	if os.Geteuid() != 0 {
		t.Skipf("--game-uids needs root; these tests run as user %d", os.Geteuid())
	}
	name := fmt.Sprintf("dedi-test-lspm-ses-%d", time.Now().UnixNano())
	cleanGameHomes(t, 2000000300, 2000000302)
	l := startLSPM(t, lspmOpts{maxProcesses: 2, noDefault: true, keyring: name,
		extra: []string{"--allow", "/bin/cat", "--game-uids", "2000000300-2000000302"}})
	p := l.spawn(t, api.SpawnRequest{Ports: []string{}, Command: []string{"/bin/cat", "/proc/keys"}})
	l.waitState(t, p.ID, 10*time.Second, api.StateExited)
	out := l.waitLog(t, p.ID, "keyring", 5*time.Second)
	if strings.Contains(out, name) {
		t.Fatalf("the game holds the LSPM's session keyring %q:\n%s", name, out)
	}
	if !strings.Contains(out, "_ses") {
		t.Fatalf("the game has no session keyring of its own:\n%s", out)
	}
}

// cleanGameHomes removes, when the test ends (after its LSPMs, whose
// games still running then keep their homes), the homes of games of users
// lo to hi.
func cleanGameHomes(t *testing.T, lo, hi int) {
	t.Cleanup(func() {
		homes, _ := filepath.Glob(filepath.Join(os.TempDir(), "dedi-game-*"))
		for _, h := range homes {
			var st syscall.Stat_t
			if syscall.Lstat(h, &st) == nil && int(st.Uid) >= lo && int(st.Uid) <= hi {
				_ = os.RemoveAll(h)
			}
		}
	})
}

// uidOf is the real user id of a process.
func uidOf(t *testing.T, pid int) int {
	t.Helper()
	raw, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	_, rest, _ := strings.Cut(string(raw), "\nUid:")
	f := strings.Fields(rest)
	uid, err := strconv.Atoi(f[0])
	if err != nil {
		t.Fatalf("status %q", raw)
	}
	return uid
}

// A game that leaves a daemon and a chain of processes that fork and exit
// without pause (no scan of /proc catches them), whose shim is then killed:
// the LSPM records the game lost and, before its user goes to another
// game, ends every process of that user.
func TestGameUserSweptWhenShimDies(t *testing.T) {
	t.Parallel()
	if os.Geteuid() != 0 {
		t.Skipf("--game-uids needs root; these tests run as user %d", os.Geteuid())
	}
	cleanGameHomes(t, 2000000200, 2000000202)
	l := startLSPM(t, lspmOpts{maxProcesses: 2, noDefault: true,
		extra: []string{"--allow", "/bin/sh", "--game-uids", "2000000200-2000000202"}})
	hop := `setsid -f sh -c "$HOP" </dev/null >/dev/null 2>&1; exit 0`
	p := l.spawn(t, api.SpawnRequest{Ports: []string{}, Env: map[string]string{"HOP": hop},
		Command: []string{"/bin/sh", "-c", `setsid sleep 600 & pid=$!
while [ "$(cut -d' ' -f6 /proc/$pid/stat)" != "$pid" ]; do sleep 0.01; done
sh -c "$HOP"
echo left=$pid
exec sleep 600`}})
	uid := uidOf(t, p.PID)
	out := l.waitLog(t, p.ID, "left=", 5*time.Second)
	daemon, err := strconv.Atoi(strings.TrimSpace(out[strings.Index(out, "left=")+len("left="):]))
	if err != nil {
		t.Fatalf("log %q", out)
	}
	raw, err := os.ReadFile("/proc/" + strconv.Itoa(p.PID) + "/stat")
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(raw[bytes.LastIndexByte(raw, ')')+1:]))
	shim, _ := strconv.Atoi(f[1])
	if shim <= 1 {
		t.Fatalf("game's parent %q", f[1])
	}
	time.Sleep(200 * time.Millisecond) // let the hoppers hop
	if err := syscall.Kill(shim, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}

	l.waitState(t, p.ID, 10*time.Second, api.StateLost)
	waitDead(t, daemon, time.Second)
	waitDead(t, p.PID, time.Second)
	before := zombiesOf(t, uid)
	time.Sleep(300 * time.Millisecond)
	if live := liveOf(t, uid); len(live) > 0 || zombiesOf(t, uid) > before {
		t.Fatalf("processes of the lost game's user %d still run: %v (zombies %d, then %d)", uid, live, before, zombiesOf(t, uid))
	}
}

// liveOf lists the processes whose real user is uid and are not zombies;
// zombiesOf counts those that are.
func liveOf(t *testing.T, uid int) []int { return procsOf(t, uid, false) }

func zombiesOf(t *testing.T, uid int) int { return len(procsOf(t, uid, true)) }

func procsOf(t *testing.T, uid int, zombies bool) []int {
	t.Helper()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		raw, err := os.ReadFile("/proc/" + e.Name() + "/status")
		if err != nil || strings.Contains(string(raw), "\nState:\tZ") != zombies {
			continue
		}
		_, rest, _ := strings.Cut(string(raw), "\nUid:")
		if f := strings.Fields(rest); len(f) > 0 && f[0] == strconv.Itoa(uid) {
			out = append(out, pid)
		}
	}
	return out
}

// With --local-game-uids the local provider's machines run each game as a
// user of its own, from a block of users per machine address, so no two
// machines of the host (whose LSPMs each sweep their games' users) share
// one.
func TestLocalGameUsers(t *testing.T) {
	t.Parallel()
	if os.Geteuid() != 0 {
		t.Skipf("--local-game-uids needs root; these tests run as user %d", os.Geteuid())
	}
	const base = 2000100000
	cleanGameHomes(t, base, base+5*1024)
	v := startVMM(t, "--local-game-uids", strconv.Itoa(base))
	first := 0
	for i, a := range v.args {
		if a == "--local-first-host" {
			first, _ = strconv.Atoi(v.args[i+1])
		}
	}
	v.fleet(t, api.Fleet{Name: "lg", Command: []string{"/bin/sh", "-c", `echo "uid=$(id -u) end"; exec sleep 600`},
		ProcessesPerMachine: 1, Ports: []string{},
		Scaling: api.Scaling{MaxMachines: 2, IdleShutdownSeconds: 3600}})
	blocks := map[int]bool{}
	for range 2 {
		p := startProcess(t, v, "lg", false)
		var out []byte
		eventually(t, 10*time.Second, "the game's log", func() bool {
			_, out = call(t, "GET", v.url+"/v1/processes/"+p.ID+"/logs", v.token, nil, nil)
			return strings.Contains(string(out), " end")
		})
		var uid int
		if _, err := fmt.Sscanf(string(out[bytes.Index(out, []byte("uid=")):]), "uid=%d end", &uid); err != nil {
			t.Fatalf("log %q: %v", out, err)
		}
		n, _ := strconv.Atoi(p.Address[strings.LastIndexByte(p.Address, '.')+1:])
		lo := base + (n-first)*1024
		if uid <= lo || uid >= lo+1024 {
			t.Errorf("the game on 127.0.0.%d runs as user %d, want one of %d-%d (%d is the LSPM's sweeper)", n, uid, lo+1, lo+1023, lo)
		}
		blocks[lo] = true
	}
	if len(blocks) != 2 {
		t.Errorf("two games on two machines ran from the blocks %v, want two blocks", blocks)
	}
}
