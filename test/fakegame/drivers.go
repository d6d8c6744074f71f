package fakegame

// Drivers: game servers that follow a script instead of misbehaving, chosen
// with -driver NAME.
//
//   - conformance: the Go SDK's driver of the SDK conformance sequence
//     (test/e2e/conformance_test.go; the protocol is in that file's comment).
//   - agones-rest-conformance: the same sequence through Agones' REST SDK
//     (players through alpha player tracking).
//   - agones-rest-docs: makes the calls Agones' REST documentation shows,
//     one after the other, printing "docs: METHOD PATH STATUS BODY" for
//     each, then pings health until the control file says shutdown.
//   - agones-grpc-go-plain: uses Agones' gRPC SDK the way the official Go
//     SDK (agones.dev/agones/sdks/go) does: one connection to
//     localhost:$AGONES_SDK_GRPC_PORT, one Health stream opened at start
//     and never reopened, ready, a ping every 100 ms, and shutdown (with
//     retries) when the control file says so. Prints "plain: ready" and
//     "plain: shutdown".

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"dedi.dev/dedi/internal/agonespb"
	sdk "dedi.dev/dedi/sdk/go"
)

// EnvControl names the control file of the drivers.
const EnvControl = "CONFORMANCE_CONTROL"

// Control is the content of the control file.
type Control struct {
	Players  int  `json:"players"`
	Shutdown bool `json:"shutdown"`
}

// readControl reads the control file; a missing or unparsable file keeps
// the previous values.
func readControl(path string, prev Control) Control {
	raw, err := os.ReadFile(path)
	if err != nil {
		return prev
	}
	var c Control
	if json.Unmarshal(raw, &c) != nil || c.Players < 0 {
		return prev
	}
	return c
}

const driverTick = 100 * time.Millisecond

func runDriver(name string, stdout, stderr io.Writer) int {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	control := os.Getenv(EnvControl)
	if control == "" {
		fmt.Fprintln(stderr, "driver:", EnvControl, "is not set")
		return 2
	}
	switch name {
	case "conformance":
		return goConformance(ctx, control, stdout, stderr)
	case "agones-rest-conformance":
		return agonesRESTConformance(ctx, control, stdout, stderr)
	case "agones-rest-docs":
		return agonesRESTDocs(ctx, control, stdout, stderr)
	case "agones-grpc-go-plain":
		return agonesGRPCGoPlain(ctx, control, stdout, stderr)
	}
	fmt.Fprintf(stderr, "driver: unknown driver %q\n", name)
	return 2
}

// goConformance drives the conformance sequence with the Go SDK.
func goConformance(ctx context.Context, control string, stdout, stderr io.Writer) int {
	cfg, err := sdk.ConfigFromEnv()
	if err != nil {
		fmt.Fprintln(stderr, "driver:", err)
		return 2
	}
	cfg.Logger = slog.New(slog.NewTextHandler(stderr, nil))
	client, err := sdk.New(cfg)
	if err != nil {
		fmt.Fprintln(stderr, "driver:", err)
		return 2
	}
	defer client.Close()
	// Ready retries on its own while the LSPM is away.
	if _, err := client.Ready(ctx); err != nil {
		fmt.Fprintln(stderr, "driver: ready:", err)
		return 1
	}
	fmt.Fprintln(stdout, "conformance: ready")
	var c Control
	t := time.NewTicker(driverTick)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return 0
		case <-t.C:
		}
		c = readControl(control, c)
		call, cancel := context.WithTimeout(ctx, time.Second)
		if c.Shutdown {
			_, err := client.Shutdown(call)
			cancel()
			if err != nil {
				fmt.Fprintln(stderr, "driver: shutdown:", err)
				continue
			}
			fmt.Fprintln(stdout, "conformance: shutdown")
			return 0
		}
		client.SetPlayers(c.Players)
		if _, err := client.Heartbeat(call); err != nil {
			fmt.Fprintln(stderr, "driver: heartbeat:", err)
		}
		cancel()
	}
}

// agonesREST is a client of Agones' REST SDK, as a game would write one:
// plain HTTP to localhost:$AGONES_SDK_HTTP_PORT, JSON bodies.
type agonesREST struct {
	base string
	hc   *http.Client
}

