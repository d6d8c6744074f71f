package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"dedi.dev/dedi/api"
)

// Client verbs: the command line of API.md's VMM endpoints.

const clientUsage = `Usage:
  dedi fleet create NAME [--provider local] [--image REF] [--per-machine 4]
                    [--min 0] [--max 10] [--idle 60s] [--placement packed|distributed]
                    [--ports game] [--sdk dedi|agones] [-- COMMAND ARGS...]
  dedi fleet list
  dedi fleet get NAME
  dedi fleet delete NAME
  dedi machine create --fleet NAME
  dedi machine list [--fleet NAME] [--state STATE]
  dedi machine get ID
  dedi machine delete ID
  dedi process start --fleet NAME [--param k=v]... [--label k=v]... [--wait] [--timeout 30s]
  dedi process list [--fleet NAME] [--machine ID] [--state STATE]
  dedi process get ID
  dedi process stop ID
  dedi process logs ID [--tail N] [--follow]
  dedi events

Every verb takes -o table|json (or --output). The VMM address comes from
--addr, else env DEDI_ADDR, else http://127.0.0.1:7700 (HOST:PORT is taken as
http://HOST:PORT). The admin token comes from env DEDI_TOKEN, else from the
file DATA-DIR/admin-token, where DATA-DIR is --data-dir, else env
DEDI_DATA_DIR, else ~/.dedi (where "dedi up" keeps it).
Run "dedi GROUP VERB -h" for a verb's flags.
`

// Defaults and names of the client's environment.
const (
	clientDefaultAddr = "http://127.0.0.1:7700"
	envClientDataDir  = "DEDI_DATA_DIR"
	clientTokenFile   = "admin-token"
	// clientRequestTimeout bounds one call that does not stream.
	clientRequestTimeout = time.Minute
)

// runClient runs a client verb of group ("fleet", "machine", "process" or
// "events") and returns the exit status: 0, 1 for a failed call, 2 for a
// wrong invocation.
func runClient(group string, args []string, stdout, stderr io.Writer) int {
	ctx, cancel := signalContext()
	defer cancel()
	c := &cli{stdout: stdout, stderr: stderr, getenv: os.Getenv, now: time.Now}
	return c.run(ctx, group, args)
}

// cli holds what a client verb reads from and writes to, so that tests
// give their own.
type cli struct {
	stdout, stderr io.Writer
	getenv         func(string) string
	now            func() time.Time
	hc             *http.Client // nil: http.DefaultClient
}

// cliUsageError is a wrong invocation: exit status 2.
type cliUsageError struct {
	msg  string
	help string // the command whose -h explains, e.g. "dedi fleet create"
}

func (e *cliUsageError) Error() string { return e.msg }

// errHelpShown is returned once -h printed help: exit status 0.
var errHelpShown = errors.New("help shown")

// cliError is a failure outside the API's answers, with the code of its
// "dedi: CODE: DETAIL" line.
type cliError struct {
	code string
	err  error
}

func (e *cliError) Error() string { return e.code + ": " + e.err.Error() }
func (e *cliError) Unwrap() error { return e.err }

func (c *cli) run(ctx context.Context, group string, args []string) int {
	return c.report(c.dispatch(ctx, group, args))
}

// report prints err as "dedi: CODE: DETAIL" and returns the exit status.
func (c *cli) report(err error) int {
	var ue *cliUsageError
	var p *api.Problem
	var ce *cliError
	switch {
	case err == nil, errors.Is(err, errHelpShown):
		return 0
	case errors.As(err, &ue):
		fmt.Fprintf(c.stderr, "dedi: usage: %s\n", ue.msg)
		if ue.help != "" {
			fmt.Fprintf(c.stderr, "Run %q for help.\n", ue.help+" -h")
		}
		return 2
	case errors.As(err, &p):
		detail := p.Detail
		if detail == "" {
			detail = p.Title
		}
		fmt.Fprintf(c.stderr, "dedi: %s: %s\n", p.Code, detail)
		if p.Status == http.StatusUnauthorized {
			fmt.Fprintf(c.stderr, "The VMM refused the admin token; check env %s or the %s file of the data dir.\n",
				api.EnvAdminToken, clientTokenFile)
		}
		return 1
	case errors.As(err, &ce):
		fmt.Fprintf(c.stderr, "dedi: %s: %v\n", ce.code, ce.err)
		return 1
	}
	fmt.Fprintf(c.stderr, "dedi: error: %v\n", err)
	return 1
}

