package docker

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/moby/moby/client"

	"dedi.dev/dedi/api"
	"dedi.dev/dedi/internal/image"
	"dedi.dev/dedi/internal/names"
	"dedi.dev/dedi/internal/provider"
	"dedi.dev/dedi/internal/provider/providertest"
)

// These tests use the loopback addresses 127.0.2.1-127.0.2.43 and the
// ports 20000-24299 (see testConfig), clear of the local provider's tests
// and of test/e2e.

var (
	skipReason string // why no test can run: no Docker engine
	imageRef   string // the echo example's image, built in TestMain
	runID      string // makes instances and image names unique to this run
)

func TestMain(m *testing.M) {
	os.Exit(setup(m))
}

func setup(m *testing.M) int {
	runID = randHex(4)
	cli, err := image.NewDockerClient()
	if err == nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err = cli.Ping(ctx, client.PingOptions{NegotiateAPIVersion: true})
		cancel()
	}
	if err != nil {
		skipReason = fmt.Sprintf("no Docker engine can run here: %v", err)
		return m.Run()
	}
	defer cli.Close()
	dir, err := os.MkdirTemp("", "dedi-docker-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	dedi, game := filepath.Join(dir, "dedi"), filepath.Join(dir, "game")
	for _, b := range []struct{ out, pkg string }{{dedi, "dedi.dev/dedi/cmd/dedi"}, {filepath.Join(game, "echo"), "dedi.dev/dedi/examples/echo"}} {
		if err := providertest.GoBuild(b.out, b.pkg); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
	}
	name := "provider-test-" + runID
	imageRef, err = image.Build(context.Background(), image.Options{Format: "docker", Name: name, BuildDir: game,
		Command: []string{"echo"}, DediBinary: dedi, DediVersion: "test"})
	if err != nil {
		fmt.Fprintln(os.Stderr, "build image:", err)
		return 1
	}
	code := m.Run()
	// Whatever a failed test left: its containers, then the image.
	ctx := context.Background()
	if res, err := cli.ContainerList(ctx, client.ContainerListOptions{All: true,
		Filters: make(client.Filters).Add("label", LabelInstance)}); err == nil {
		for _, c := range res.Items {
			if strings.HasSuffix(c.Labels[LabelInstance], "-"+runID) {
				fmt.Fprintf(os.Stderr, "removing container %.12s left by a test\n", c.ID)
				_, _ = cli.ContainerRemove(ctx, c.ID, client.ContainerRemoveOptions{Force: true})
			}
		}
	}
	for _, ref := range []string{imageRef, image.DockerRepo(name) + ":latest"} {
		_, _ = cli.ImageRemove(ctx, ref, client.ImageRemoveOptions{Force: true, PruneChildren: true})
	}
	return code
}

func randHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}

func needDocker(t *testing.T) {
	t.Helper()
	if skipReason != "" {
		t.Skip(skipReason)
	}
}

// testConfig is a config of instance name (unique to this run) on slots
// [first, first+n) of the test block 127.0.2.1-41, ports 20000 + 100*slot.
func testConfig(t *testing.T, name string, first, n int) Config {
	return Config{Instance: name + "-" + runID, FirstAddress: netip.AddrFrom4([4]byte{127, 0, 2, byte(1 + first)}),
		Machines: n, PortBase: 20000 + 100*first, PortsPerMachine: 100, Logger: providertest.Logger(t)}
}

