// Package docker is the provider whose machines are Docker containers of
// an image built by "dedi image build --format docker", run through the
// Docker Engine API. Each container runs the image's dedi as its LSPM
// (PID 1, as an unprivileged user) on the host's network, on a loopback
// address of its own (FirstAddress + slot) with a game port range of its
// own, as the local provider's machines do.
//
// The provider keeps no state of its own: everything it knows about a
// machine is in its container's labels, so a VMM that restarts finds the
// containers of its earlier run (List) and deletes them (Delete):
//
//	dev.dedi.instance   Config.Instance: which provider (VMM) owns it
//	dev.dedi.machine    the machine id        dev.dedi.fleet    its fleet
//	dev.dedi.address    its loopback address  dev.dedi.ports    its game ports, MIN-MAX
//	dev.dedi.lspm-url   its LSPM's URL        dev.dedi.created  when it was created (RFC 3339)
//	dev.dedi.image      the image reference it was created from
//
// A container is named after its address ("dedi-127.0.1.5"): the engine
// refuses a second container of that name, which makes the choice of an
// address atomic across every provider that shares the engine.
package docker

import (
	"context"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"time"

	cerrdefs "github.com/containerd/errdefs"
	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/client"

	"dedi.dev/dedi/api"
	"dedi.dev/dedi/internal/image"
	"dedi.dev/dedi/internal/names"
	"dedi.dev/dedi/internal/provider"
)

var _ provider.Provider = (*Docker)(nil)

// Container labels.
const (
	LabelInstance = "dev.dedi.instance"
	LabelMachine  = "dev.dedi.machine"
	LabelFleet    = "dev.dedi.fleet"
	LabelAddress  = "dev.dedi.address"
	LabelPorts    = "dev.dedi.ports"
	LabelLSPMURL  = "dev.dedi.lspm-url"
	LabelCreated  = "dev.dedi.created"
	LabelImageRef = "dev.dedi.image"
)

// StopTimeout is how long Delete lets a machine's LSPM drain (stop its
// game servers, each with its own grace) before the engine kills the
// container.
const StopTimeout = 15 * time.Second

// Config configures a Docker provider. Zero fields take their defaults.
type Config struct {
	// Instance tells this provider's containers from those of other VMMs
	// (or tests) on the same engine; it must stay the same across restarts
	// of one VMM (required).
	Instance string
	// FirstAddress is the address of slot 0; slot i is FirstAddress+i
	// (default 127.0.1.1, clear of the local provider's 127.0.0.N).
	FirstAddress netip.Addr
	// Machines is the number of slots, the most machines at once
	// (default 100).
	Machines int
	// LSPMPort is the port every machine's LSPM listens on at its own
	// address (default 7701).
	LSPMPort int
	// PortBase and PortsPerMachine place the game port ranges: slot i gets
	// PortsPerMachine ports from PortBase+i*PortsPerMachine (defaults 10000
	// and 100, so 10000-19999 for 100 machines, clear of the local
	// provider's 30000 and up). Game servers bind 0.0.0.0 on the host's
	// network, so ranges never overlap.
	PortBase, PortsPerMachine int
	// Logger receives the provider's logs (default: discarded).
	Logger *slog.Logger
}