func (c *cli) dispatch(ctx context.Context, group string, args []string) error {
	if group == "events" {
		return c.events(ctx, args)
	}
	verbs := map[string]map[string]func(context.Context, []string) error{
		"fleet": {
			"create": c.fleetCreate, "list": c.fleetList, "get": c.fleetGet, "delete": c.fleetDelete,
		},
		"machine": {
			"create": c.machineCreate, "list": c.machineList, "get": c.machineGet, "delete": c.machineDelete,
		},
		"process": {
			"start": c.processStart, "list": c.processList, "get": c.processGet,
			"stop": c.processStop, "logs": c.processLogs,
		},
	}[group]
	if verbs == nil {
		return &cliUsageError{msg: fmt.Sprintf("unknown command %q", group), help: "dedi"}
	}
	if len(args) == 0 {
		fmt.Fprint(c.stderr, clientUsage)
		return &cliUsageError{msg: fmt.Sprintf("dedi %s needs a verb: %s", group, strings.Join(slices.Sorted(maps.Keys(verbs)), ", "))}
	}
	switch args[0] {
	case "help", "-h", "-help", "--help":
		fmt.Fprint(c.stdout, clientUsage)
		return errHelpShown
	}
	fn := verbs[args[0]]
	if fn == nil {
		return &cliUsageError{
			msg:  fmt.Sprintf("unknown verb %q of dedi %s; want %s", args[0], group, strings.Join(slices.Sorted(maps.Keys(verbs)), ", ")),
			help: "dedi " + group,
		}
	}
	return fn(ctx, args[1:])
}

// verbFlags is the flag set of one verb, with the flags every verb takes.
type verbFlags struct {
	*flag.FlagSet
	name     string // "dedi fleet create"
	synopsis string // what follows the name in the usage line
	output   string
	addr     string
	dataDir  string
}

func (c *cli) flags(name, synopsis string) *verbFlags {
	f := &verbFlags{FlagSet: flag.NewFlagSet(name, flag.ContinueOnError), name: name, synopsis: synopsis}
	f.SetOutput(io.Discard) // errors are reported as "dedi: usage: ..."
	f.Usage = func() {}
	f.StringVar(&f.output, "o", "table", "output format: table or json")
	f.StringVar(&f.output, "output", "table", "output format: table or json")
	f.StringVar(&f.addr, "addr", "", "VMM address (default: env "+api.EnvAddr+", else "+clientDefaultAddr+")")
	f.StringVar(&f.dataDir, "data-dir", "", "data dir holding "+clientTokenFile+" when env "+api.EnvAdminToken+
		" is not set (default: env "+envClientDataDir+", else ~/.dedi)")
	return f
}

// parse reads flags wherever they stand among the arguments (the flag
// package alone stops at the first argument that is not a flag) and
// returns the positional arguments and those after "--".
func (c *cli) parse(f *verbFlags, args []string) (pos, after []string, err error) {
	for {
		if err := f.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				fmt.Fprintf(c.stdout, "Usage: %s %s\n\nFlags:\n", f.name, f.synopsis)
				f.SetOutput(c.stdout)
				f.PrintDefaults()
				return nil, nil, errHelpShown
			}
			return nil, nil, &cliUsageError{msg: err.Error(), help: f.name}
		}
		rest := f.Args()
		if n := len(args) - len(rest); n > 0 && args[n-1] == "--" {
			after = rest
			break
		}
		if len(rest) == 0 {
			break
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
	switch f.output {
	case "table", "json":
	default:
		return nil, nil, &cliUsageError{msg: fmt.Sprintf("-o %q: want table or json", f.output), help: f.name}
	}
	return pos, after, nil
}

// parseArgs is parse for verbs that take exactly n positional arguments
// (words after "--" count among them), named in what.
func (c *cli) parseArgs(f *verbFlags, args []string, n int, what string) ([]string, error) {
	pos, after, err := c.parse(f, args)
	if err != nil {
		return nil, err
	}
	pos = append(pos, after...)
	if len(pos) != n {
		msg := fmt.Sprintf("%s takes no arguments, got %q", f.name, pos)
		if n > 0 {
			msg = fmt.Sprintf("%s takes %s, got %q", f.name, what, pos)
		}
		return nil, &cliUsageError{msg: msg, help: f.name}
	}
	return pos, nil
}