func newDocker(t *testing.T, cfg Config) *Docker {
	t.Helper()
	d, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

// checkNoneLeft fails the test if the instance still has a container when
// the test ends, and removes it.
func checkNoneLeft(t *testing.T, cfg Config) {
	providertest.CheckNoneLeft(t, func() (provider.Provider, error) { return New(cfg) })
}

// newVMM starts a stand-in VMM whose machines are of the echo image, with
// no command: the image's default command runs. The containers share the
// host's network: they reach it on 127.0.0.1.
func newVMM(t *testing.T) *providertest.VMM {
	return providertest.NewVMM(t, provider.Spec{Image: imageRef, MaxProcesses: 2, ReportInterval: 200 * time.Millisecond})
}

func TestProviderContract(t *testing.T) {
	needDocker(t)
	t.Parallel()
	cfg := testConfig(t, "contract", 0, 20)
	checkNoneLeft(t, cfg)
	vmm := newVMM(t)
	providertest.Run(t, func(t *testing.T) provider.Provider { return newDocker(t, cfg) }, vmm.Spec)
}

// TestMachineRunsOnlyTheImage: a machine runs the image's default command
// as an unprivileged user, answers UDP through its own address, refuses an
// executable the manifest does not name, keeps its token off every command
// line, reports to the VMM; Delete leaves neither container nor game.
func TestMachineRunsOnlyTheImage(t *testing.T) {
	needDocker(t)
	t.Parallel()
	cfg := testConfig(t, "image", 20, 5)
	checkNoneLeft(t, cfg)
	vmm := newVMM(t)
	d := newDocker(t, cfg)
	sp := vmm.Spec(t, "m-image", "f")
	m, err := d.Create(t.Context(), sp)
	if err != nil {
		t.Fatal(err)
	}
	if m.Address != "127.0.2.21" || m.LSPMURL != "http://127.0.2.21:7701" {
		t.Errorf("machine on %s, LSPM %s; want slot 0 of the config: 127.0.2.21", m.Address, m.LSPMURL)
	}
	game := providertest.SpawnReady(t, m, sp.Token, `{}`)
	if game.Address != m.Address || game.Ports["game"] < 22000 || game.Ports["game"] > 22099 {
		t.Errorf("game on %s:%v, want %s and a port of 22000-22099", game.Address, game.Ports, m.Address)
	}
	if got := providertest.UDPEcho(t, game.Address, game.Ports["game"], "ping", 5*time.Second); got != "ping" {
		t.Errorf("echo answered %q", got)
	}
	providertest.WaitFor(t, "a status report at the VMM", func() bool { return vmm.Reports(sp.MachineID) > 0 })

	// Only the manifest's executables: dedi itself is in the image but
	// not allowed.
	code, body := providertest.Do(t, http.MethodPost, m.LSPMURL+"/v1/processes", sp.Token, `{"command":["/dedi/dedi","example","echo"]}`, nil)
	if code != http.StatusForbidden || !strings.Contains(string(body), api.CodeExecutableNotAllowed) {
		t.Errorf("spawn of an executable outside the manifest: %d %s", code, body)
	}

	// The LSPM is the container's PID 1, unprivileged, token not in argv.
	insp, err := d.cli.ContainerInspect(t.Context(), m.ProviderID, client.ContainerInspectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(strings.Join(insp.Container.Args, " "), sp.Token) {
		t.Error("the machine token is on the container's command line")
	}
	lspmPID := insp.Container.State.Pid
	for what, pid := range map[string]int{"LSPM": lspmPID, "game": hostPID(t, game.ID)} {
		cmdline, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if bytes.Contains(cmdline, []byte(sp.Token)) {
			t.Errorf("the machine token is on the %s's command line", what)
		}
		if uid := procUID(t, pid); uid != "10001" {
			t.Errorf("%s runs as uid %s, want 10001", what, uid)
		}
	}
	gamePID := hostPID(t, game.ID)

	if err := d.Delete(t.Context(), m.ProviderID); err != nil {
		t.Fatal(err)
	}
	for what, pid := range map[string]int{"LSPM": lspmPID, "game": gamePID} {
		if _, err := os.Stat("/proc/" + strconv.Itoa(pid)); err == nil {
			t.Errorf("%s (host pid %d) still runs after Delete", what, pid)
		}
	}
	if _, err := d.cli.ContainerInspect(t.Context(), m.ProviderID, client.ContainerInspectOptions{}); err == nil {
		t.Error("container still there after Delete")
	}
}

// TestDeleteAfterLSPMDied: a machine whose container stopped (its LSPM
// killed) is still listed, as a VMM needs to find it, and Delete removes it.
func TestDeleteAfterLSPMDied(t *testing.T) {
	needDocker(t)
	t.Parallel()
	cfg := testConfig(t, "died", 25, 5)
	checkNoneLeft(t, cfg)
	vmm := newVMM(t)
	d := newDocker(t, cfg)
	m, err := d.Create(t.Context(), vmm.Spec(t, "m-died", "f"))
	if err != nil {
		t.Fatal(err)
	}
	providertest.WaitHealthy(t, m)
	if _, err := d.cli.ContainerKill(t.Context(), m.ProviderID, client.ContainerKillOptions{Signal: "SIGKILL"}); err != nil {
		t.Fatal(err)
	}
	providertest.WaitFor(t, "the container to stop", func() bool {
		insp, err := d.cli.ContainerInspect(t.Context(), m.ProviderID, client.ContainerInspectOptions{})
		return err == nil && !insp.Container.State.Running
	})
	ms, err := d.List(t.Context(), "f")
	if err != nil || len(ms) != 1 || ms[0].ProviderID != m.ProviderID {
		t.Fatalf("List after the LSPM died = %+v, %v; want the machine", ms, err)
	}
	if err := d.Delete(t.Context(), m.ProviderID); err != nil {
		t.Fatal(err)
	}
	if ms, _ := d.List(t.Context(), ""); len(ms) != 0 {
		t.Errorf("List after Delete = %+v", ms)
	}
}

// TestInstancesApart: another instance on the same engine and addresses
// neither lists nor deletes this one's machines, and takes another slot.
func TestInstancesApart(t *testing.T) {
	needDocker(t)
	t.Parallel()
	cfgA, cfgB := testConfig(t, "apart-a", 30, 5), testConfig(t, "apart-b", 30, 5)
	checkNoneLeft(t, cfgA)
	checkNoneLeft(t, cfgB)
	vmm := newVMM(t)
	a, b := newDocker(t, cfgA), newDocker(t, cfgB)
	ma, err := a.Create(t.Context(), vmm.Spec(t, "m-a", "f"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = a.Delete(context.Background(), ma.ProviderID) })
	mb, err := b.Create(t.Context(), vmm.Spec(t, "m-b", "f"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Delete(context.Background(), mb.ProviderID) })
	if ma.Address == mb.Address {
		t.Errorf("both instances put a machine on %s", ma.Address)
	}
	if ms, _ := b.List(t.Context(), ""); len(ms) != 1 || ms[0].ProviderID != mb.ProviderID {
		t.Errorf("instance b lists %+v, want only its own machine", ms)
	}
	if err := b.Delete(t.Context(), ma.ProviderID); err != nil {
		t.Errorf("b.Delete of a's machine: %v, want nil", err)
	}
	if ms, _ := a.List(t.Context(), ""); len(ms) != 1 {
		t.Errorf("a's machine gone after b deleted it: %+v", ms)
	}
	providertest.WaitHealthy(t, ma)
}

func TestCreateErrors(t *testing.T) {
	needDocker(t)
	t.Parallel()
	cfg := testConfig(t, "errors", 40, 1)
	checkNoneLeft(t, cfg)
	vmm := newVMM(t)
	d := newDocker(t, cfg)
	plain := plainImage(t, d.cli)
	for name, c := range map[string]struct {
		spec provider.Spec
		want string
	}{
		"bad id":        {vmm.Spec(t, "../x", "f"), "invalid machine id"},
		"no token":      {provider.Spec{MachineID: "m-x", Fleet: "f", Image: imageRef}, "no token"},
		"no image":      {provider.Spec{MachineID: "m-x", Fleet: "f", Token: "t"}, "no image"},
		"unknown image": {provider.Spec{MachineID: "m-x", Fleet: "f", Token: "t", Image: "dedi-no-such-image-" + runID + ":1"}, "never pulls"},
		"not dedi's":    {provider.Spec{MachineID: "m-x", Fleet: "f", Token: "t", Image: plain}, "not a dedi image"},
		// dedi is in the image but not of its build: a fleet must not run it as its game.
		"command outside the build": {func() provider.Spec {
			s := vmm.Spec(t, "m-x", "f")
			s.Command = []string{image.DockerDedi, "example", "echo"}
			return s
		}(), "not an executable of image"},
	} {
		_, err := d.Create(t.Context(), c.spec)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: Create: %v, want an error saying %q", name, err, c.want)
		}
	}
	m, err := d.Create(t.Context(), vmm.Spec(t, "m-one", "f"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = d.Delete(context.Background(), m.ProviderID) })
	if _, err := d.Create(t.Context(), vmm.Spec(t, "m-one", "f")); err == nil || !strings.Contains(err.Error(), "exists") {
		t.Errorf("Create of an existing machine id: %v", err)
	}
	if _, err := d.Create(t.Context(), vmm.Spec(t, "m-two", "f")); !errors.Is(err, provider.ErrNoCapacity) {
		t.Errorf("Create past the last slot: %v, want ErrNoCapacity", err)
	}
	// Delete of what is not a container of this instance leaves it alone.
	for _, id := range []string{"", "m-one", strings.Repeat("0", 64)} {
		if err := d.Delete(t.Context(), id); err != nil {
			t.Errorf("Delete(%q): %v", id, err)
		}
	}
}

// TestCreateRaceForOneSlot: two providers (two VMMs on one engine) that
// race for the same single slot: one gets it, the other has no capacity,
// and no container is left of the loser.
func TestCreateRaceForOneSlot(t *testing.T) {
	needDocker(t)
	t.Parallel()
	cfgA, cfgB := testConfig(t, "race-a", 42, 1), testConfig(t, "race-b", 42, 1)
	checkNoneLeft(t, cfgA)
	checkNoneLeft(t, cfgB)
	vmm := newVMM(t)
	ds := []*Docker{newDocker(t, cfgA), newDocker(t, cfgB)}
	specs := []provider.Spec{vmm.Spec(t, "m-race-a", "f"), vmm.Spec(t, "m-race-b", "f")}
	ms, errs := make([]provider.Machine, 2), make([]error, 2)
	var wg sync.WaitGroup
	for i := range ds {
		wg.Go(func() { ms[i], errs[i] = ds[i].Create(t.Context(), specs[i]) })
	}
	wg.Wait()
	won := -1
	for i, err := range errs {
		switch {
		case err == nil:
			t.Cleanup(func() { _ = ds[i].Delete(context.Background(), ms[i].ProviderID) })
			if won >= 0 {
				t.Fatalf("both providers created a machine on %s and %s", ms[0].Address, ms[1].Address)
			}
			won = i
		case !errors.Is(err, provider.ErrNoCapacity):
			t.Errorf("provider %d: Create = %v, want success or ErrNoCapacity", i, err)
		}
	}
	if won < 0 {
		t.Fatalf("neither provider got the slot: %v", errs)
	}
	if lost, _ := ds[1-won].List(t.Context(), ""); len(lost) != 0 {
		t.Errorf("the provider that lost the race lists %+v", lost)
	}
	providertest.WaitHealthy(t, ms[won])
}

// TestCreateHonoursContext: a Create waiting for another's slot choice
// gives up when its context ends.
func TestCreateHonoursContext(t *testing.T) {
	needDocker(t)
	t.Parallel()
	cfg := testConfig(t, "ctx", 41, 1)
	checkNoneLeft(t, cfg)
	vmm := newVMM(t)
	d := newDocker(t, cfg)
	d.slots <- struct{}{} // another Create is choosing a slot, and the engine is slow
	ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, err := d.Create(ctx, vmm.Spec(t, "m-ctx", "f"))
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Create = %v, want the context's deadline", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Create did not return when its context ended")
	}
	<-d.slots
}