func (c Config) withDefaults() Config {
	if !c.FirstAddress.IsValid() {
		c.FirstAddress = netip.MustParseAddr("127.0.1.1")
	}
	if c.Machines == 0 {
		c.Machines = 100
	}
	if c.LSPMPort == 0 {
		c.LSPMPort = 7701
	}
	if c.PortBase == 0 {
		c.PortBase = 10000
	}
	if c.PortsPerMachine == 0 {
		c.PortsPerMachine = 100
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return c
}

// Validate reports a configuration the provider cannot run with.
func (c Config) Validate() error {
	loopback := netip.MustParsePrefix("127.0.0.0/8")
	switch {
	case !names.DockerInstance(c.Instance):
		return fmt.Errorf("docker provider: instance %q: want 1-64 letters, digits, '.', '_' or '-'", c.Instance)
	case !c.FirstAddress.Is4() || !loopback.Contains(c.FirstAddress):
		return fmt.Errorf("docker provider: first address %s is not an IPv4 loopback address", c.FirstAddress)
	case c.Machines < 1 || c.Machines > 65536:
		return fmt.Errorf("docker provider: %d machines: want 1 to 65536", c.Machines)
	case c.LSPMPort < 1 || c.LSPMPort > 65535:
		return fmt.Errorf("docker provider: LSPM port %d out of range", c.LSPMPort)
	case c.PortBase < 1 || c.PortsPerMachine < 1:
		return fmt.Errorf("docker provider: port base %d and ports per machine %d must be positive", c.PortBase, c.PortsPerMachine)
	}
	if last := c.address(c.Machines - 1); !loopback.Contains(last) || last == netip.MustParseAddr("127.255.255.255") {
		return fmt.Errorf("docker provider: %d machines from %s go past the loopback network", c.Machines, c.FirstAddress)
	}
	lo, _ := c.ports(0)
	_, hi := c.ports(c.Machines - 1)
	if hi > 65535 {
		return fmt.Errorf("docker provider: game ports %d-%d go past 65535", lo, hi)
	}
	if c.LSPMPort >= lo && c.LSPMPort <= hi {
		return fmt.Errorf("docker provider: LSPM port %d is inside the game ports %d-%d", c.LSPMPort, lo, hi)
	}
	return nil
}

// address is slot i's address.
func (c Config) address(i int) netip.Addr {
	b := c.FirstAddress.As4()
	n := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	n += uint32(i)
	return netip.AddrFrom4([4]byte{byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n)})
}

// ports is slot i's game port range.
func (c Config) ports(i int) (lo, hi int) {
	lo = c.PortBase + i*c.PortsPerMachine
	return lo, lo + c.PortsPerMachine - 1
}

// Docker creates machines as containers. Its methods are safe for
// concurrent use.
type Docker struct {
	cfg Config
	log *slog.Logger
	cli *client.Client

	// slots serializes the choice of a slot within this process: a
	// channel of one, so that a Create waiting for it gives up with its ctx.
	slots chan struct{}
}

// New returns a provider over the engine the environment names
// (DOCKER_HOST, default the local socket). It does not contact the
// engine: a VMM starts without one, and Create says what is wrong.
func New(cfg Config) (*Docker, error) {
	cfg = cfg.withDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cli, err := image.NewDockerClient()
	if err != nil {
		return nil, fmt.Errorf("docker provider: %w", err)
	}
	return &Docker{cfg: cfg, log: cfg.Logger.With("provider", "docker"), cli: cli, slots: make(chan struct{}, 1)}, nil
}

// Name is "docker".
func (d *Docker) Name() string { return "docker" }

// Close releases the engine client. The machines keep running.
func (d *Docker) Close() error { return d.cli.Close() }

// Create starts a container of spec.Image on a free slot and returns once
// it runs; its LSPM may still be starting.
func (d *Docker) Create(ctx context.Context, spec provider.Spec) (provider.Machine, error) {
	switch {
	case !names.ID(spec.MachineID):
		return provider.Machine{}, fmt.Errorf("docker provider: invalid machine id %q", spec.MachineID)
	case spec.Token == "":
		return provider.Machine{}, fmt.Errorf("docker provider: machine %s has no token", spec.MachineID)
	case spec.Image == "":
		return provider.Machine{}, fmt.Errorf("docker provider: machine %s: the fleet has no image; build one with \"dedi image build --format docker\"", spec.MachineID)
	}
	imageID, m, err := d.manifest(ctx, spec.Image)
	if err != nil {
		return provider.Machine{}, fmt.Errorf("create %s: %w", spec.MachineID, err)
	}
	if err := checkCommand(spec, m); err != nil {
		return provider.Machine{}, fmt.Errorf("create %s: %w", spec.MachineID, err)
	}
	mach, id, err := d.claim(ctx, spec, imageID, m)
	if err != nil {
		return provider.Machine{}, fmt.Errorf("create %s: %w", spec.MachineID, err)
	}
	if _, err := d.cli.ContainerStart(ctx, id, client.ContainerStartOptions{}); err != nil {
		_ = d.remove(id)
		return provider.Machine{}, fmt.Errorf("create %s: start container: %w", spec.MachineID, err)
	}
	d.log.Info("machine started", "machine", spec.MachineID, "fleet", spec.Fleet, "container", id[:12], "lspm", mach.LSPMURL, "image", spec.Image)
	return mach, nil
}