// client resolves the VMM address and the admin token of a verb.
func (c *cli) client(f *verbFlags) (*api.Client, error) {
	addr := f.addr
	if addr == "" {
		addr = c.getenv(api.EnvAddr)
	}
	base, err := clientBaseURL(addr)
	if err != nil {
		return nil, err
	}
	token, err := c.adminToken(f.dataDir)
	if err != nil {
		return nil, err
	}
	return api.NewClient(base, token, c.hc), nil
}

// clientBaseURL turns the address of the VMM into its base URL: "" is the default,
// HOST:PORT means http://HOST:PORT.
func clientBaseURL(addr string) (string, error) {
	addr = strings.TrimSpace(addr)
	if addr == "" {
		return clientDefaultAddr, nil
	}
	s := addr
	if !strings.Contains(s, "://") {
		s = "http://" + s
	}
	u, err := url.Parse(s)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.RawQuery != "" || u.Fragment != "" {
		return "", &cliUsageError{msg: fmt.Sprintf("VMM address %q: want HOST:PORT or http(s)://HOST:PORT", addr)}
	}
	return strings.TrimRight(u.String(), "/"), nil
}

// adminToken reads the admin token from the environment, else from the
// data dir.
func (c *cli) adminToken(dataDir string) (string, error) {
	if t := strings.TrimSpace(c.getenv(api.EnvAdminToken)); t != "" {
		return t, nil
	}
	if dataDir == "" {
		dataDir = c.getenv(envClientDataDir)
	}
	if dataDir == "" {
		home := c.getenv("HOME")
		if home == "" {
			home, _ = os.UserHomeDir()
		}
		dataDir = filepath.Join(home, ".dedi")
	}
	path := filepath.Join(dataDir, clientTokenFile)
	raw, err := os.ReadFile(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return "", &cliError{code: "no_token", err: fmt.Errorf(
			"no admin token: set env %s, or run \"dedi up\" or \"dedi vmm\", which keep it in %s "+
				"(for another data dir, pass --data-dir DIR or set env %s)", api.EnvAdminToken, path, envClientDataDir)}
	case err != nil:
		return "", &cliError{code: "no_token", err: fmt.Errorf("read the admin token: %w", err)}
	}
	token := strings.TrimSpace(string(raw))
	if token == "" {
		return "", &cliError{code: "no_token", err: fmt.Errorf("%s is empty; set env %s or restart the VMM", path, api.EnvAdminToken)}
	}
	return token, nil
}

