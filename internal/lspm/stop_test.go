package lspm

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"os"
	"testing"
	"time"

	"dedi.dev/dedi/api"
	"dedi.dev/dedi/internal/clock"
)

// A stopping LSPM ends a followed log at once and returns only once its
// handler has: no handler of the API runs after Run.
func TestStopEndsFollowedLogs(t *testing.T) {
	cfg := Config{Listen: "127.0.0.1:0", DataDir: t.TempDir(), MachineID: "m", Insecure: true,
		PortMin: 47600, PortMax: 47609, ShimPath: "/bin/false", Grace: 5 * time.Second}
	a, err := New(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)), clock.NewFake(time.Now().UTC()))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan struct{})
	go func() { defer close(ran); _ = a.Run(ctx) }()
	defer func() { cancel(); <-ran }()

	game := sleeper(t)
	var plan spawnPlan
	var rerr error
	if err := a.do(func(tb *table) {
		plan, rerr = tb.reserve("p-1", api.SpawnRequest{}, []string{"sleep"}, "hash", nil)
	}); err != nil || rerr != nil {
		t.Fatal(err, rerr)
	}
	if err := os.Mkdir(plan.dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := a.do(func(tb *table) { tb.commit("p-1", game) }); err != nil {
		t.Fatal(err)
	}

	resp, err := http.Get("http://" + a.Addr() + "/v1/processes/p-1/logs?follow=true")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("follow: %d", resp.StatusCode)
	}
	const handler = "lspm.(*Agent).getLogs"
	if n := goroutinesIn(handler); n != 1 {
		t.Fatalf("%d log handlers running, want the one following", n)
	}

	start := time.Now()
	cancel()
	select {
	case <-ran:
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return")
	}
	// Ending the follow takes no part of apiStopWait.
	if took := time.Since(start); took > apiStopWait/2 {
		t.Errorf("Run took %v to return with a followed log open (apiStopWait %v)", took, apiStopWait)
	}
	if n := goroutinesIn(handler); n != 0 {
		t.Errorf("%d log handlers still running after Run returned", n)
	}
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		t.Logf("the follow ended with %v", err)
	}
}