// TestMachineOfLabels: labels a VMM did not write are not believed.
func TestMachineOfLabels(t *testing.T) {
	good := map[string]string{LabelMachine: "m-1", LabelFleet: "f", LabelAddress: "127.0.1.5",
		LabelLSPMURL: "http://127.0.1.5:7701", LabelCreated: "2025-01-02T03:04:05.5Z"}
	m, err := machineOf("id", good)
	if err != nil || m.MachineID != "m-1" || m.Address != "127.0.1.5" || m.LSPMURL != "http://127.0.1.5:7701" || m.Fleet != "f" || m.ProviderID != "id" {
		t.Fatalf("machineOf(good) = %+v, %v", m, err)
	}
	for name, c := range map[string][2]string{
		"no created":          {LabelCreated, ""},
		"no machine":          {LabelMachine, ""},
		"machine id path":     {LabelMachine, "../m"},
		"address elsewhere":   {LabelAddress, "10.0.0.1"},
		"address a name":      {LabelAddress, "localhost"},
		"address ipv6":        {LabelAddress, "::1"},
		"lspm elsewhere":      {LabelLSPMURL, "http://evil.example:7701"},
		"lspm other address":  {LabelLSPMURL, "http://127.0.1.6:7701"},
		"lspm with a path":    {LabelLSPMURL, "http://127.0.1.5:7701/x"},
		"lspm with userinfo":  {LabelLSPMURL, "http://u@127.0.1.5:7701"},
		"lspm https":          {LabelLSPMURL, "https://127.0.1.5:7701"},
		"lspm no port":        {LabelLSPMURL, "http://127.0.1.5"},
		"lspm port 0":         {LabelLSPMURL, "http://127.0.1.5:0"},
		"lspm leading zeroes": {LabelLSPMURL, "http://127.0.1.5:07701"},
	} {
		bad := map[string]string{}
		for k, v := range good {
			bad[k] = v
		}
		bad[c[0]] = c[1]
		if m, err := machineOf("id", bad); err == nil {
			t.Errorf("%s: machineOf accepted %v as %+v", name, bad, m)
		}
	}
}