// callVMM runs one request that does not stream, bounded in time, and gives
// transport failures their code.
func callVMM(ctx context.Context, timeout time.Duration, fn func(ctx context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	return transportError(fn(ctx))
}

// fetch makes one request of a verb to the VMM, bounded by limit.
func fetch[T any](ctx context.Context, c *cli, f *verbFlags, limit time.Duration, call func(context.Context, *api.Client) (T, error)) (T, error) {
	var out T
	cl, err := c.client(f)
	if err != nil {
		return out, err
	}
	err = callVMM(ctx, limit, func(ctx context.Context) (err error) {
		out, err = call(ctx, cl)
		return err
	})
	return out, err
}

// listVerb is a list verb: no arguments, one request, then the items as
// {"items": [...]} with -o json or as a table. The flags of f are read by
// list, which runs after they are parsed.
func listVerb[T any](ctx context.Context, c *cli, f *verbFlags, args []string,
	list func(context.Context, *api.Client) ([]T, error), table func([]T) error) error {
	if _, err := c.parseArgs(f, args, 0, ""); err != nil {
		return err
	}
	out, err := fetch(ctx, c, f, clientRequestTimeout, list)
	if err != nil {
		return err
	}
	if f.output == "json" {
		return writeJSONList(c, out)
	}
	return table(out)
}

// getVerb is a get verb: one NAME or ID (named in what), then the object as
// JSON with -o json or described.
func getVerb[T any](ctx context.Context, c *cli, f *verbFlags, args []string, what string,
	get func(*api.Client, context.Context, string) (T, error), describe func(T) error) error {
	pos, err := c.parseArgs(f, args, 1, what)
	if err != nil {
		return err
	}
	out, err := fetch(ctx, c, f, clientRequestTimeout, func(ctx context.Context, cl *api.Client) (T, error) {
		return get(cl, ctx, pos[0])
	})
	if err != nil {
		return err
	}
	if f.output == "json" {
		return c.writeJSON(out)
	}
	return describe(out)
}

// deleteVerb is a delete or stop verb: one NAME or ID (named in what), one
// request, then in table output done (a format taking the NAME or ID).
func deleteVerb(ctx context.Context, c *cli, f *verbFlags, args []string, what string,
	del func(*api.Client, context.Context, string) error, done string) error {
	pos, err := c.parseArgs(f, args, 1, what)
	if err != nil {
		return err
	}
	if _, err := fetch(ctx, c, f, clientRequestTimeout, func(ctx context.Context, cl *api.Client) (struct{}, error) {
		return struct{}{}, del(cl, ctx, pos[0])
	}); err != nil {
		return err
	}
	if f.output == "table" {
		fmt.Fprintf(c.stdout, done, pos[0])
	}
	return nil
}

// transportError gives an error that is not an answer of the VMM its code.
func transportError(err error) error {
	var p *api.Problem
	var ue *url.Error
	switch {
	case err == nil, errors.As(err, &p):
		return err
	case errors.Is(err, context.DeadlineExceeded):
		return &cliError{code: api.CodeTimeout, err: err}
	case errors.Is(err, context.Canceled):
		return &cliError{code: "canceled", err: err}
	case errors.As(err, &ue):
		return &cliError{code: "unreachable", err: err}
	}
	return err
}

// fleet verbs

func (c *cli) fleetCreate(ctx context.Context, args []string) error {
	f := c.flags("dedi fleet create", "NAME [flags] [-- COMMAND ARGS...]")
	provider := f.String("provider", "local", "machine provider")
	image := f.String("image", "", "image reference of the game server build (from dedi image build)")
	perMachine := f.Int("per-machine", 4, "game server processes per machine")
	minMachines := f.Int("min", 0, "machines kept even when idle")
	maxMachines := f.Int("max", 10, "most machines of the fleet")
	idle := f.Duration("idle", 60*time.Second, "an empty machine above --min is shut down after this long")
	placement := f.String("placement", api.PlacementPacked, "packed (fewest machines) or distributed (least busy machine)")
	ports := f.String("ports", "game", "comma-separated names of the ports each process gets (empty: none)")
	sdk := f.String("sdk", api.SDKDedi, "SDK the processes speak: dedi or agones")
	healthPeriod := f.Duration("health-period", 0, "heartbeat period of the processes (default: the LSPM's)")
	failures := f.Int("failure-threshold", 0, "missed heartbeats before a process is unhealthy (default: the LSPM's)")
	startTimeout := f.Duration("start-timeout", 0, "time a process has to become ready (default: the LSPM's)")
	pos, command, err := c.parse(f, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return &cliUsageError{msg: fmt.Sprintf("dedi fleet create takes one NAME (then -- COMMAND ARGS...), got %q", pos), help: f.name}
	}
	fleet := api.Fleet{
		Name: pos[0], Provider: *provider, Image: *image, Command: command,
		ProcessesPerMachine: *perMachine, Ports: splitComma(*ports),
		Health: api.Health{
			PeriodSeconds: healthPeriod.Seconds(), FailureThreshold: *failures,
			StartTimeoutSeconds: startTimeout.Seconds(),
		},
		Scaling: api.Scaling{
			MinMachines: *minMachines, MaxMachines: *maxMachines, IdleShutdownSeconds: idle.Seconds(),
		},
		Placement: *placement, SDK: *sdk,
	}
	out, err := fetch(ctx, c, f, clientRequestTimeout, func(ctx context.Context, cl *api.Client) (api.Fleet, error) {
		return cl.CreateFleet(ctx, fleet)
	})
	if err != nil {
		return err
	}
	if f.output == "json" {
		return c.writeJSON(out)
	}
	return c.fleetTable([]api.Fleet{out})
}

func (c *cli) fleetList(ctx context.Context, args []string) error {
	f := c.flags("dedi fleet list", "[flags]")
	return listVerb(ctx, c, f, args, func(ctx context.Context, cl *api.Client) ([]api.Fleet, error) {
		return cl.ListFleets(ctx)
	}, c.fleetTable)
}

func (c *cli) fleetGet(ctx context.Context, args []string) error {
	return getVerb(ctx, c, c.flags("dedi fleet get", "NAME [flags]"), args, "one NAME", (*api.Client).GetFleet, c.describeFleet)
}

func (c *cli) fleetDelete(ctx context.Context, args []string) error {
	return deleteVerb(ctx, c, c.flags("dedi fleet delete", "NAME [flags]"), args, "one NAME", (*api.Client).DeleteFleet,
		"fleet %s is being deleted: its machines drain, then it goes\n")
}

// machine verbs

func (c *cli) machineCreate(ctx context.Context, args []string) error {
	f := c.flags("dedi machine create", "--fleet NAME [flags]")
	fleet := f.String("fleet", "", "fleet of the machine (required)")
	if _, err := c.parseArgs(f, args, 0, ""); err != nil {
		return err
	}
	if *fleet == "" {
		return &cliUsageError{msg: "dedi machine create needs --fleet NAME", help: f.name}
	}
	out, err := fetch(ctx, c, f, clientRequestTimeout, func(ctx context.Context, cl *api.Client) (api.Machine, error) {
		return cl.CreateMachine(ctx, *fleet)
	})
	if err != nil {
		return err
	}
	if f.output == "json" {
		return c.writeJSON(out)
	}
	return c.machineTable([]api.Machine{out})
}

func (c *cli) machineList(ctx context.Context, args []string) error {
	f := c.flags("dedi machine list", "[flags]")
	fleet := f.String("fleet", "", "only the machines of this fleet")
	state := f.String("state", "", "only the machines in this state")
	return listVerb(ctx, c, f, args, func(ctx context.Context, cl *api.Client) ([]api.Machine, error) {
		return cl.ListMachines(ctx, *fleet, *state)
	}, c.machineTable)
}

func (c *cli) machineGet(ctx context.Context, args []string) error {
	return getVerb(ctx, c, c.flags("dedi machine get", "ID [flags]"), args, "one machine ID", (*api.Client).GetMachine, c.describeMachine)
}

func (c *cli) machineDelete(ctx context.Context, args []string) error {
	return deleteVerb(ctx, c, c.flags("dedi machine delete", "ID [flags]"), args, "one machine ID", (*api.Client).DeleteMachine,
		"machine %s is being deleted: drain, handshake, deprovision\n")
}

// process verbs

func (c *cli) processStart(ctx context.Context, args []string) error {
	f := c.flags("dedi process start", "--fleet NAME [flags]")
	fleet := f.String("fleet", "", "fleet to start the process in (required)")
	var params, labels listFlag
	f.Var(&params, "param", "a param k=v given to the process in DEDI_PARAMS, as a string (repeatable)")
	paramsJSON := f.String("params", "", "params as a JSON object; --param entries are added to it")
	f.Var(&labels, "label", "a label k=v (repeatable)")
	wait := f.Bool("wait", false, "answer once the process is ready")
	timeout := f.Duration("timeout", 30*time.Second, "how long --wait waits")
	if _, err := c.parseArgs(f, args, 0, ""); err != nil {
		return err
	}
	if *fleet == "" {
		return &cliUsageError{msg: "dedi process start needs --fleet NAME", help: f.name}
	}
	timeoutSet := false
	f.Visit(func(fl *flag.Flag) { timeoutSet = timeoutSet || fl.Name == "timeout" })
	if timeoutSet && !*wait {
		return &cliUsageError{msg: "--timeout is how long --wait waits; add --wait", help: f.name}
	}
	if *timeout <= 0 {
		return &cliUsageError{msg: "--timeout must be positive", help: f.name}
	}
	req := api.StartRequest{Fleet: *fleet}
	if *paramsJSON != "" {
		if err := json.Unmarshal([]byte(*paramsJSON), &req.Params); err != nil || req.Params == nil {
			return &cliUsageError{msg: fmt.Sprintf("--params %q: want a JSON object", *paramsJSON), help: f.name}
		}
	}
	for _, kv := range params {
		k, v, err := cutKV("--param", kv)
		if err != nil {
			return &cliUsageError{msg: err.Error(), help: f.name}
		}
		if req.Params == nil {
			req.Params = map[string]any{}
		}
		req.Params[k] = v
	}
	for _, kv := range labels {
		k, v, err := cutKV("--label", kv)
		if err != nil {
			return &cliUsageError{msg: err.Error(), help: f.name}
		}
		if req.Labels == nil {
			req.Labels = map[string]string{}
		}
		req.Labels[k] = v
	}
	limit := clientRequestTimeout
	if *wait {
		limit += *timeout // the VMM answers 504 code timeout after *timeout
	}
	out, err := fetch(ctx, c, f, limit, func(ctx context.Context, cl *api.Client) (api.Process, error) {
		return cl.StartProcess(ctx, req, *wait, *timeout)
	})
	if err != nil {
		return err
	}
	if f.output == "json" {
		return c.writeJSON(out)
	}
	return c.processTable([]api.Process{out})
}

func (c *cli) processList(ctx context.Context, args []string) error {
	f := c.flags("dedi process list", "[flags]")
	fleet := f.String("fleet", "", "only the processes of this fleet")
	machine := f.String("machine", "", "only the processes on this machine ID")
	state := f.String("state", "", "only the processes in this state")
	return listVerb(ctx, c, f, args, func(ctx context.Context, cl *api.Client) ([]api.Process, error) {
		return cl.ListProcesses(ctx, *fleet, *machine, *state)
	}, c.processTable)
}

func (c *cli) processGet(ctx context.Context, args []string) error {
	return getVerb(ctx, c, c.flags("dedi process get", "ID [flags]"), args, "one process ID", (*api.Client).GetProcess, c.describeProcess)
}

func (c *cli) processStop(ctx context.Context, args []string) error {
	return deleteVerb(ctx, c, c.flags("dedi process stop", "ID [flags]"), args, "one process ID", (*api.Client).StopProcess,
		"process %s is stopping\n")
}

// processLogs copies a process's log to stdout; the log is text whatever -o
// says.
func (c *cli) processLogs(ctx context.Context, args []string) error {
	f := c.flags("dedi process logs", "ID [flags]")
	tail := f.Int("tail", 0, "only the last N lines (0: all that is kept)")
	follow := f.Bool("follow", false, "keep printing new output until Ctrl-C or the process's end")
	pos, err := c.parseArgs(f, args, 1, "one process ID")
	if err != nil {
		return err
	}
	if *tail < 0 {
		return &cliUsageError{msg: "--tail must not be negative", help: f.name}
	}
	cl, err := c.client(f)
	if err != nil {
		return err
	}
	rc, err := cl.Logs(ctx, pos[0], *tail, *follow)
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return transportError(err)
	}
	defer rc.Close()
	if _, err := io.Copy(c.stdout, rc); err != nil && ctx.Err() == nil {
		return &cliError{code: "unreachable", err: fmt.Errorf("read the log: %w", err)}
	}
	return nil
}

