// Package sim is a simulated machine provider for load tests of the VMM.
//
// Its machines run nothing: Create returns at once a Machine whose LSPM URL
// points where nothing listens, and records the machine, with its token,
// as one JSON line of DIR/machines.jsonl. A load generator reads that file
// to learn each machine's token and sends the status reports the machine's
// LSPM would send (test/loadgen). The VMM never needs to call a sim
// machine as long as nothing asks it to (no placement, no idle shutdown,
// no process missing from a report).
//
// A benchmark that stands in for the LSPMs (test/e2e's vmm-only placement)
// writes their base URL to DIR/lspm-url before the Sim is made: the
// machines then have it as their LSPM URL.
//
// DIR/machines.jsonl is append-only: a Create line {machineId, fleet,
// token, createdAt} and, on Delete, a line {machineId, deleted: true}. A
// Sim opened on a DIR that has the file replays it, so a restarted VMM
// finds the machines again. The file holds machine tokens: it is for load
// tests only (dedi vmm --sim-provider-dir).
package sim

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"dedi.dev/dedi/internal/provider"
)

var _ provider.Provider = (*Sim)(nil)

const (
	// File is the name of the machine log in the Sim's dir.
	File = "machines.jsonl"
	// URLFile, when the Sim's dir has it at New, holds the machines' LSPM
	// URL instead of LSPMURL.
	URLFile = "lspm-url"
	// Address is every sim machine's address.
	Address = "127.0.0.1"
	// LSPMURL is every sim machine's LSPM URL: nothing listens there.
	LSPMURL = "http://127.0.0.1:1"
)

// Record is one line of DIR/machines.jsonl.
type Record struct {
	MachineID string    `json:"machineId"`
	Fleet     string    `json:"fleet,omitempty"`
	Token     string    `json:"token,omitempty"`
	CreatedAt time.Time `json:"createdAt,omitzero"`
	Deleted   bool      `json:"deleted,omitempty"`
}

// Sim is the simulated provider. Its methods are safe for concurrent use;
// one Sim at a time may use a dir.
type Sim struct {
	path    string
	lspmURL string
	err     error // from opening the dir; every call returns it

	mu       sync.Mutex
	f        *os.File
	machines map[string]Record // live machines by id
}

// New returns a Sim over dir, creating it and replaying its machine log.
// An error (dir not writable, log unreadable) is returned by every call
// of the Sim, so New fits in a provider map literal.
func New(dir string) *Sim {
	s := &Sim{path: filepath.Join(dir, File), lspmURL: LSPMURL, machines: map[string]Record{}}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		s.err = fmt.Errorf("sim provider: %w", err)
		return s
	}
	if raw, err := os.ReadFile(filepath.Join(dir, URLFile)); err == nil && len(bytes.TrimSpace(raw)) > 0 {
		s.lspmURL = string(bytes.TrimSpace(raw))
	}
	if f, err := os.Open(s.path); err == nil {
		recs, err := ReadRecords(f)
		f.Close()
		if err != nil {
			s.err = fmt.Errorf("sim provider: %s: %w", s.path, err)
			return s
		}
		for _, r := range recs {
			s.apply(r)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		s.err = fmt.Errorf("sim provider: %w", err)
		return s
	}
	f, err := os.OpenFile(s.path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		s.err = fmt.Errorf("sim provider: %w", err)
		return s
	}
	s.f = f
	return s
}

func (s *Sim) machine(r Record) provider.Machine {
	return provider.Machine{ProviderID: r.MachineID, MachineID: r.MachineID, Fleet: r.Fleet,
		Address: Address, LSPMURL: s.lspmURL, CreatedAt: r.CreatedAt}
}

func (s *Sim) apply(r Record) {
	if r.Deleted {
		delete(s.machines, r.MachineID)
	} else {
		s.machines[r.MachineID] = r
	}
}

// ReadRecords parses machine log lines from rd. A last line without its
// newline (a writer caught mid-line) is left out, so a reader can poll the
// file while the Sim appends to it; a line that is not a record (torn by a
// crash) is skipped.
func ReadRecords(rd io.Reader) ([]Record, error) {
	var out []Record
	br := bufio.NewReader(rd)
	for {
		line, err := br.ReadBytes('\n')
		if err == io.EOF {
			return out, nil // a line without its newline is not complete yet
		}
		if err != nil {
			return out, err
		}
		line = bytes.TrimSpace(line)
		if len(line) == 0 {
			continue
		}
		var r Record
		if json.Unmarshal(line, &r) == nil && r.MachineID != "" {
			out = append(out, r)
		}
	}
}

// Name is "sim".
func (s *Sim) Name() string { return "sim" }

// Close closes the machine log.
func (s *Sim) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.f == nil {
		return nil
	}
	err := s.f.Close()
	s.f = nil
	return err
}

func (s *Sim) write(r Record) error {
	line, err := json.Marshal(r)
	if err != nil {
		return err
	}
	if s.f == nil {
		return errors.New("sim provider: closed")
	}
	_, err = s.f.Write(append(line, '\n')) // one write: O_APPEND keeps lines whole
	return err
}

// Create records the machine and returns it at once.
func (s *Sim) Create(ctx context.Context, spec provider.Spec) (provider.Machine, error) {
	if s.err != nil {
		return provider.Machine{}, s.err
	}
	if spec.MachineID == "" || spec.Token == "" {
		return provider.Machine{}, fmt.Errorf("sim provider: machine %q needs an id and a token", spec.MachineID)
	}
	if err := ctx.Err(); err != nil {
		return provider.Machine{}, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.machines[spec.MachineID]; ok {
		return provider.Machine{}, fmt.Errorf("sim provider: machine %s exists", spec.MachineID)
	}
	r := Record{MachineID: spec.MachineID, Fleet: spec.Fleet, Token: spec.Token, CreatedAt: time.Now().UTC().Round(0)}
	if err := s.write(r); err != nil {
		return provider.Machine{}, fmt.Errorf("sim provider: create %s: %w", spec.MachineID, err)
	}
	s.apply(r)
	return s.machine(r), nil
}

// Delete forgets the machine; an unknown one is not an error.
func (s *Sim) Delete(ctx context.Context, providerID string) error {
	if s.err != nil {
		return s.err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.machines[providerID]; !ok {
		return nil
	}
	if err := s.write(Record{MachineID: providerID, Deleted: true}); err != nil {
		return fmt.Errorf("sim provider: delete %s: %w", providerID, err)
	}
	delete(s.machines, providerID)
	return nil
}

// List returns the live machines of fleet ("" for all), oldest first.
func (s *Sim) List(ctx context.Context, fleet string) ([]provider.Machine, error) {
	if s.err != nil {
		return nil, s.err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []provider.Machine
	for _, r := range s.machines {
		if fleet == "" || r.Fleet == fleet {
			out = append(out, s.machine(r))
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if !out[i].CreatedAt.Equal(out[j].CreatedAt) {
			return out[i].CreatedAt.Before(out[j].CreatedAt)
		}
		return out[i].MachineID < out[j].MachineID
	})
	return out, nil
}