// FuzzMachineOf: whatever a container's labels say, machineOf refuses
// them or returns a machine on an IPv4 loopback address whose LSPM is on
// that address.
func FuzzMachineOf(f *testing.F) {
	f.Add("m-1", "127.0.1.5", "http://127.0.1.5:7701", "2025-01-02T03:04:05Z")
	f.Add("m-1", "127.0.1.5", "http://127.0.1.5:7701@evil:80", "2025-01-02T03:04:05Z")
	f.Add("m", "127.000.1.5", "http://[::ffff:127.0.1.5]:1", "2025-01-02T03:04:05Z")
	f.Fuzz(func(t *testing.T, machine, address, lspm, created string) {
		m, err := machineOf("id", map[string]string{LabelMachine: machine, LabelAddress: address, LabelLSPMURL: lspm, LabelCreated: created})
		if err != nil {
			return
		}
		a, err := netip.ParseAddr(m.Address)
		if err != nil || !a.Is4() || !a.IsLoopback() || !names.ID(m.MachineID) {
			t.Fatalf("accepted machine %q on %q", m.MachineID, m.Address)
		}
		u, err := url.Parse(m.LSPMURL)
		if err != nil || u.Scheme != "http" || u.Hostname() != m.Address || u.User != nil || u.Path != "" || u.RawQuery != "" || u.Port() == "" {
			t.Fatalf("accepted LSPM URL %q for address %q", m.LSPMURL, m.Address)
		}
	})
}