// events prints the VMM's events until Ctrl-C: a line of columns each, or
// with -o json each event's JSON object as the VMM sent it, one a line.
func (c *cli) events(ctx context.Context, args []string) error {
	f := c.flags("dedi events", "[flags]")
	if _, err := c.parseArgs(f, args, 0, ""); err != nil {
		return err
	}
	cl, err := c.client(f)
	if err != nil {
		return err
	}
	if f.output == "json" {
		var buf bytes.Buffer
		err = cl.RawEvents(ctx, func(data []byte) error {
			buf.Reset()
			if err := json.Compact(&buf, data); err != nil {
				return fmt.Errorf("event %.200q is not JSON: %w", data, err)
			}
			buf.WriteByte('\n')
			_, err := c.stdout.Write(buf.Bytes())
			return err
		})
	} else {
		const format = "%-12s  %-20s  %-12s  %-14s  %-14s  %-10s  %s\n"
		fmt.Fprintf(c.stdout, format, "TIME", "TYPE", "FLEET", "MACHINE", "PROCESS", "STATE", "DETAIL")
		err = cl.Events(ctx, func(ev api.Event) error {
			_, err := fmt.Fprintf(c.stdout, format, ev.At.Local().Format("15:04:05.000"), cell(ev.Type),
				cell(ev.Fleet), cell(ev.MachineID), cell(ev.ProcessID), cell(ev.State), ev.Detail)
			return err
		})
	}
	if errors.Is(err, api.ErrEventsClosed) {
		return &cliError{code: "unavailable", err: err}
	}
	return transportError(err)
}