// manifest reads the manifest of a dedi image on the engine and returns
// the image's ID with it.
func (d *Docker) manifest(ctx context.Context, ref string) (string, image.Manifest, error) {
	insp, err := d.cli.ImageInspect(ctx, ref)
	if cerrdefs.IsNotFound(err) {
		return "", image.Manifest{}, fmt.Errorf("image %s is not on the docker engine (dedi never pulls images): build it with \"dedi image build --format docker\"", ref)
	}
	if err != nil {
		return "", image.Manifest{}, fmt.Errorf("docker engine at %s: inspect image %s: %w", d.cli.DaemonHost(), ref, err)
	}
	var labels map[string]string
	if insp.Config != nil {
		labels = insp.Config.Labels
	}
	raw, ok := labels[image.LabelManifest]
	if !ok {
		return "", image.Manifest{}, fmt.Errorf("image %s is not a dedi image (it has no %s label): build it with \"dedi image build --format docker\"", ref, image.LabelManifest)
	}
	m, err := image.ParseManifest([]byte(raw))
	if err != nil {
		return "", image.Manifest{}, fmt.Errorf("image %s: %w", ref, err)
	}
	return insp.ID, m, nil
}

// checkCommand refuses a fleet command whose executable is neither one of
// the image's (pinned by the manifest) nor one the fleet allows: the LSPM
// lets its default command run whatever its hash, which would let a fleet
// run dedi itself, or anything else in the image, as its game.
func checkCommand(spec provider.Spec, m image.Manifest) error {
	if len(spec.Command) == 0 {
		return nil
	}
	argv0 := spec.Command[0]
	for _, e := range m.Executables {
		if e.Path == argv0 {
			return nil
		}
	}
	for _, a := range spec.Allow {
		if p, _, _ := strings.Cut(a, "="); p == argv0 {
			return nil
		}
	}
	names := make([]string, 0, len(m.Executables))
	for _, e := range m.Executables {
		names = append(names, e.Path)
	}
	return fmt.Errorf("command %q is not an executable of image %s (it has %s): a machine runs only its image's build", argv0, spec.Image, strings.Join(names, ", "))
}

// claim creates the machine's container on the first free slot. Slots
// that a dedi container of any instance holds are skipped, and so are
// those whose LSPM address is bound by anything else; the container's
// name, which is the address's, settles any race.
func (d *Docker) claim(ctx context.Context, spec provider.Spec, imageID string, m image.Manifest) (provider.Machine, string, error) {
	select {
	case d.slots <- struct{}{}:
		defer func() { <-d.slots }()
	case <-ctx.Done():
		return provider.Machine{}, "", fmt.Errorf("wait for a slot: %w", ctx.Err())
	}
	res, err := d.cli.ContainerList(ctx, client.ContainerListOptions{All: true,
		Filters: make(client.Filters).Add("label", LabelAddress)})
	if err != nil {
		return provider.Machine{}, "", fmt.Errorf("docker engine at %s: list containers: %w", d.cli.DaemonHost(), err)
	}
	used := map[string]bool{}
	for _, c := range res.Items {
		used[c.Labels[LabelAddress]] = true
		if c.Labels[LabelInstance] == d.cfg.Instance && c.Labels[LabelMachine] == spec.MachineID {
			return provider.Machine{}, "", fmt.Errorf("machine %s exists (container %.12s)", spec.MachineID, c.ID)
		}
	}
	for i := 0; i < d.cfg.Machines; i++ {
		addr := d.cfg.address(i).String()
		if used[addr] {
			continue
		}
		listen := net.JoinHostPort(addr, strconv.Itoa(d.cfg.LSPMPort))
		if ln, err := net.Listen("tcp", listen); err != nil {
			continue // another LSPM (of the local provider, say) is there
		} else {
			ln.Close()
		}
		lo, hi := d.cfg.ports(i)
		mach := provider.Machine{MachineID: spec.MachineID, Fleet: spec.Fleet, Address: addr,
			LSPMURL: "http://" + listen, CreatedAt: time.Now().UTC().Round(0)}
		cfg, host := d.containerConfig(spec, imageID, m, mach, lo, hi)
		res, err := d.cli.ContainerCreate(ctx, client.ContainerCreateOptions{Name: "dedi-" + addr, Config: cfg, HostConfig: host})
		if cerrdefs.IsConflict(err) {
			continue // taken since the list
		}
		if err != nil {
			return provider.Machine{}, "", fmt.Errorf("docker engine at %s: create container: %w", d.cli.DaemonHost(), err)
		}
		for _, w := range res.Warnings {
			d.log.Warn("docker engine warns", "machine", spec.MachineID, "warning", w)
		}
		mach.ProviderID = res.ID
		return mach, res.ID, nil
	}
	return provider.Machine{}, "", provider.ErrNoCapacity
}