func newAgonesREST() (*agonesREST, error) {
	port := os.Getenv("AGONES_SDK_HTTP_PORT")
	if _, err := strconv.Atoi(port); err != nil {
		return nil, fmt.Errorf("AGONES_SDK_HTTP_PORT %q is not a port", port)
	}
	return &agonesREST{base: "http://localhost:" + port, hc: &http.Client{Timeout: 2 * time.Second}}, nil
}

// call makes one request; it returns the status and the body.
func (c *agonesREST) call(ctx context.Context, method, path, body string) (int, []byte, error) {
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, rd)
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.hc.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return resp.StatusCode, bytes.TrimSpace(b), err
}

// ok makes a call that must answer 200.
func (c *agonesREST) ok(ctx context.Context, method, path, body string) ([]byte, error) {
	code, b, err := c.call(ctx, method, path, body)
	if err == nil && code != http.StatusOK {
		err = fmt.Errorf("%s %s: %d %s", method, path, code, b)
	}
	return b, err
}

// agonesRESTConformance drives the conformance sequence through Agones'
// REST SDK: ready, health pings, players as alpha player tracking.
func agonesRESTConformance(ctx context.Context, control string, stdout, stderr io.Writer) int {
	c, err := newAgonesREST()
	if err != nil {
		fmt.Fprintln(stderr, "driver:", err)
		return 2
	}
	t := time.NewTicker(driverTick)
	defer t.Stop()
	for {
		if _, err := c.ok(ctx, "POST", "/ready", "{}"); err == nil {
			break
		} else {
			fmt.Fprintln(stderr, "driver: ready:", err)
		}
		select {
		case <-ctx.Done():
			return 0
		case <-t.C:
		}
	}
	fmt.Fprintln(stdout, "conformance: ready")
	var ctl Control
	for {
		select {
		case <-ctx.Done():
			return 0
		case <-t.C:
		}
		ctl = readControl(control, ctl)
		if ctl.Shutdown {
			if _, err := c.ok(ctx, "POST", "/shutdown", "{}"); err != nil {
				fmt.Fprintln(stderr, "driver: shutdown:", err)
				continue
			}
			fmt.Fprintln(stdout, "conformance: shutdown")
			return 0
		}
		if _, err := c.ok(ctx, "POST", "/health", "{}"); err != nil {
			fmt.Fprintln(stderr, "driver: health:", err)
		}
		if err := c.reconcilePlayers(ctx, ctl.Players); err != nil {
			fmt.Fprintln(stderr, "driver: players:", err)
		}
	}
}

// reconcilePlayers connects player-0 .. player-(n-1) and disconnects
// everyone else, from the list the SDK keeps.
func (c *agonesREST) reconcilePlayers(ctx context.Context, n int) error {
	b, err := c.ok(ctx, "GET", "/alpha/player/connected", "")
	if err != nil {
		return err
	}
	var list struct {
		List []string `json:"list"`
	}
	if err := json.Unmarshal(b, &list); err != nil {
		return fmt.Errorf("connected players %q: %w", b, err)
	}
	want := map[string]bool{}
	for i := 0; i < n; i++ {
		want["player-"+strconv.Itoa(i)] = true
	}
	have := map[string]bool{}
	for _, id := range list.List {
		have[id] = true
		if !want[id] {
			if _, err := c.ok(ctx, "POST", "/alpha/player/disconnect", `{"playerID": "`+id+`"}`); err != nil {
				return err
			}
		}
	}
	for i := 0; i < n; i++ {
		if id := "player-" + strconv.Itoa(i); !have[id] {
			if _, err := c.ok(ctx, "POST", "/alpha/player/connect", `{"playerID": "`+id+`"}`); err != nil {
				return err
			}
		}
	}
	return nil
}

