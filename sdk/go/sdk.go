// Package sdk is dedi's Go SDK: what a game server process uses to talk to
// the LSPM that started it, over the REST endpoints of shared/API.md
// (ready, heartbeat, shutdown, and reading its own process object).
//
// A typical game server:
//
//	c, err := sdk.FromEnv()          // DEDI_* environment set by the LSPM
//	...                              // open the game port: c.Port("game")
//	p, err := c.Ready(ctx)           // starting -> ready
//	c.Start(ctx)                     // heartbeat every period in the background
//	defer c.Close()
//	c.SetPlayers(n)                  // carried by the next heartbeat
//
// The Client owns one background goroutine at most (the heartbeat loop);
// Close stops it and waits for it.
package sdk

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"dedi.dev/dedi/api"
)

// Defaults of Config.
const (
	DefaultHeartbeatPeriod = 2 * time.Second
	DefaultRequestTimeout  = 5 * time.Second
)

// Backoff bounds of Ready and Shutdown retries.
const (
	minBackoff = 50 * time.Millisecond
	maxBackoff = 500 * time.Millisecond
)

// maxBody bounds how much of an answer the client reads.
const maxBody = 1 << 20

// ErrClosed is returned by Run on a closed Client.
var ErrClosed = errors.New("sdk: client closed")

// Config is the explicit configuration of a Client. FromEnv builds one from
// the environment the LSPM gives a process; tests build it by hand.
type Config struct {
	// ProcessID, Token and URL are required: the process's id, its process
	// token and the LSPM's base URL (e.g. http://127.0.0.1:7701).
	ProcessID string
	Token     string
	URL       string

	Params    map[string]any // the spawn's params; nil means none
	MachineID string
	Fleet     string
	Ports     map[string]int // allocated ports by lower-case name ("game")

	// HeartbeatPeriod is the period of the heartbeat loop; 0 means
	// DefaultHeartbeatPeriod.
	HeartbeatPeriod time.Duration
	// RequestTimeout bounds one HTTP request; 0 means DefaultRequestTimeout.
	// Ignored when HTTPClient is set.
	RequestTimeout time.Duration
	// HTTPClient replaces the client's own http.Client.
	HTTPClient *http.Client
	// Logger receives the heartbeat loop's failures and recoveries; nil
	// discards them.
	Logger *slog.Logger
	// OnState, when set, is called with the process each time a call
	// observes a state different from the last known one. It runs on the
	// goroutine of the call that observed the change (the heartbeat loop's
	// for heartbeats), must not block for long, and must not call Close.
	OnState func(api.Process)
}

// Validate reports a missing or malformed required field.
func (c Config) Validate() error {
	var missing []string
	if c.ProcessID == "" {
		missing = append(missing, "ProcessID")
	}
	if c.Token == "" {
		missing = append(missing, "Token")
	}
	if c.URL == "" {
		missing = append(missing, "URL")
	}
	if len(missing) > 0 {
		return fmt.Errorf("sdk: config: missing %s", strings.Join(missing, ", "))
	}
	u, err := url.Parse(c.URL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return fmt.Errorf("sdk: config: URL %q is not an http(s) base URL", c.URL)
	}
	if c.HeartbeatPeriod < 0 || c.RequestTimeout < 0 {
		return errors.New("sdk: config: negative duration")
	}
	return nil
}

// ConfigFromEnv reads the environment an LSPM gives a game server process
// (API.md, "What a game server process receives"): DEDI_PROCESS_ID,
// DEDI_PROCESS_TOKEN and DEDI_SDK_URL are required; DEDI_PARAMS (a JSON
// object), DEDI_MACHINE_ID, DEDI_FLEET, DEDI_PORT_<NAME> and
// DEDI_HEARTBEAT_MS (milliseconds, default 2000) are optional.
func ConfigFromEnv() (Config, error) {
	return configFromEnviron(os.Environ())
}

