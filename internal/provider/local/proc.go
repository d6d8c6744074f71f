package local

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"golang.org/x/sys/unix"

	"dedi.dev/dedi/api"
	"dedi.dev/dedi/internal/procstat"
)

// proc is a process held by a pidfd, so that neither a signal nor a wait
// can reach another process that reused its pid.
type proc struct{ fd int }

// openProc returns pid's process if it still runs and started at start.
func openProc(pid int, start uint64) (proc, bool) {
	if pid <= 0 || start == 0 {
		return proc{}, false
	}
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return proc{}, false
	}
	// Checked after the open: if the pid was reused before it, the start
	// time differs now.
	if s, err := procstat.StartTime(pid); err != nil || s != start {
		unix.Close(fd)
		return proc{}, false
	}
	return proc{fd: fd}, true
}

func (p proc) signal(sig unix.Signal) error { return unix.PidfdSendSignal(p.fd, sig, nil, 0) }

func (p proc) close() { unix.Close(p.fd) }

// wait reports whether the process exited within d (or before ctx ends).
func (p proc) wait(ctx context.Context, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for {
		fds := []unix.PollFd{{Fd: int32(p.fd), Events: unix.POLLIN}}
		n, err := unix.Poll(fds, 100)
		if err == nil && n > 0 {
			return true
		}
		if ctx.Err() != nil || time.Now().After(deadline) {
			return false
		}
	}
}

// reapChild collects pid if it is an exited child of this process that a
// closed Local no longer watches; any other pid is left alone.
func reapChild(pid int, start uint64) {
	if pid <= 0 {
		return
	}
	if state, s, err := procstat.Stat(pid); err == nil && state == 'Z' && s == start {
		var ws unix.WaitStatus
		_, _ = unix.Wait4(pid, &ws, unix.WNOHANG, nil)
	}
}

// gameRecord is the part of the LSPM's process record (internal/lspm's
// record, DATA-DIR/processes/<id>/record.json) that names its processes.
type gameRecord struct {
	Process struct {
		PID int `json:"pid"`
	} `json:"process"`
	Start     uint64 `json:"start"`
	ShimPID   int    `json:"shimPid"`
	ShimStart uint64 `json:"shimStart"`
}

// killGames kills every game server (its process group) and shim of an
// LSPM data dir that still runs, and waits for them to be gone. It also
// kills any process of the machine's games that no record names (a spawn
// interrupted by a killed LSPM), found by the environment the LSPM gives
// them. It returns how many processes it killed.
func killGames(dataDir, machineID, lspmURL string) int {
	var killed []proc
	kill := func(pid int, start uint64, group bool) {
		p, ok := openProc(pid, start)
		if !ok {
			return
		}
		if group {
			// The game leads its own group; while it lives, its pgid
			// cannot name another group.
			_ = unix.Kill(-pid, unix.SIGKILL)
		}
		_ = p.signal(unix.SIGKILL)
		killed = append(killed, p)
	}
	recs, _ := filepath.Glob(filepath.Join(dataDir, "processes", "*", "record.json"))
	for _, path := range recs {
		var r gameRecord
		raw, err := os.ReadFile(path)
		if err != nil || json.Unmarshal(raw, &r) != nil {
			continue
		}
		kill(r.Process.PID, r.Start, true)
		kill(r.ShimPID, r.ShimStart, false)
	}
	if lspmURL != "" {
		for _, pid := range pidsWithEnv(api.EnvMachineID+"="+machineID, api.EnvSDKURL+"="+lspmURL) {
			if _, start, err := procstat.Stat(pid); err == nil {
				pgid, _ := unix.Getpgid(pid)
				kill(pid, start, pgid == pid)
			}
		}
	}
	for _, p := range killed {
		p.wait(context.Background(), 5*time.Second)
		p.close()
	}
	return len(killed)
}

// pidsWithEnv lists the processes whose environment holds every one of
// vars ("NAME=value"). Processes this user may not inspect are skipped.
func pidsWithEnv(vars ...string) []int {
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		env, err := os.ReadFile("/proc/" + e.Name() + "/environ")
		if err != nil {
			continue
		}
		env = append(append([]byte{0}, env...), 0)
		all := true
		for _, v := range vars {
			all = all && bytes.Contains(env, []byte("\x00"+v+"\x00"))
		}
		if all {
			pids = append(pids, pid)
		}
	}
	return pids
}