// agonesRESTDocs makes the calls of Agones' REST documentation, printing
// each answer, then pings health until the control file says shutdown.
func agonesRESTDocs(ctx context.Context, control string, stdout, stderr io.Writer) int {
	c, err := newAgonesREST()
	if err != nil {
		fmt.Fprintln(stderr, "driver:", err)
		return 2
	}
	fmt.Fprintf(stdout, "docs: ports http=%s grpc=%s\n", os.Getenv("AGONES_SDK_HTTP_PORT"), os.Getenv("AGONES_SDK_GRPC_PORT"))
	do := func(method, path, body string) {
		code, b, err := c.call(ctx, method, path, body)
		if err != nil {
			fmt.Fprintf(stdout, "docs: %s %s error %v\n", method, path, err)
			return
		}
		fmt.Fprintf(stdout, "docs: %s %s %d %s\n", method, path, code, b)
	}
	// In the order of Agones' REST page, with its bodies.
	do("POST", "/ready", "{}")
	do("POST", "/health", "{}")
	do("PUT", "/metadata/label", `{"key": "foo", "value": "bar"}`)
	do("PUT", "/metadata/annotation", `{"key": "foo", "value": "bar"}`)
	do("GET", "/gameserver", "")
	do("POST", "/alpha/player/connect", `{"playerID": "uzh7i"}`)
	do("PUT", "/alpha/player/capacity", `{"count": 5}`)
	do("GET", "/alpha/player/capacity", `{}`)
	do("GET", "/alpha/player/count", "")
	do("GET", "/alpha/player/connected/uzh7i", "")
	do("GET", "/alpha/player/connected", "")
	do("POST", "/alpha/player/connect", `{"playerID": "3zh7i"}`)
	do("POST", "/alpha/player/disconnect", `{"playerID": "3zh7i"}`)
	do("POST", "/reserve", `{"seconds": "5"}`)
	do("GET", "/gameserver", "")
	do("POST", "/allocate", "{}")
	// One line of the watch stream: the GameServer as it is now.
	if req, err := http.NewRequestWithContext(ctx, "GET", c.base+"/watch/gameserver", nil); err == nil {
		req.Header.Set("Content-Type", "application/json")
		if resp, err := http.DefaultClient.Do(req); err != nil {
			fmt.Fprintf(stdout, "docs: GET /watch/gameserver error %v\n", err)
		} else {
			line, _ := bufio.NewReader(resp.Body).ReadBytes('\n')
			resp.Body.Close()
			fmt.Fprintf(stdout, "docs: GET /watch/gameserver %d %s\n", resp.StatusCode, bytes.TrimSpace(line))
		}
	}
	// Another process's Agones port, if the test names one: refused.
	if port := os.Getenv("AGONES_OTHER_HTTP_PORT"); port != "" {
		other := &agonesREST{base: "http://localhost:" + port, hc: c.hc}
		code, b, err := other.call(ctx, "POST", "/ready", "{}")
		fmt.Fprintf(stdout, "docs: other POST /ready %d %s %v\n", code, b, err)
	}
	fmt.Fprintln(stdout, "docs: done")
	var ctl Control
	t := time.NewTicker(driverTick)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return 0
		case <-t.C:
		}
		if ctl = readControl(control, ctl); ctl.Shutdown {
			do("POST", "/shutdown", "{}")
			return 0
		}
		if _, err := c.ok(ctx, "POST", "/health", "{}"); err != nil {
			fmt.Fprintln(stderr, "driver: health:", err)
		}
	}
}

// agonesGRPCGoPlain behaves as a game on the official Agones Go SDK: its
// NewSDK dials localhost and opens the Health stream once; Health() sends
// on that stream and never reopens it.
func agonesGRPCGoPlain(ctx context.Context, control string, stdout, stderr io.Writer) int {
	conn, err := grpc.NewClient("localhost:"+os.Getenv("AGONES_SDK_GRPC_PORT"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fmt.Fprintln(stderr, "driver:", err)
		return 2
	}
	defer conn.Close()
	client := agonespb.NewSDKClient(conn)
	health, err := client.Health(ctx)
	if err != nil {
		fmt.Fprintln(stderr, "driver: health stream:", err)
		return 1
	}
	if _, err := client.Ready(ctx, &agonespb.Empty{}, grpc.WaitForReady(true)); err != nil {
		fmt.Fprintln(stderr, "driver: ready:", err)
		return 1
	}
	fmt.Fprintln(stdout, "plain: ready")
	var ctl Control
	t := time.NewTicker(driverTick)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return 0
		case <-t.C:
		}
		if ctl = readControl(control, ctl); ctl.Shutdown {
			call, cancel := context.WithTimeout(ctx, time.Second)
			_, err := client.Shutdown(call, &agonespb.Empty{})
			cancel()
			if err != nil {
				fmt.Fprintln(stderr, "driver: shutdown:", err)
				continue
			}
			fmt.Fprintln(stdout, "plain: shutdown")
			return 0
		}
		if err := health.Send(&agonespb.Empty{}); err != nil {
			fmt.Fprintln(stderr, "driver: health:", err)
		}
	}
}