// containerConfig is the container of one machine: the image's dedi runs
// "dedi lspm" as PID 1, with no init process, so that the only process
// whose environment holds the machine token is the LSPM, which makes
// itself unreadable to the game servers (which run as the same user).
func (d *Docker) containerConfig(spec provider.Spec, imageID string, m image.Manifest, mach provider.Machine, lo, hi int) (*container.Config, *container.HostConfig) {
	cmd := spec.Command
	if len(cmd) == 0 {
		cmd = m.Command
	}
	args := provider.LSPMFlags{Listen: strings.TrimPrefix(mach.LSPMURL, "http://"), Address: mach.Address,
		DataDir: image.DockerDataDir, MachineID: spec.MachineID, PortMin: lo, PortMax: hi,
		Spec: spec, Allow: m.Allow(), Command: cmd}.Args()
	stop := int(StopTimeout / time.Second)
	noInit := false
	cfg := &container.Config{
		Image:      imageID,
		Entrypoint: []string{image.DockerDedi},
		Cmd:        args,
		User:       image.DockerUser,
		Env:        []string{api.EnvMachineToken + "=" + spec.Token, "HOME=/tmp"},
		Labels: map[string]string{
			LabelInstance: d.cfg.Instance,
			LabelMachine:  spec.MachineID,
			LabelFleet:    spec.Fleet,
			LabelAddress:  mach.Address,
			LabelPorts:    fmt.Sprintf("%d-%d", lo, hi),
			LabelLSPMURL:  mach.LSPMURL,
			LabelCreated:  mach.CreatedAt.Format(time.RFC3339Nano),
			LabelImageRef: spec.Image,
		},
		StopSignal:  "SIGTERM",
		StopTimeout: &stop,
	}
	host := &container.HostConfig{
		NetworkMode: "host",
		Init:        &noInit,
		Tmpfs:       map[string]string{"/tmp": "rw,nosuid,nodev,mode=1777"},
		CapDrop:     []string{"ALL"},
		SecurityOpt: []string{"no-new-privileges"},
	}
	return cfg, host
}

// List returns the machines of fleet ("" for all) that this provider's
// instance has on the engine, running or not.
func (d *Docker) List(ctx context.Context, fleet string) ([]provider.Machine, error) {
	f := make(client.Filters).Add("label", LabelInstance+"="+d.cfg.Instance)
	if fleet != "" {
		f.Add("label", LabelFleet+"="+fleet)
	}
	res, err := d.cli.ContainerList(ctx, client.ContainerListOptions{All: true, Filters: f})
	if err != nil {
		return nil, fmt.Errorf("docker engine at %s: list containers: %w", d.cli.DaemonHost(), err)
	}
	out := make([]provider.Machine, 0, len(res.Items))
	for _, c := range res.Items {
		m, err := machineOf(c.ID, c.Labels)
		if err != nil {
			d.log.Warn("container with broken dedi labels; delete it by hand", "container", c.ID, "err", err)
			continue
		}
		if fleet != "" && m.Fleet != fleet {
			continue
		}
		out = append(out, m)
	}
	return out, nil
}

