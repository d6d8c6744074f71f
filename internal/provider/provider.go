// Package provider is the plug-in contract by which the VMM gets machines:
// each backend (local processes, Docker, QEMU, later cloud APIs) lives in a
// subpackage and passes the shared contract suite in providertest.
package provider

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"time"
)

// Spec is everything a provider needs to create one machine: a machine
// boots an LSPM that knows its identity, its token and where the VMM is.
type Spec struct {
	MachineID      string        // the VMM's id for the machine (the LSPM's --machine-id)
	Fleet          string        // tags the machine so List finds it (and its orphans)
	Token          string        // the machine token the LSPM accepts and reports with
	VMMURL         string        // where the LSPM sends status reports
	Image          string        // the VMI reference; "" for providers that need none
	Command        []string      // the LSPM's default game command; may be empty when the image has one
	Allow          []string      // more executables the LSPM may run (PATH[=SHA256])
	MaxProcesses   int           // the LSPM's --max-processes
	ReportInterval time.Duration // the LSPM's --report-interval (0: its default)
}

// Machine is a machine as its provider knows it.
type Machine struct {
	ProviderID string    // the provider's own handle, passed to Delete
	MachineID  string    // Spec.MachineID
	Fleet      string    // Spec.Fleet
	Address    string    // where game clients reach the machine's game servers
	LSPMURL    string    // base URL of the machine's LSPM API
	CreatedAt  time.Time // when the provider created it
}

// Provider creates, lists and deletes machines.
type Provider interface {
	// Name is the provider's name in a fleet's "provider" field.
	Name() string
	// Create starts a machine and returns once the provider has it; the
	// LSPM on it may still be booting.
	Create(ctx context.Context, spec Spec) (Machine, error)
	// Delete powers a machine off and removes every trace of it. Deleting
	// a machine that is already gone is not an error.
	Delete(ctx context.Context, providerID string) error
	// List returns the provider's machines of fleet ("" for all fleets),
	// including those created by an earlier VMM run.
	List(ctx context.Context, fleet string) ([]Machine, error)
}

// ErrNoCapacity is returned by Create when the provider cannot make
// another machine now (addresses or ports used up, quota reached).
var ErrNoCapacity = errors.New("provider: no capacity")

// LSPMFlags is the command line a provider gives the LSPM of a machine.
// The machine token is never on it: it goes in the LSPM's environment
// (api.EnvMachineToken), where the games cannot read it.
type LSPMFlags struct {
	Listen           string // --listen
	Address          string // --address, where game clients reach the machine ("" in a VM: the LSPM's default)
	DataDir          string // --data-dir
	MachineID        string // --machine-id
	PortMin, PortMax int    // --port-range
	Spec             Spec   // VMMURL, MaxProcesses, ReportInterval and Allow
	Allow            []string
	Extra            []string // more flags, as they are
	Command          []string // the default game command ("": none)
}

// Args is "lspm" and its flags, then "--" and the default command when
// there is one. Every machine's LSPM drains its games when it is stopped:
// a machine is stopped only after the handshake, or to be deleted.
func (f LSPMFlags) Args() []string {
	args := []string{"lspm", "--listen", f.Listen}
	if f.Address != "" {
		args = append(args, "--address", f.Address)
	}
	args = append(args, "--data-dir", f.DataDir, "--machine-id", f.MachineID,
		"--port-range", fmt.Sprintf("%d-%d", f.PortMin, f.PortMax), "--drain")
	if f.Spec.VMMURL != "" {
		args = append(args, "--vmm-url", f.Spec.VMMURL)
	}
	if f.Spec.MaxProcesses > 0 {
		args = append(args, "--max-processes", strconv.Itoa(f.Spec.MaxProcesses))
	}
	if f.Spec.ReportInterval > 0 {
		args = append(args, "--report-interval", f.Spec.ReportInterval.String())
	}
	for _, a := range slices.Concat(f.Allow, f.Spec.Allow) {
		args = append(args, "--allow", a)
	}
	args = append(args, f.Extra...)
	if len(f.Command) > 0 {
		args = append(append(args, "--"), f.Command...)
	}
	return args
}

// Hosts places a provider's machines on this host's loopback addresses
// 127.0.0.N, FirstHost <= N <= LastHost: each machine's LSPM listens on
// LSPMPort at its own address, and the machine on 127.0.0.N gets
// PortsPerMachine game ports from PortBase+(N-FirstHost)*PortsPerMachine,
// so no two machines' ranges overlap even where game servers bind 0.0.0.0.
// Zero fields take the defaults: 10, 250, 7701, 30000 and 100.
type Hosts struct {
	FirstHost, LastHost       int
	LSPMPort                  int
	PortBase, PortsPerMachine int
}

// WithDefaults returns h with zero fields set to their defaults.
func (h Hosts) WithDefaults() Hosts {
	for _, f := range []struct {
		v   *int
		def int
	}{{&h.FirstHost, 10}, {&h.LastHost, 250}, {&h.LSPMPort, 7701}, {&h.PortBase, 30000}, {&h.PortsPerMachine, 100}} {
		if *f.v == 0 {
			*f.v = f.def
		}
	}
	return h
}

// Validate reports a layout that cannot work; 127.0.0.N starts at
// minHost (127.0.0.1 may be the host's own services' address).
func (h Hosts) Validate(minHost int) error {
	switch {
	case h.FirstHost < minHost || h.LastHost > 254 || h.FirstHost > h.LastHost:
		return fmt.Errorf("hosts %d-%d: want %d <= FirstHost <= LastHost <= 254", h.FirstHost, h.LastHost, minHost)
	case h.LSPMPort < 1 || h.LSPMPort > 65535:
		return fmt.Errorf("LSPMPort %d out of range", h.LSPMPort)
	case h.PortBase < 1 || h.PortsPerMachine < 1:
		return fmt.Errorf("PortBase %d and PortsPerMachine %d must be positive", h.PortBase, h.PortsPerMachine)
	}
	lo, _ := h.Ports(h.FirstHost)
	_, hi := h.Ports(h.LastHost)
	if hi > 65535 {
		return fmt.Errorf("game ports %d-%d go past 65535", lo, hi)
	}
	if h.LSPMPort >= lo && h.LSPMPort <= hi {
		return fmt.Errorf("LSPMPort %d is inside the game ports %d-%d", h.LSPMPort, lo, hi)
	}
	return nil
}

// Ports returns the game port range of the machine on 127.0.0.n.
func (h Hosts) Ports(n int) (lo, hi int) {
	lo = h.PortBase + (n-h.FirstHost)*h.PortsPerMachine
	return lo, lo + h.PortsPerMachine - 1
}
