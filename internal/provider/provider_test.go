package provider

import (
	"slices"
	"testing"
	"time"
)

func TestLSPMFlagsArgs(t *testing.T) {
	allow := make([]string, 1, 4) // room to grow: Args must not write into it
	allow[0] = "/opt/game/echo=" + "ab"
	f := LSPMFlags{Listen: "127.0.0.3:7701", Address: "127.0.0.3", DataDir: "/d/lspm", MachineID: "m-1",
		PortMin: 100, PortMax: 109, Allow: allow, Extra: []string{"--shim-pool-idle", "2s"},
		Command: []string{"/opt/game/echo", "-v"},
		Spec: Spec{VMMURL: "http://127.0.0.1:7700", MaxProcesses: 8, ReportInterval: 5 * time.Second,
			Allow: []string{"/bin/sh"}, Token: "secret"}}
	want := []string{"lspm", "--listen", "127.0.0.3:7701", "--address", "127.0.0.3", "--data-dir", "/d/lspm",
		"--machine-id", "m-1", "--port-range", "100-109", "--drain", "--vmm-url", "http://127.0.0.1:7700",
		"--max-processes", "8", "--report-interval", "5s", "--allow", "/opt/game/echo=ab", "--allow", "/bin/sh",
		"--shim-pool-idle", "2s", "--", "/opt/game/echo", "-v"}
	if got := f.Args(); !slices.Equal(got, want) {
		t.Errorf("args\n got %q\nwant %q", got, want)
	}
	if got := allow[:cap(allow)][1]; got != "" {
		t.Errorf("Args wrote %q into the caller's Allow", got)
	}
	for _, a := range f.Args() {
		if a == "secret" {
			t.Error("the machine token is on the command line")
		}
	}

	// The least: no address, no VMM, no command, no "--".
	bare := LSPMFlags{Listen: "0.0.0.0:7701", DataDir: "/d", MachineID: "m", PortMin: 1, PortMax: 2}
	want = []string{"lspm", "--listen", "0.0.0.0:7701", "--data-dir", "/d", "--machine-id", "m", "--port-range", "1-2", "--drain"}
	if got := bare.Args(); !slices.Equal(got, want) {
		t.Errorf("bare args\n got %q\nwant %q", got, want)
	}
}

func TestHosts(t *testing.T) {
	h := Hosts{}.WithDefaults()
	if h != (Hosts{FirstHost: 10, LastHost: 250, LSPMPort: 7701, PortBase: 30000, PortsPerMachine: 100}) {
		t.Fatalf("defaults %+v", h)
	}
	if err := h.Validate(1); err != nil {
		t.Fatal(err)
	}
	if lo, hi := h.Ports(11); lo != 30100 || hi != 30199 {
		t.Fatalf("ports of 127.0.0.11: %d-%d", lo, hi)
	}
	for name, bad := range map[string]Hosts{
		"below min":    {FirstHost: 1, LastHost: 5},
		"past 254":     {FirstHost: 10, LastHost: 255},
		"reversed":     {FirstHost: 20, LastHost: 10},
		"past 65535":   {FirstHost: 10, LastHost: 250, PortBase: 60000},
		"lspm in them": {FirstHost: 10, LastHost: 250, LSPMPort: 30050},
	} {
		if err := bad.WithDefaults().Validate(2); err == nil {
			t.Errorf("%s: %+v accepted", name, bad)
		}
	}
}