// output

func (c *cli) writeJSON(v any) error {
	enc := json.NewEncoder(c.stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// writeJSONList prints items as the REST API lists them: {"items": [...]}.
func writeJSONList[T any](c *cli, items []T) error {
	if items == nil {
		items = []T{}
	}
	return c.writeJSON(api.List[T]{Items: items})
}

func (c *cli) table() *tabwriter.Writer {
	return tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
}

func (c *cli) fleetTable(fleets []api.Fleet) error {
	w := c.table()
	fmt.Fprintln(w, "NAME\tPROVIDER\tPLACEMENT\tPER-MACHINE\tMIN\tMAX\tSTATE")
	for _, f := range fleets {
		fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%d\t%d\t%s\n", f.Name, cell(f.Provider), cell(f.Placement),
			f.ProcessesPerMachine, f.Scaling.MinMachines, f.Scaling.MaxMachines, cell(f.State))
	}
	return w.Flush()
}

func (c *cli) machineTable(ms []api.Machine) error {
	now := c.now()
	w := c.table()
	fmt.Fprintln(w, "ID\tFLEET\tSTATE\tLOAD\tADDRESS\tPROCS\tSEEN")
	for _, m := range ms {
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%d/%d\t%s\n", m.ID, cell(m.Fleet), cell(m.State), cell(m.Load),
			cell(m.Address), m.ProcessCount, m.MaxProcesses, fmtAgo(now, m.LastReportAt))
	}
	return w.Flush()
}

