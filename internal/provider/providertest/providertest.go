// Package providertest is the contract suite that every provider.Provider
// runs: it creates, lists and deletes real machines and checks, through
// each machine's LSPM, that they boot, are told apart and go away. A
// backend's own test calls Run with a constructor and a Spec factory, as
// litestream's backends share replica_client_test.go.
//
// It also holds what the backends' own tests share: a stand-in VMM that
// hands out Specs and takes the LSPMs' status reports (VMM); requests to
// an LSPM (Send, Do, SpawnReady); waits (WaitFor, WaitHealthy); a UDP echo
// check; and the chores of a test (GoBuild, Logger, CheckNoneLeft).
package providertest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"testing"
	"time"

	"dedi.dev/dedi/internal/provider"
)

// BootTimeout bounds how long an LSPM may take to answer after Create, and
// to stop answering after Delete, and how long WaitFor waits.
// A backend that boots slowly (a VM under software emulation, on a loaded
// CI machine) raises it in its TestMain, before any test runs.
var BootTimeout = 15 * time.Second

// Run runs the contract suite against a provider.
//
// newProvider returns a provider over the state of test t. It may be
// called more than once with the same t (a VMM restart): every provider
// it returns for one t must see the same machines. It registers the
// provider's cleanup with t itself.
//
// spec returns a Spec for a machine with the given id and fleet: a token,
// a VMM URL, a command the LSPM can run. The suite makes ids and fleet
// names unique per run, so providers may share state across subtests.
func Run(t *testing.T, newProvider func(t *testing.T) provider.Provider, spec func(t *testing.T, machineID, fleet string) provider.Spec) {
	s := suite{newProvider: newProvider, spec: spec}
	t.Run("Create", s.testCreate)
	t.Run("List", s.testList)
	t.Run("TwoMachines", s.testTwoMachines)
	t.Run("Delete", s.testDelete)
	t.Run("DeleteUnknown", s.testDeleteUnknown)
	t.Run("Reopen", s.testReopen)
}

type suite struct {
	newProvider func(t *testing.T) provider.Provider
	spec        func(t *testing.T, machineID, fleet string) provider.Spec
}

// testCreate: Create returns a complete Machine whose LSPM boots and
// knows its identity.
func (s suite) testCreate(t *testing.T) {
	p := s.newProvider(t)
	if p.Name() == "" {
		t.Error("Name() is empty")
	}
	fleet := uniqueName(t, "f")
	sp, m := s.create(t, p, fleet)
	if m.ProviderID == "" || m.Address == "" || m.LSPMURL == "" || m.CreatedAt.IsZero() {
		t.Errorf("Create returned an incomplete machine: %+v", m)
	}
	if m.MachineID != sp.MachineID || m.Fleet != fleet {
		t.Errorf("Create returned machine %q of fleet %q, want %q of %q", m.MachineID, m.Fleet, sp.MachineID, fleet)
	}
	WaitHealthy(t, m)
	if got := machineIDOf(t, m, sp.Token); got != sp.MachineID {
		t.Errorf("LSPM status machineId = %q, want %q", got, sp.MachineID)
	}
}

// testList: List filters by fleet and returns what Create returned.
func (s suite) testList(t *testing.T) {
	p := s.newProvider(t)
	fleet := uniqueName(t, "f")
	_, m := s.create(t, p, fleet)
	if got, ok := find(t, p, fleet, m.ProviderID); !ok {
		t.Errorf("List(%q) does not include %s", fleet, m.ProviderID)
	} else if got.MachineID != m.MachineID || got.Fleet != m.Fleet || got.Address != m.Address || got.LSPMURL != m.LSPMURL {
		t.Errorf("List returned %+v, Create returned %+v", got, m)
	}
	if _, ok := find(t, p, "", m.ProviderID); !ok {
		t.Errorf(`List("") does not include %s`, m.ProviderID)
	}
	other := uniqueName(t, "f")
	if _, ok := find(t, p, other, m.ProviderID); ok {
		t.Errorf("List(%q) includes %s of fleet %q", other, m.ProviderID, fleet)
	}
	for _, got := range list(t, p, fleet) {
		if got.Fleet != fleet {
			t.Errorf("List(%q) includes %s of fleet %q", fleet, got.ProviderID, got.Fleet)
		}
	}
}

// testTwoMachines: two machines of one fleet are told apart and both boot.
func (s suite) testTwoMachines(t *testing.T) {
	p := s.newProvider(t)
	fleet := uniqueName(t, "f")
	sa, a := s.create(t, p, fleet)
	sb, b := s.create(t, p, fleet)
	if a.ProviderID == b.ProviderID {
		t.Errorf("both machines have ProviderID %q", a.ProviderID)
	}
	if a.Address == b.Address && a.LSPMURL == b.LSPMURL {
		t.Errorf("both machines have address %q and LSPM URL %q", a.Address, a.LSPMURL)
	}
	WaitHealthy(t, a)
	WaitHealthy(t, b)
	if got := machineIDOf(t, a, sa.Token); got != sa.MachineID {
		t.Errorf("first LSPM says machineId %q, want %q", got, sa.MachineID)
	}
	if got := machineIDOf(t, b, sb.Token); got != sb.MachineID {
		t.Errorf("second LSPM says machineId %q, want %q", got, sb.MachineID)
	}
	if n := len(list(t, p, fleet)); n != 2 {
		t.Errorf("List(%q) has %d machines, want 2", fleet, n)
	}
}

