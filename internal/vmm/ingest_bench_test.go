package vmm

import (
	"encoding/json"
	"fmt"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"dedi.dev/dedi/api"
)

// BenchmarkReportIngest is the VMM's cost of one status report of 32
// ready processes, from the request to the answer, on the steady path:
// the processes are known, their player counts and heartbeats move. It
// runs the real handler and loop (no network); test/e2e's
// BenchmarkStatusIngest measures the whole VMM under 10,000 machines.
func BenchmarkReportIngest(b *testing.B) {
	tv := newTestVMM(b)
	id := bootOne(b, tv)
	token := tv.prov.token(id)
	now := time.Now().UTC()
	st := api.Status{MachineID: id, State: api.LoadFull, MaxProcesses: 32, At: now,
		Hardware: api.Hardware{CPUModel: "Xeon", CPUs: 2, MemoryBytes: 1 << 34, Kernel: "6.1", Hostname: "h"}}
	for i := 0; i < 32; i++ {
		st.Processes = append(st.Processes, api.Process{ID: fmt.Sprintf("%s-p%03d", id, i), Fleet: "f", MachineID: id, State: api.StateReady,
			PID: 1000 + i, Command: []string{"/opt/game/server", "--map", "arena"}, Params: map[string]any{"mode": "ranked"},
			Labels: map[string]string{"region": "eu"}, Address: "127.0.0.1", Ports: map[string]int{"game": 30000 + i},
			SDK: api.SDKDedi, Health: api.Health{PeriodSeconds: 2, FailureThreshold: 3, StartTimeoutSeconds: 60},
			RSSBytes: 200 << 20, CreatedAt: now, ReadyAt: &now, LastHeartbeatAt: &now})
	}
	bodies := make([][]byte, 16)
	for i := range bodies {
		hb := now.Add(time.Duration(i) * time.Second)
		for j := range st.Processes {
			st.Processes[j].Players = (i + j) % 8
			st.Processes[j].LastHeartbeatAt = &hb
		}
		bodies[i], _ = json.Marshal(st)
	}
	send := func(seq uint64, body []byte) {
		// The seq is the first field's value: patch it without re-encoding.
		s := strings.Replace(string(body), `"seq":0`, fmt.Sprintf(`"seq":%d`, seq), 1)
		r := httptest.NewRequest("POST", "/v1/machines/"+id+"/status", strings.NewReader(s))
		r.Header.Set("Authorization", "Bearer "+token)
		w := httptest.NewRecorder()
		tv.h.ServeHTTP(w, r)
		if w.Code != 200 || !strings.Contains(w.Body.String(), `"applied":true`) {
			b.Fatalf("report %d: %d %s", seq, w.Code, w.Body)
		}
	}
	send(2, bodies[0]) // adopts the processes
	b.SetBytes(int64(len(bodies[0])))
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		send(uint64(3+i), bodies[i%len(bodies)])
	}
}
