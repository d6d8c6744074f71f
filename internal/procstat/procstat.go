// Package procstat reads what dedi needs to know of a process from Linux's
// /proc: its state and its start time, which tells a live pid from one the
// kernel has handed to another process since.
package procstat

import (
	"bytes"
	"errors"
	"os"
	"strconv"
	"strings"
)

// Stat returns a process's state letter (field 3 of /proc/<pid>/stat: R,
// S, D, Z, ...) and its start time in clock ticks after boot (field 22).
func Stat(pid int) (state byte, start uint64, err error) {
	raw, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, 0, err
	}
	// The command name in parentheses may hold anything, ')' included.
	i := bytes.LastIndexByte(raw, ')')
	if i < 0 {
		return 0, 0, errors.New("bad /proc stat")
	}
	f := strings.Fields(string(raw[i+1:]))
	if len(f) < 20 || len(f[0]) != 1 {
		return 0, 0, errors.New("bad /proc stat")
	}
	start, err = strconv.ParseUint(f[19], 10, 64)
	return f[0][0], start, err
}

// StartTime is the start time of a process that has not exited: a zombie
// (or a dead process) is an error.
func StartTime(pid int) (uint64, error) {
	state, start, err := Stat(pid)
	if err == nil && (state == 'Z' || state == 'X') {
		err = errors.New("exited")
	}
	return start, err
}