func configFromEnviron(environ []string) (Config, error) {
	env := make(map[string]string, len(environ))
	for _, kv := range environ {
		if k, v, ok := strings.Cut(kv, "="); ok {
			env[k] = v
		}
	}
	var missing []string
	for _, k := range []string{api.EnvProcessID, api.EnvProcessToken, api.EnvSDKURL} {
		if env[k] == "" {
			missing = append(missing, k)
		}
	}
	if len(missing) > 0 {
		return Config{}, fmt.Errorf("sdk: missing environment variable %s (is this process started by a dedi LSPM?)",
			strings.Join(missing, ", "))
	}
	cfg := Config{
		ProcessID: env[api.EnvProcessID],
		Token:     env[api.EnvProcessToken],
		URL:       env[api.EnvSDKURL],
		MachineID: env[api.EnvMachineID],
		Fleet:     env[api.EnvFleet],
		Params:    map[string]any{},
		Ports:     map[string]int{},
	}
	if s := env[api.EnvParams]; s != "" {
		if err := json.Unmarshal([]byte(s), &cfg.Params); err != nil {
			return Config{}, fmt.Errorf("sdk: %s is not a JSON object: %w", api.EnvParams, err)
		}
		if cfg.Params == nil { // the JSON literal null
			cfg.Params = map[string]any{}
		}
	}
	for k, v := range env {
		name, ok := strings.CutPrefix(k, api.EnvPortPrefix)
		if !ok || name == "" {
			continue
		}
		port, err := strconv.Atoi(v)
		if err != nil || port <= 0 || port > 65535 {
			return Config{}, fmt.Errorf("sdk: %s=%q is not a port", k, v)
		}
		cfg.Ports[strings.ToLower(name)] = port
	}
	if s := env[api.EnvHeartbeatMS]; s != "" {
		ms, err := strconv.Atoi(s)
		if err != nil || ms <= 0 {
			return Config{}, fmt.Errorf("sdk: %s=%q is not a positive number of milliseconds", api.EnvHeartbeatMS, s)
		}
		cfg.HeartbeatPeriod = time.Duration(ms) * time.Millisecond
	}
	return cfg, cfg.Validate()
}

// FromEnv returns a Client configured from the environment (ConfigFromEnv).
// To set OnState or Logger, use ConfigFromEnv, change the Config, then New.
func FromEnv() (*Client, error) {
	cfg, err := ConfigFromEnv()
	if err != nil {
		return nil, err
	}
	return New(cfg)
}

// Client talks to the process's LSPM. Its methods are safe for concurrent
// use.
type Client struct {
	cfg  Config // immutable after New
	base string // URL of this process: <URL>/v1/processes/<id>
	hc   *http.Client
	log  *slog.Logger

	ctx    context.Context // canceled by Close; ends the heartbeat loop
	cancel context.CancelFunc
	wg     sync.WaitGroup // the heartbeat loop (Start's goroutine or Run)

	mu           sync.Mutex
	players      int
	playersSet   bool
	instances    int
	instancesSet bool
	state        string
	started      bool
	closed       bool
}