// plainImage builds an image that is not dedi's (no manifest label).
func plainImage(t *testing.T, cli *client.Client) string {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	df := "FROM scratch\nCOPY x /x\n"
	for name, body := range map[string]string{"Dockerfile": df, "x": "x"} {
		tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(body))})
		tw.Write([]byte(body))
	}
	tw.Close()
	ref := "dedi-test-plain-" + runID + ":1"
	res, err := cli.ImageBuild(t.Context(), &buf, client.ImageBuildOptions{Tags: []string{ref}, Remove: true, Version: "1"})
	if err != nil {
		t.Fatal(err)
	}
	out, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if bytes.Contains(out, []byte(`"errorDetail"`)) {
		t.Fatalf("build plain image: %s", out)
	}
	t.Cleanup(func() {
		_, _ = cli.ImageRemove(context.Background(), ref, client.ImageRemoveOptions{Force: true, PruneChildren: true})
	})
	return ref
}

func TestConfig(t *testing.T) {
	c := Config{Instance: "x"}.withDefaults()
	if err := c.Validate(); err != nil {
		t.Fatalf("defaults: %v", err)
	}
	for i, want := range map[int]struct {
		addr   string
		lo, hi int
	}{0: {"127.0.1.1", 10000, 10099}, 1: {"127.0.1.2", 10100, 10199}, 99: {"127.0.1.100", 19900, 19999}, 300: {"127.0.2.45", 40000, 40099}} {
		if a := c.address(i).String(); a != want.addr {
			t.Errorf("address(%d) = %s, want %s", i, a, want.addr)
		}
		if lo, hi := c.ports(i); lo != want.lo || hi != want.hi {
			t.Errorf("ports(%d) = %d-%d, want %d-%d", i, lo, hi, want.lo, want.hi)
		}
	}
	for name, bad := range map[string]Config{
		"no instance":    {},
		"bad instance":   {Instance: "a b"},
		"not loopback":   {Instance: "x", FirstAddress: netip.MustParseAddr("10.0.0.1")},
		"ipv6":           {Instance: "x", FirstAddress: netip.MustParseAddr("::1")},
		"past loopback":  {Instance: "x", FirstAddress: netip.MustParseAddr("127.255.255.250"), Machines: 10, PortsPerMachine: 1},
		"ports past 64K": {Instance: "x", PortBase: 60000},
		"lspm in range":  {Instance: "x", LSPMPort: 10050},
		"machines":       {Instance: "x", Machines: -1},
	} {
		if err := bad.withDefaults().Validate(); err == nil {
			t.Errorf("%s: Validate accepted %+v", name, bad)
		}
	}
}

// hostPID finds a game server's pid on the host by the process id in its
// environment (the pid the LSPM reports is the container's).
func hostPID(t *testing.T, processID string) int {
	t.Helper()
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		env, _ := os.ReadFile("/proc/" + e.Name() + "/environ")
		if bytes.Contains(env, []byte(api.EnvProcessID+"="+processID+"\x00")) {
			return pid
		}
	}
	t.Fatalf("no process on the host has %s=%s", api.EnvProcessID, processID)
	return 0
}

func procUID(t *testing.T, pid int) string {
	t.Helper()
	raw, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(raw), "\n") {
		if rest, ok := strings.CutPrefix(line, "Uid:"); ok {
			return strings.Fields(rest)[0]
		}
	}
	t.Fatalf("no Uid in /proc/%d/status", pid)
	return ""
}
