package e2e

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"dedi.dev/dedi/api"
	"dedi.dev/dedi/test/fakegame"
)

// An Agones fleet through the VMM: a game written against Agones' REST SDK
// (the calls of Agones' REST page, test/fakegame's agones-rest-docs
// driver) runs unchanged, and what it does through that SDK (ready,
// labels, annotations, players, allocation, shutdown) reaches the VMM's
// record of the process through the machine's status reports.
func TestVMMAgonesFleet(t *testing.T) {
	t.Parallel()
	v := startVMM(t)
	control := filepath.Join(t.TempDir(), "control.json")
	// The LSPM gives a game only its own environment; env(1) adds what
	// makes this test binary the fake game.
	v.fleet(t, api.Fleet{Name: "agones", SDK: api.SDKAgones, Ports: []string{"game"},
		Command: []string{"/usr/bin/env", fakegame.Env + "=1", "GORACE=atexit_sleep_ms=0", fakegame.EnvControl + "=" + control,
			selfBin, "-driver", "agones-rest-docs"},
		Health:  api.Health{PeriodSeconds: 1, FailureThreshold: 5, StartTimeoutSeconds: 30},
		Scaling: api.Scaling{MaxMachines: 1, IdleShutdownSeconds: 3600}})
	p := v.start1(t, "agones", true)
	if p.State != api.StateReady && p.State != api.StateAllocated {
		t.Fatalf("after ?wait=ready: %+v", p)
	}
	eventually(t, 15*time.Second, "the SDK's label, annotation, player and allocation at the VMM", func() bool {
		p = v.process(t, p.ID)
		return p.State == api.StateAllocated && p.Labels["agones.dev/sdk-foo"] == "bar" &&
			p.Annotations["agones.dev/sdk-foo"] == "bar" && p.Players == 1
	})
	if p.SDK != api.SDKAgones || p.MachineID == "" {
		t.Fatalf("process %+v", p)
	}
	// Agones' Shutdown: the game announces its end and is stopped.
	if err := os.WriteFile(control, []byte(`{"shutdown": true}`), 0o644); err != nil {
		t.Fatal(err)
	}
	eventually(t, 15*time.Second, "the process's end at the VMM", func() bool {
		p = v.process(t, p.ID)
		return api.IsTerminal(p.State)
	})
	if p.State != api.StateExited || p.Exit == nil {
		t.Fatalf("after Agones' Shutdown: %s %+v", p.State, p.Exit)
	}
}