// New returns a Client for cfg. It does no I/O.
func New(cfg Config) (*Client, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.HeartbeatPeriod == 0 {
		cfg.HeartbeatPeriod = DefaultHeartbeatPeriod
	}
	if cfg.RequestTimeout == 0 {
		cfg.RequestTimeout = DefaultRequestTimeout
	}
	hc := cfg.HTTPClient
	if hc == nil {
		hc = &http.Client{
			Timeout: cfg.RequestTimeout,
			Transport: &http.Transport{
				// No proxy: the LSPM is on this machine's network.
				DialContext:           (&net.Dialer{Timeout: 2 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
				MaxIdleConns:          2,
				IdleConnTimeout:       30 * time.Second,
				ResponseHeaderTimeout: cfg.RequestTimeout,
			},
		}
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	cfg.Params = maps.Clone(cfg.Params)
	cfg.Ports = maps.Clone(cfg.Ports)
	ctx, cancel := context.WithCancel(context.Background())
	return &Client{
		cfg:    cfg,
		base:   strings.TrimRight(cfg.URL, "/") + "/v1/processes/" + url.PathEscape(cfg.ProcessID),
		hc:     hc,
		log:    log.With("process", cfg.ProcessID),
		ctx:    ctx,
		cancel: cancel,
	}, nil
}

// ID returns the process's id.
func (c *Client) ID() string { return c.cfg.ProcessID }

// MachineID returns the id of the machine the process runs on ("" if unknown).
func (c *Client) MachineID() string { return c.cfg.MachineID }

// Fleet returns the process's fleet ("" if none).
func (c *Client) Fleet() string { return c.cfg.Fleet }

// Params returns a shallow copy of the spawn's params (never nil).
func (c *Client) Params() map[string]any {
	if m := maps.Clone(c.cfg.Params); m != nil {
		return m
	}
	return map[string]any{}
}

// Port returns the allocated port of that name ("game"), case-insensitively.
func (c *Client) Port(name string) (int, bool) {
	p, ok := c.cfg.Ports[strings.ToLower(name)]
	return p, ok
}

// Ports returns a copy of the allocated ports by lower-case name (never nil).
func (c *Client) Ports() map[string]int {
	if m := maps.Clone(c.cfg.Ports); m != nil {
		return m
	}
	return map[string]int{}
}

// HeartbeatPeriod returns the period of the heartbeat loop.
func (c *Client) HeartbeatPeriod() time.Duration { return c.cfg.HeartbeatPeriod }

// SetPlayers sets the player count that the next heartbeats carry.
func (c *Client) SetPlayers(n int) {
	c.mu.Lock()
	c.players, c.playersSet = n, true
	c.mu.Unlock()
}

// SetInstances sets the game instance count that the next heartbeats carry.
func (c *Client) SetInstances(n int) {
	c.mu.Lock()
	c.instances, c.instancesSet = n, true
	c.mu.Unlock()
}

// State returns the last process state an answer of the LSPM carried, ""
// before the first one.
func (c *Client) State() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.state
}

// Ready tells the LSPM that the process is ready for players
// (starting -> ready) and returns the process. It retries with backoff on
// network errors and 5xx answers until ctx is done, so it rides out an LSPM
// that is not up yet or restarting. An error answer other than 5xx is
// returned at once as an *api.Problem.
func (c *Client) Ready(ctx context.Context) (*api.Process, error) {
	return c.retry(ctx, http.MethodPost, "/ready")
}

// Shutdown announces that the process is ending; it must then exit within
// the LSPM's grace period. Retries like Ready. The process may be nil when
// the LSPM answers without a body.
func (c *Client) Shutdown(ctx context.Context) (*api.Process, error) {
	return c.retry(ctx, http.MethodPost, "/shutdown")
}

// Heartbeat sends one heartbeat carrying the player and instance counts last
// set (those never set are left out) and returns the process. It does not
// retry. An error answer is returned as an *api.Problem.
func (c *Client) Heartbeat(ctx context.Context) (*api.Process, error) {
	var hb api.Heartbeat
	c.mu.Lock()
	if c.playersSet {
		n := c.players
		hb.Players = &n
	}
	if c.instancesSet {
		n := c.instances
		hb.Instances = &n
	}
	c.mu.Unlock()
	p, _, err := c.do(ctx, http.MethodPost, "/heartbeat", hb)
	return p, err
}

// Process reads the process object (GET /v1/processes/{id}). It does not
// retry. An error answer is returned as an *api.Problem.
func (c *Client) Process(ctx context.Context) (*api.Process, error) {
	p, _, err := c.do(ctx, http.MethodGet, "", nil)
	return p, err
}

// Start runs the heartbeat loop (see Run) in a goroutine that Close stops
// and waits for. Calls after the first, or after Close, do nothing.
func (c *Client) Start(ctx context.Context) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.started || c.closed {
		return
	}
	c.started = true
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		_ = c.loop(ctx)
	}()
}

// Run sends a heartbeat now and then every heartbeat period until ctx is
// done or Close is called; it returns ctx.Err() or nil after Close, and
// ErrClosed at once on a closed Client. Failures (an LSPM restarting, a
// refused connection) do not stop it: it logs the first failure and the
// recovery and keeps going. Close waits for Run to return.
func (c *Client) Run(ctx context.Context) error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return ErrClosed
	}
	c.wg.Add(1) // under mu, so never after Close's Wait began
	c.mu.Unlock()
	defer c.wg.Done()
	return c.loop(ctx)
}

func (c *Client) loop(parent context.Context) error {
	ctx, cancel := context.WithCancel(parent)
	defer cancel()
	defer context.AfterFunc(c.ctx, cancel)()

	t := time.NewTicker(c.cfg.HeartbeatPeriod)
	defer t.Stop()
	failures := 0
	for ctx.Err() == nil {
		_, err := c.Heartbeat(ctx)
		switch {
		case ctx.Err() != nil:
		case err != nil:
			if failures == 0 {
				c.log.Warn("heartbeat failed; retrying every period", "err", err)
			}
			failures++
		case failures > 0:
			c.log.Info("heartbeat recovered", "failures", failures)
			failures = 0
		}
		select {
		case <-ctx.Done():
		case <-t.C:
		}
	}
	if c.ctx.Err() != nil {
		return nil // closed
	}
	return parent.Err()
}