func (c *cli) processTable(ps []api.Process) error {
	now := c.now()
	w := c.table()
	fmt.Fprintln(w, "ID\tFLEET\tMACHINE\tSTATE\tADDRESS\tPORTS\tPLAYERS\tAGE")
	for _, p := range ps {
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\n", p.ID, cell(p.Fleet), cell(p.MachineID), cell(p.State),
			cell(p.Address), cell(fmtPorts(p.Ports)), p.Players, fmtAge(now, p.CreatedAt))
	}
	return w.Flush()
}

// describe prints name, value lines in two aligned columns.
func (c *cli) describe(kv ...string) error {
	w := c.table()
	for i := 0; i+1 < len(kv); i += 2 {
		fmt.Fprintf(w, "%s:\t%s\n", kv[i], cell(kv[i+1]))
	}
	return w.Flush()
}

func (c *cli) describeFleet(f api.Fleet) error {
	return c.describe(
		"Name", f.Name,
		"State", f.State,
		"Provider", f.Provider,
		"Image", f.Image,
		"Command", fmtArgs(f.Command),
		"Per machine", fmt.Sprint(f.ProcessesPerMachine),
		"Machines", fmt.Sprintf("min %d, max %d, idle shutdown %s", f.Scaling.MinMachines, f.Scaling.MaxMachines,
			fmtSeconds(f.Scaling.IdleShutdownSeconds)),
		"Placement", f.Placement,
		"Ports", strings.Join(f.Ports, ","),
		"SDK", f.SDK,
		"Health", fmtHealth(f.Health),
		"Created", fmtTime(f.CreatedAt),
	)
}

func (c *cli) describeMachine(m api.Machine) error {
	now := c.now()
	hw := ""
	if h := m.Hardware; h != nil {
		hw = fmt.Sprintf("%s, %d CPUs (%s), %s, %s", h.Hostname, h.CPUs, h.CPUModel, fmtBytes(h.MemoryBytes), h.Kernel)
	}
	return c.describe(
		"ID", m.ID,
		"Fleet", m.Fleet,
		"Provider", strings.TrimSpace(m.Provider+" "+m.ProviderID),
		"State", m.State,
		"Load", m.Load,
		"Address", m.Address,
		"Processes", fmt.Sprintf("%d/%d", m.ProcessCount, m.MaxProcesses),
		"Last report", fmt.Sprintf("%s ago (seq %d)", fmtAgo(now, m.LastReportAt), m.Seq),
		"Hardware", hw,
		"Created", fmtTime(m.CreatedAt),
	)
}

