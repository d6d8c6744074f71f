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