// Close stops the heartbeat loop, waits for it, and releases idle
// connections. It is safe to call more than once. It does not tell the LSPM
// anything: call Shutdown for that.
func (c *Client) Close() error {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	c.cancel()
	c.wg.Wait()
	c.hc.CloseIdleConnections()
	return nil
}

// retry repeats do with backoff while its failure is retryable and ctx lives.
func (c *Client) retry(ctx context.Context, method, suffix string) (*api.Process, error) {
	delay := minBackoff
	for {
		p, retryable, err := c.do(ctx, method, suffix, nil)
		if err == nil || !retryable {
			return p, err
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("sdk %s: gave up: %w (last error: %w)", strings.TrimPrefix(suffix, "/"), ctx.Err(), err)
		case <-t.C:
		}
		delay = min(2*delay, maxBackoff)
	}
}

// do makes one request to the process's URL plus suffix and decodes a
// process from a 2xx answer. retryable says whether the failure was a
// network error or a 5xx answer.
func (c *Client) do(ctx context.Context, method, suffix string, body any) (p *api.Process, retryable bool, err error) {
	op := strings.TrimPrefix(suffix, "/")
	if op == "" {
		op = "get process"
	}
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, false, fmt.Errorf("sdk %s: %w", op, err)
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+suffix, rd)
	if err != nil {
		return nil, false, fmt.Errorf("sdk %s: %w", op, err)
	}
	req.Header.Set("Authorization", "Bearer "+c.cfg.Token)
	req.Header.Set("Accept", "application/json")
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return nil, ctx.Err() == nil, fmt.Errorf("sdk %s: %w", op, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxBody))
	if err != nil {
		return nil, ctx.Err() == nil, fmt.Errorf("sdk %s: read answer: %w", op, err)
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return nil, resp.StatusCode >= 500, problemOf(resp.StatusCode, data)
	}
	if len(bytes.TrimSpace(data)) == 0 {
		return nil, false, nil
	}
	p = new(api.Process)
	if err := json.Unmarshal(data, p); err != nil {
		return nil, false, fmt.Errorf("sdk %s: decode answer: %w", op, err)
	}
	c.observe(*p)
	return p, false, nil
}

// observe remembers p's state and calls OnState when it changed.
func (c *Client) observe(p api.Process) {
	if p.State == "" {
		return
	}
	c.mu.Lock()
	changed := p.State != c.state
	c.state = p.State
	c.mu.Unlock()
	if changed && c.cfg.OnState != nil {
		c.cfg.OnState(p)
	}
}

// problemOf decodes an error answer; a body that is not a problem document
// becomes one built from the status.
func problemOf(status int, data []byte) *api.Problem {
	var p api.Problem
	if err := json.Unmarshal(data, &p); err == nil && p.Code != "" {
		if p.Status == 0 {
			p.Status = status
		}
		return &p
	}
	p = api.Problem{
		Type:   "about:blank",
		Title:  http.StatusText(status),
		Status: status,
		Detail: strings.TrimSpace(string(data[:min(len(data), 200)])),
		Code:   codeOf(status),
	}
	return &p
}

// codeOf maps a status to the contract's problem code for answers that
// carry none (e.g. from a proxy).
func codeOf(status int) string {
	switch status {
	case http.StatusBadRequest:
		return api.CodeInvalid
	case http.StatusUnauthorized:
		return api.CodeUnauthorized
	case http.StatusForbidden:
		return api.CodeForbidden
	case http.StatusNotFound:
		return api.CodeNotFound
	case http.StatusMethodNotAllowed:
		return api.CodeMethodNotAllowed
	case http.StatusRequestEntityTooLarge:
		return api.CodeTooLarge
	case http.StatusUnsupportedMediaType:
		return api.CodeUnsupportedMedia
	case http.StatusGatewayTimeout:
		return api.CodeTimeout
	}
	if status >= 500 {
		return api.CodeInternal
	}
	return "http_" + strconv.Itoa(status)
}
