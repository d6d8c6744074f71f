package rest

import (
	"bytes"
	"encoding/json"
	"errors"
	"testing"

	"dedi.dev/dedi/api"
)

// decodeSeeds are bodies a client could send: valid ones of each type and
// the usual ways to get JSON wrong.
var decodeSeeds = []string{
	``,
	` `,
	`{}`,
	`null`,
	`[]`,
	`"x"`,
	`{"command": [`,
	`{} {}`,
	`{} x`,
	`{"nope": 1}`,
	"\ufeff{}",
	`{"id": "p-1", "fleet": "demo", "command": ["/opt/game/server", "--map", "arena"], "params": {"mode": "ranked", "n": 1.5, "deep": {"a": [1, null, true]}}, "env": {"A": "b"}, "labels": {"region": "eu"}, "ports": ["game", "query"], "health": {"periodSeconds": 2, "failureThreshold": 3, "startTimeoutSeconds": 60}, "sdk": "dedi", "memoryLimitBytes": 1048576}`,
	`{"ports": []}`,
	`{"params": {"big": 1e308, "neg": -0, "tiny": 5e-324}}`,
	`{"memoryLimitBytes": 9223372036854775807}`,
	`{"memoryLimitBytes": 9223372036854775808}`,
	`{"PORTS": ["game"]}`,
	`{"id": "a\u0000b", "env": {"A": "\ud800"}}`,
	`{"players": 3, "instances": 1}`,
	`{"players": null}`,
	`{"players": -1}`,
	`{"players": 1.5}`,
	`{"machineId": "m", "state": "partial", "seq": 18446744073709551615, "maxProcesses": 4, "processes": [{"id": "p", "machineId": "m", "state": "ready", "pid": 1, "command": ["x"], "params": {}, "labels": {}, "address": "127.0.0.1", "ports": {"game": 30001}, "players": 0, "health": {}, "createdAt": "2024-01-02T03:04:05.123456789Z", "readyAt": null, "lastHeartbeatAt": null, "endedAt": "2024-01-02T03:04:05+02:00", "exit": {"code": 139, "signal": "SIGSEGV", "reason": "crashed", "logTail": ["a"]}}], "hardware": {"cpuModel": "x", "cpus": 2, "memoryBytes": 1, "kernel": "k", "hostname": "h"}, "startedAt": "2024-01-02T03:04:05Z", "at": "0001-01-01T00:00:00Z"}`,
	`{"startedAt": "9999-12-31T23:59:59.999999999-23:59"}`,
	`{"at": "2024-02-30T00:00:00Z"}`,
	`{"processes": [{"": ""}]}`,
}

// FuzzDecodeBytes: DecodeBytes never panics on any body, refuses with an
// Invalid *Error only, and what it accepts survives a round trip:
// marshalling the value and decoding it again gives the same value.
func FuzzDecodeBytes(f *testing.F) {
	for _, s := range decodeSeeds {
		f.Add([]byte(s), false)
		f.Add([]byte(s), true)
	}
	f.Fuzz(func(t *testing.T, body []byte, optional bool) {
		roundTrip(t, body, optional, func() any { return new(api.SpawnRequest) })
		roundTrip(t, body, optional, func() any { return new(api.Heartbeat) })
		roundTrip(t, body, optional, func() any { return new(api.Status) })
	})
}

func roundTrip(t *testing.T, body []byte, optional bool, newV func() any) {
	t.Helper()
	v := newV()
	if err := DecodeBytes(body, v, optional); err != nil {
		var e *Error
		if !errors.As(err, &e) || e.Kind != Invalid || e.Code == "" {
			t.Fatalf("%T: error %#v is not an Invalid *Error", v, err)
		}
		return
	}
	first, err := json.Marshal(v)
	if err != nil {
		t.Fatalf("%T: marshal what was decoded from %q: %v", v, body, err)
	}
	again := newV()
	if err := DecodeBytes(first, again, false); err != nil {
		t.Fatalf("%T: decode of the re-marshalled %q (from %q): %v", v, first, body, err)
	}
	second, err := json.Marshal(again)
	if err != nil {
		t.Fatalf("%T: marshal again: %v", v, err)
	}
	if !bytes.Equal(first, second) {
		t.Fatalf("%T: round trip changed the value:\nfirst  %s\nsecond %s\nbody %q", v, first, second, body)
	}
}
