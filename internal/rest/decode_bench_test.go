package rest

import (
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"dedi.dev/dedi/api"
)

// reportBody is a status report of 32 ready processes, as an LSPM sends it.
func reportBody(b *testing.B) []byte {
	st := api.Status{MachineID: "m-1", State: api.LoadFull, Seq: 42, MaxProcesses: 32, At: time.Now(),
		Hardware: api.Hardware{CPUModel: "Xeon", CPUs: 2, MemoryBytes: 1 << 34, Kernel: "6.1", Hostname: "h"}}
	now := time.Now()
	for i := 0; i < 32; i++ {
		st.Processes = append(st.Processes, api.Process{ID: fmt.Sprintf("p-%d", i), MachineID: "m-1", State: api.StateReady,
			PID: 1000 + i, Command: []string{"/opt/game/server", "--port", "30000"}, Params: map[string]any{"map": "arena"},
			Labels: map[string]string{"region": "eu"}, Address: "10.0.0.1", Ports: map[string]int{"game": 30000 + i},
			Players: i % 8, CreatedAt: now, ReadyAt: &now, LastHeartbeatAt: &now})
	}
	raw, err := json.Marshal(st)
	if err != nil {
		b.Fatal(err)
	}
	return raw
}

// BenchmarkDecodeStatus is the strict decode of a status report, the VMM's
// hottest decoder; plain json.Unmarshal is the baseline.
func BenchmarkDecodeStatus(b *testing.B) {
	raw := reportBody(b)
	b.Run("strict", func(b *testing.B) {
		b.SetBytes(int64(len(raw)))
		for i := 0; i < b.N; i++ {
			var st api.Status
			if err := DecodeBytes(raw, &st, false); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("unmarshal", func(b *testing.B) {
		b.SetBytes(int64(len(raw)))
		for i := 0; i < b.N; i++ {
			var st api.Status
			if err := json.Unmarshal(raw, &st); err != nil {
				b.Fatal(err)
			}
		}
	})
}
