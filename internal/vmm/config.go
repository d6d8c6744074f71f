// Package vmm is the virtual machine manager, dedi's control plane: it
// keeps fleets, machines and processes in an embedded store, provisions
// machines through providers, places game server processes on them,
// applies the LSPMs' numbered status reports, marks silent machines lost,
// and shuts idle machines down through the LSPM handshake.
package vmm

import (
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"time"

	"dedi.dev/dedi/internal/provider"
)

// Config is everything a VMM needs.
type Config struct {
	// Listen is the API address (port 0 picks one; see VMM.Addr).
	Listen string
	// DataDir holds the store (vmm.db) and the generated admin token.
	DataDir string
	// AdminToken is the admin token; empty means the one in
	// DataDir/admin-token, generated on first start.
	AdminToken string
	// URL is the VMM's base URL as machines reach it (for status
	// reports); default from the listen address.
	URL string
	// Providers by name, as a fleet's "provider" names them.
	Providers map[string]provider.Provider
	// ReportInterval is the LSPMs' report period (default 2s); a machine is
	// lost after LostAfter without a report (default 3 intervals).
	ReportInterval time.Duration
	LostAfter      time.Duration
	// BootTimeout is how long a new machine may take to send its first
	// report before it is deleted and replaced (default 60s).
	BootTimeout time.Duration
	// TickInterval paces lost detection, idle shutdown and min machines
	// (default 250ms).
	TickInterval time.Duration
	// KeepEnded and KeepEvents bound the history kept in the store.
	KeepEnded, KeepEvents int
	// KeepEndedMachines bounds the terminated and lost machines kept.
	KeepEndedMachines int
}

func (c Config) withDefaults() Config {
	if c.Listen == "" {
		c.Listen = "127.0.0.1:7700"
	}
	if c.ReportInterval == 0 {
		c.ReportInterval = 2 * time.Second
	}
	if c.LostAfter == 0 {
		c.LostAfter = 3 * c.ReportInterval
	}
	if c.BootTimeout == 0 {
		c.BootTimeout = 60 * time.Second
	}
	if c.TickInterval == 0 {
		c.TickInterval = 250 * time.Millisecond
	}
	if c.KeepEndedMachines == 0 {
		c.KeepEndedMachines = 1000
	}
	if c.KeepEnded == 0 {
		c.KeepEnded = 10000
	}
	if c.KeepEvents == 0 {
		c.KeepEvents = 10000
	}
	return c
}

// Validate reports the first problem of a defaulted config.
func (c Config) Validate() error {
	if c.DataDir == "" || !filepath.IsAbs(c.DataDir) {
		return errors.New("--data-dir must be an absolute path")
	}
	if _, _, err := net.SplitHostPort(c.Listen); err != nil {
		return fmt.Errorf("--listen %q: %v", c.Listen, err)
	}
	if len(c.Providers) == 0 {
		return errors.New("no machine provider configured")
	}
	if c.AdminToken != "" && len(c.AdminToken) < 16 {
		return errors.New("the admin token must be at least 16 characters")
	}
	if c.ReportInterval <= 0 || c.LostAfter <= c.ReportInterval || c.BootTimeout <= 0 || c.TickInterval <= 0 {
		return errors.New("report interval, lost timeout (above one interval), boot timeout and tick must be positive")
	}
	return nil
}