// testDelete: Delete removes the machine and stops its LSPM; a second
// Delete is not an error.
func (s suite) testDelete(t *testing.T) {
	p := s.newProvider(t)
	fleet := uniqueName(t, "f")
	_, m := s.create(t, p, fleet)
	WaitHealthy(t, m)
	if err := p.Delete(ctx(t), m.ProviderID); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	if _, ok := find(t, p, fleet, m.ProviderID); ok {
		t.Errorf("List(%q) still includes %s after Delete", fleet, m.ProviderID)
	}
	if _, ok := find(t, p, "", m.ProviderID); ok {
		t.Errorf(`List("") still includes %s after Delete`, m.ProviderID)
	}
	waitGone(t, m)
	if err := p.Delete(ctx(t), m.ProviderID); err != nil {
		t.Errorf("second Delete: %v, want nil", err)
	}
}

// testDeleteUnknown: deleting what never existed is not an error.
func (s suite) testDeleteUnknown(t *testing.T) {
	p := s.newProvider(t)
	if err := p.Delete(ctx(t), uniqueName(t, "no-such-machine")); err != nil {
		t.Errorf("Delete of an unknown machine: %v, want nil", err)
	}
}

// testReopen: a provider re-created on the same state (a VMM restart)
// finds the machines of the earlier one, does not reuse their addresses,
// and can delete them.
func (s suite) testReopen(t *testing.T) {
	first := s.newProvider(t)
	fleet := uniqueName(t, "f")
	_, m := s.create(t, first, fleet)
	WaitHealthy(t, m)

	second := s.newProvider(t)
	got, ok := find(t, second, fleet, m.ProviderID)
	if !ok {
		t.Fatalf("a re-created provider does not list %s, created by the earlier one", m.ProviderID)
	}
	if got.MachineID != m.MachineID || got.Address != m.Address || got.LSPMURL != m.LSPMURL {
		t.Errorf("re-created provider lists %+v, want %+v", got, m)
	}
	sn, n := s.create(t, second, fleet)
	if n.Address == m.Address && n.LSPMURL == m.LSPMURL {
		t.Errorf("the re-created provider reused address %q and LSPM URL %q", m.Address, m.LSPMURL)
	}
	WaitHealthy(t, n)
	if id := machineIDOf(t, n, sn.Token); id != sn.MachineID {
		t.Errorf("new LSPM says machineId %q, want %q", id, sn.MachineID)
	}
	if err := second.Delete(ctx(t), m.ProviderID); err != nil {
		t.Fatalf("Delete through the re-created provider: %v", err)
	}
	if _, ok := find(t, first, fleet, m.ProviderID); ok {
		t.Errorf("the earlier provider still lists %s deleted by the re-created one", m.ProviderID)
	}
	waitGone(t, m)
}

// create makes a machine and deletes it when the test ends.
func (s suite) create(t *testing.T, p provider.Provider, fleet string) (provider.Spec, provider.Machine) {
	t.Helper()
	sp := s.spec(t, uniqueName(t, "m"), fleet)
	m, err := p.Create(ctx(t), sp)
	if err != nil {
		t.Fatalf("Create %s: %v", sp.MachineID, err)
	}
	t.Cleanup(func() {
		c, cancel := context.WithTimeout(context.Background(), 2*BootTimeout)
		defer cancel()
		if err := p.Delete(c, m.ProviderID); err != nil {
			t.Errorf("cleanup: Delete %s: %v", m.ProviderID, err)
		}
	})
	return sp, m
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(t.Context(), 2*BootTimeout)
	t.Cleanup(cancel)
	return c
}

func list(t *testing.T, p provider.Provider, fleet string) []provider.Machine {
	t.Helper()
	ms, err := p.List(ctx(t), fleet)
	if err != nil {
		t.Fatalf("List(%q): %v", fleet, err)
	}
	return ms
}

func find(t *testing.T, p provider.Provider, fleet, providerID string) (provider.Machine, bool) {
	t.Helper()
	for _, m := range list(t, p, fleet) {
		if m.ProviderID == providerID {
			return m, true
		}
	}
	return provider.Machine{}, false
}

// uniqueName returns prefix-<random hex>, unique across runs that share
// a provider's state.
func uniqueName(t *testing.T, prefix string) string {
	t.Helper()
	b := make([]byte, 6)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return prefix + "-" + hex.EncodeToString(b)
}

// waitGone waits until the machine's LSPM stops answering GET /healthz.
func waitGone(t *testing.T, m provider.Machine) {
	t.Helper()
	deadline := time.Now().Add(BootTimeout)
	for {
		code, _, err := get(m, "/healthz", "")
		if err != nil || code != http.StatusOK {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("LSPM of deleted machine %s at %s still answers after %v", m.MachineID, m.LSPMURL, BootTimeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// machineIDOf asks the LSPM for its status with the machine token.
func machineIDOf(t *testing.T, m provider.Machine, token string) string {
	t.Helper()
	code, body, err := get(m, "/v1/status", token)
	if err != nil || code != http.StatusOK {
		t.Fatalf("GET %s/v1/status: %d %v %s", m.LSPMURL, code, err, body)
	}
	var st struct {
		MachineID string `json:"machineId"`
	}
	if err := json.Unmarshal(body, &st); err != nil {
		t.Fatalf("GET %s/v1/status: %v in %s", m.LSPMURL, err, body)
	}
	return st.MachineID
}
