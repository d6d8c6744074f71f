package lspm

// Who may use a process's Agones SDK ports. Agones' SDK has no token: its
// sidecar listens on localhost inside the game's pod, which nothing else
// shares. On a dedi machine every game shares the loopback interface, so
// the LSPM checks each connection to a process's Agones ports: the client's
// socket must be held by a process of that game's session. The shim starts
// each game server in a session of its own (setsid), so the session holds
// the game and everything it starts, unless one of those leaves it with
// setsid(2) itself.
//
// The check maps the TCP peer to its socket inode through /proc/net/tcp
// (and tcp6), then looks for that inode among the open files of the
// session's processes. It runs once per connection, when it is accepted.
// What it does not cover: a socket passed to another process after it
// connected (SCM_RIGHTS), and any process that can act as the game (same
// user: ptrace, or root) — see docs/AGONES.md.

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
)

// peerOwner names the game whose process tree may use a server.
type peerOwner struct {
	pid     int    // the game server (its process group leader)
	start   uint64 // its start time, to tell a reused pid
	session int    // its session id: the shim's pid
}

// errNotOwner is the answer to a connection from outside the game's tree.
var errNotOwner = errors.New("the connection does not come from the game server's process tree")

// checkPeer reports nil when the client end of conn is held by a process
// of the owner's session or process group.
func (o peerOwner) checkPeer(conn net.Conn) error {
	local, err1 := addrPortOf(conn.LocalAddr())
	remote, err2 := addrPortOf(conn.RemoteAddr())
	if err1 != nil || err2 != nil {
		return fmt.Errorf("peer check: not a TCP connection")
	}
	inode, err := socketInode(remote, local)
	if err != nil {
		return fmt.Errorf("peer check: %w", err)
	}
	if holder := o.holder(inode); holder == 0 {
		return errNotOwner
	}
	return nil
}

func addrPortOf(a net.Addr) (netip.AddrPort, error) {
	ta, ok := a.(*net.TCPAddr)
	if !ok {
		return netip.AddrPort{}, errors.New("not TCP")
	}
	return ta.AddrPort(), nil
}

// socketInode finds the inode of the TCP socket whose local end is local
// and remote end is remote (the client's socket, seen from the server:
// local is the client's address).
func socketInode(local, remote netip.AddrPort) (uint64, error) {
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		data, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		if inode, ok := findSocket(data, local, remote); ok {
			return inode, nil
		}
	}
	return 0, fmt.Errorf("no socket %s -> %s in /proc/net/tcp", local, remote)
}

// findSocket scans a /proc/net/tcp or tcp6 table for the socket local ->
// remote and returns its inode.
func findSocket(table []byte, local, remote netip.AddrPort) (uint64, bool) {
	local = netip.AddrPortFrom(local.Addr().Unmap(), local.Port())
	remote = netip.AddrPortFrom(remote.Addr().Unmap(), remote.Port())
	sc := bufio.NewScanner(bytes.NewReader(table))
	sc.Buffer(make([]byte, 4096), 4096)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		// sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
		if len(f) < 10 || f[0] == "sl" {
			continue
		}
		l, err1 := parseProcAddr(f[1])
		r, err2 := parseProcAddr(f[2])
		if err1 != nil || err2 != nil || l != local || r != remote {
			continue
		}
		inode, err := strconv.ParseUint(f[9], 10, 64)
		if err != nil || inode == 0 {
			continue
		}
		return inode, true
	}
	return 0, false
}

// parseProcAddr reads an address of /proc/net/tcp{,6}: hex words of the
// address in host (little-endian) order, a colon, the port in hex.
func parseProcAddr(s string) (netip.AddrPort, error) {
	host, port, ok := strings.Cut(s, ":")
	if !ok {
		return netip.AddrPort{}, errors.New("no port")
	}
	p, err := strconv.ParseUint(port, 16, 16)
	if err != nil {
		return netip.AddrPort{}, err
	}
	if len(host) != 8 && len(host) != 32 {
		return netip.AddrPort{}, errors.New("bad address")
	}
	// Each 32-bit word is printed as a host-order integer of the bytes in
	// memory (network order): store it back the way the host keeps it.
	raw := make([]byte, len(host)/2)
	for i := 0; i < len(host); i += 8 {
		w, err := strconv.ParseUint(host[i:i+8], 16, 32)
		if err != nil {
			return netip.AddrPort{}, errors.New("bad address")
		}
		binary.NativeEndian.PutUint32(raw[i/2:], uint32(w))
	}
	addr, _ := netip.AddrFromSlice(raw)
	return netip.AddrPortFrom(addr.Unmap(), uint16(p)), nil
}

// holder returns the pid of a process of the owner's session or process
// group that holds the socket inode, or 0.
func (o peerOwner) holder(inode uint64) int {
	want := "socket:[" + strconv.FormatUint(inode, 10) + "]"
	// The game itself is the likeliest holder: look there first.
	if o.pid > 0 && pidAlive(o.pid, o.start) && holds(o.pid, want) {
		return o.pid
	}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return 0
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == o.pid {
			continue
		}
		pgrp, sid, ok := groupOf(pid)
		if !ok || !(sid == o.session && o.session > 0 || pgrp == o.pid && o.pid > 0) {
			continue
		}
		if holds(pid, want) {
			return pid
		}
	}
	return 0
}

// groupOf reads a process's process group and session from /proc.
func groupOf(pid int) (pgrp, sid int, ok bool) {
	raw, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, 0, false
	}
	i := bytes.LastIndexByte(raw, ')')
	if i < 0 {
		return 0, 0, false
	}
	f := strings.Fields(string(raw[i+1:]))
	// state ppid pgrp session ...
	if len(f) < 4 {
		return 0, 0, false
	}
	pgrp, err1 := strconv.Atoi(f[2])
	sid, err2 := strconv.Atoi(f[3])
	return pgrp, sid, err1 == nil && err2 == nil
}

// holds reports whether process pid has the file want ("socket:[N]") open.
func holds(pid int, want string) bool {
	dir := "/proc/" + strconv.Itoa(pid) + "/fd"
	ents, err := os.ReadDir(dir)
	if err != nil {
		return false
	}
	for _, e := range ents {
		if link, err := os.Readlink(dir + "/" + e.Name()); err == nil && link == want {
			return true
		}
	}
	return false
}