// machineOf reads a machine from its container's labels. Labels are
// whatever the container's creator wrote, and the VMM sends the machine's
// token to its LSPM URL: only what this provider would have written is
// believed (a valid machine id, an IPv4 loopback address, and the LSPM at
// http://ADDRESS:PORT).
func machineOf(id string, labels map[string]string) (provider.Machine, error) {
	created, err := time.Parse(time.RFC3339Nano, labels[LabelCreated])
	if err != nil {
		return provider.Machine{}, fmt.Errorf("label %s: %w", LabelCreated, err)
	}
	m := provider.Machine{ProviderID: id, MachineID: labels[LabelMachine], Fleet: labels[LabelFleet],
		Address: labels[LabelAddress], LSPMURL: labels[LabelLSPMURL], CreatedAt: created}
	if !names.ID(m.MachineID) {
		return provider.Machine{}, fmt.Errorf("label %s: invalid machine id %q", LabelMachine, m.MachineID)
	}
	addr, err := netip.ParseAddr(m.Address)
	if err != nil || !addr.Is4() || !addr.IsLoopback() || addr.String() != m.Address {
		return provider.Machine{}, fmt.Errorf("label %s: %q is not an IPv4 loopback address", LabelAddress, m.Address)
	}
	hostPort, ok := strings.CutPrefix(m.LSPMURL, "http://")
	ap, err := netip.ParseAddrPort(hostPort)
	if !ok || err != nil || ap.Addr() != addr || ap.Port() == 0 || ap.String() != hostPort {
		return provider.Machine{}, fmt.Errorf("label %s: %q is not http://%s:PORT", LabelLSPMURL, m.LSPMURL, m.Address)
	}
	return m, nil
}

// Delete stops the machine's container (SIGTERM: its LSPM drains its game
// servers and exits; the engine kills what is left after StopTimeout, or
// at once when ctx ends) and removes it. A container that is gone, or is
// not one of this instance's machines, is not an error and is left alone.
func (d *Docker) Delete(ctx context.Context, providerID string) error {
	if b, err := hex.DecodeString(providerID); err != nil || len(b) != 32 {
		return nil // not a container id: it cannot name a machine of ours
	}
	insp, err := d.cli.ContainerInspect(ctx, providerID, client.ContainerInspectOptions{})
	if cerrdefs.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("delete %.12s: docker engine at %s: %w", providerID, d.cli.DaemonHost(), err)
	}
	var labels map[string]string
	if insp.Container.Config != nil {
		labels = insp.Container.Config.Labels
	}
	if labels[LabelInstance] != d.cfg.Instance {
		d.log.Warn("not deleting a container that is not a machine of this provider", "container", providerID, "instance", labels[LabelInstance])
		return nil
	}
	log := d.log.With("machine", labels[LabelMachine], "container", providerID[:12])
	if st := insp.Container.State; st != nil && !st.Running {
		log.Warn("machine's container had stopped before Delete", "status", st.Status, "exitCode", st.ExitCode, "oomKilled", st.OOMKilled, "error", st.Error, "finishedAt", st.FinishedAt)
	} else {
		timeout := int(StopTimeout / time.Second)
		if _, err := d.cli.ContainerStop(ctx, providerID, client.ContainerStopOptions{Timeout: &timeout}); err != nil && !cerrdefs.IsNotFound(err) {
			log.Warn("container did not stop; removing it by force", "err", err)
		}
	}
	if err := d.remove(providerID); err != nil {
		return fmt.Errorf("delete %.12s: %w", providerID, err)
	}
	log.Info("machine deleted")
	return nil
}

// remove removes a container by force (killing it if it still runs) and
// waits until the engine no longer has it. It runs on a context of its
// own: a Delete whose ctx ended must still not leave the container.
func (d *Docker) remove(id string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for {
		_, err := d.cli.ContainerRemove(ctx, id, client.ContainerRemoveOptions{Force: true, RemoveVolumes: true})
		if err == nil || cerrdefs.IsNotFound(err) {
			return nil
		}
		if !cerrdefs.IsConflict(err) { // a removal already in progress is a conflict: wait for it
			return fmt.Errorf("docker engine at %s: remove container: %w", d.cli.DaemonHost(), err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("docker engine at %s: remove container: %w", d.cli.DaemonHost(), err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}