func (c *cli) describeProcess(p api.Process) error {
	now := c.now()
	params := ""
	if len(p.Params) > 0 {
		b, _ := json.Marshal(p.Params) // a decoded JSON object encodes again
		params = string(b)
	}
	kv := []string{
		"ID", p.ID,
		"Fleet", p.Fleet,
		"Machine", p.MachineID,
		"State", p.State,
		"PID", fmt.Sprint(p.PID),
		"Command", fmtArgs(p.Command),
		"Params", params,
		"Labels", fmtPairs(p.Labels),
		"Address", p.Address,
		"Ports", fmtPorts(p.Ports),
		"Players", fmt.Sprint(p.Players),
		"Created", fmt.Sprintf("%s (%s ago)", fmtTime(p.CreatedAt), fmtAge(now, p.CreatedAt)),
	}
	if p.ReadyAt != nil {
		kv = append(kv, "Ready", fmtTime(*p.ReadyAt))
	}
	if p.LastHeartbeatAt != nil {
		kv = append(kv, "Heartbeat", fmtAgo(now, p.LastHeartbeatAt)+" ago")
	}
	if p.EndedAt != nil {
		kv = append(kv, "Ended", fmtTime(*p.EndedAt))
	}
	if e := p.Exit; e != nil {
		var how []string
		if e.Code != nil {
			how = append(how, fmt.Sprintf("code %d", *e.Code))
		}
		if e.Signal != "" {
			how = append(how, e.Signal)
		}
		if e.Detail != "" {
			how = append(how, e.Detail)
		}
		exit := e.Reason
		if len(how) > 0 {
			exit += " (" + strings.Join(how, ", ") + ")"
		}
		kv = append(kv, "Exit", exit)
	}
	if err := c.describe(kv...); err != nil {
		return err
	}
	if p.Exit != nil && len(p.Exit.LogTail) > 0 {
		fmt.Fprintln(c.stdout, "Log tail:")
		for _, l := range p.Exit.LogTail {
			fmt.Fprintf(c.stdout, "  %s\n", l)
		}
	}
	return nil
}

// formatting helpers

func cell(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// fmtPorts is "game=30001,query=30002", sorted by name.
func fmtPorts(ports map[string]int) string {
	var parts []string
	for _, name := range slices.Sorted(maps.Keys(ports)) {
		parts = append(parts, fmt.Sprintf("%s=%d", name, ports[name]))
	}
	return strings.Join(parts, ",")
}

// fmtPairs is "k=v,k2=v2", sorted by key.
func fmtPairs(m map[string]string) string {
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(m)) {
		parts = append(parts, k+"="+m[k])
	}
	return strings.Join(parts, ",")
}

func fmtArgs(args []string) string {
	q := make([]string, len(args))
	for i, a := range args {
		if a == "" || strings.ContainsAny(a, " \t\n\"'\\$") {
			a = fmt.Sprintf("%q", a)
		}
		q[i] = a
	}
	return strings.Join(q, " ")
}

func fmtHealth(h api.Health) string {
	def := func(s string) string {
		if s == "0s" || s == "0" {
			return "default"
		}
		return s
	}
	return fmt.Sprintf("period %s, failure threshold %s, start timeout %s",
		def(fmtSeconds(h.PeriodSeconds)), def(fmt.Sprint(h.FailureThreshold)), def(fmtSeconds(h.StartTimeoutSeconds)))
}

func fmtSeconds(s float64) string {
	return time.Duration(s * float64(time.Second)).String()
}

func fmtTime(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.Local().Format(time.RFC3339)
}

// fmtAge is how long ago t was, in one unit: 45s, 12m, 3h, 2d; "-" for none.
func fmtAge(now, t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	d := max(now.Sub(t), 0)
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d/time.Second))
	case d < time.Hour:
		return fmt.Sprintf("%dm", int(d/time.Minute))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh", int(d/time.Hour))
	}
	return fmt.Sprintf("%dd", int(d/(24*time.Hour)))
}

func fmtAgo(now time.Time, t *time.Time) string {
	if t == nil {
		return "-"
	}
	return fmtAge(now, *t)
}

func fmtBytes(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	}
	return fmt.Sprintf("%d B", n)
}

// splitComma splits a comma-separated list; "" is the empty list.
func splitComma(s string) []string {
	out := []string{}
	for part := range strings.SplitSeq(s, ",") {
		if part = strings.TrimSpace(part); part != "" {
			out = append(out, part)
		}
	}
	return out
}

func cutKV(flagName, kv string) (string, string, error) {
	k, v, ok := strings.Cut(kv, "=")
	if !ok || k == "" {
		return "", "", fmt.Errorf("%s %q: want KEY=VALUE", flagName, kv)
	}
	return k, v, nil
}
