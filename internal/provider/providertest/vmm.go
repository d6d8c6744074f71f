package providertest

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"sync"
	"testing"

	"dedi.dev/dedi/api"
	"dedi.dev/dedi/internal/provider"
)

// VMM is a stand-in VMM for a backend's tests: it hands out Specs, each
// with a token of its own, and answers the status reports of their
// LSPMs. It accepts a report only with the machine's token and id, and
// keeps what the accepted ones said.
//
// It listens on 127.0.0.1, which a machine on the host's network reaches
// as it is and a qemu guest as 10.0.2.2.
type VMM struct {
	*httptest.Server
	base provider.Spec

	mu      sync.Mutex
	tokens  map[string]string     // machine id -> token
	reports map[string]int        // machine id -> reports accepted
	last    map[string]api.Status // machine id -> the accepted report of highest Seq
	ended   map[string]string     // process id -> terminal state, from any report
}

// NewVMM starts a VMM, closed when t ends. The Specs it hands out are
// base (the image or command, limits) with a machine's identity.
func NewVMM(t *testing.T, base provider.Spec) *VMM {
	v := &VMM{base: base, tokens: map[string]string{}, reports: map[string]int{},
		last: map[string]api.Status{}, ended: map[string]string{}}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/machines/{id}/status", v.report)
	v.Server = httptest.NewServer(mux)
	t.Cleanup(v.Close)
	return v
}

func (v *VMM) report(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	var st api.Status
	if err := json.NewDecoder(r.Body).Decode(&st); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	v.mu.Lock()
	ok := v.tokens[id] != "" && r.Header.Get("Authorization") == "Bearer "+v.tokens[id] && st.MachineID == id
	if ok {
		v.reports[id]++
		if st.Seq > v.last[id].Seq {
			v.last[id] = st
		}
		for _, p := range st.Ended {
			v.ended[p.ID] = p.State
		}
	}
	v.mu.Unlock()
	if !ok {
		w.Header().Set("WWW-Authenticate", "Bearer")
		http.Error(w, "unauthorized", http.StatusUnauthorized)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	io.WriteString(w, `{"applied":true}`)
}

// Spec returns the base Spec for machine machineID of fleet, with a new
// token that the VMM accepts from that machine from now on, and the VMM's
// URL. Its signature is the one Run takes.
func (v *VMM) Spec(t *testing.T, machineID, fleet string) provider.Spec {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	token := hex.EncodeToString(b)
	v.mu.Lock()
	v.tokens[machineID] = token
	v.mu.Unlock()
	sp := v.base
	sp.Command, sp.Allow = slices.Clone(sp.Command), slices.Clone(sp.Allow)
	sp.MachineID, sp.Fleet, sp.Token, sp.VMMURL = machineID, fleet, token, v.URL
	return sp
}

// Reports returns how many reports of machine machineID were accepted.
func (v *VMM) Reports(machineID string) int {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.reports[machineID]
}

// Last returns the accepted report of machine machineID with the highest
// Seq (the zero Status before any).
func (v *VMM) Last(machineID string) api.Status {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.last[machineID]
}

// Ended returns the terminal state that any report gave for process
// processID, or "" when none said it ended.
func (v *VMM) Ended(processID string) string {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.ended[processID]
}
