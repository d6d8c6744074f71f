package e2e

import (
	"fmt"
	"os"
	"strconv"
	"strings"
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
	l := startLSPM(t, lspmOpts{noDefault: true, extra: []string{"--allow", "/bin/sh", "--game-uids", "61100-61199"}})
	sh := func(script string) api.SpawnRequest {
		return api.SpawnRequest{Ports: []string{}, Command: []string{"/bin/sh", "-c", script}}
	}

	victim := l.spawn(t, sh("exec sleep 600"))
	vuid := uidOf(t, victim.PID)
	if vuid < 61100 || vuid > 61199 {
		t.Fatalf("the game runs as user %d, want one of 61100-61199", vuid)
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
