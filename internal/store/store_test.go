package store

import (
	"fmt"
	"path/filepath"
	"testing"
)

func TestApplyLoadAndSurviveReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "vmm.db")
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	ops := []Op{
		{Table: Fleets, Key: "demo", Body: []byte(`{"name":"demo"}`)},
		{Table: Machines, Key: "m-1", Fleet: "demo", State: "ready", Body: []byte(`{"id":"m-1"}`)},
		{Table: Processes, Key: "p-1", Fleet: "demo", Machine: "m-1", State: "ready", Body: []byte(`{"id":"p-1"}`)},
		{Table: Processes, Key: "p-2", Fleet: "demo", Machine: "m-1", State: "crashed", Ended: true, Body: []byte(`{"id":"p-2"}`)},
		{Table: Events, Seq: 1, Body: []byte(`{"type":"x"}`)},
		{Table: Events, Seq: 2, Body: []byte(`{"type":"y"}`)},
		{Table: Meta, Key: "admin", Body: []byte("hash")},
	}
	if err := s.Apply(ops); err != nil {
		t.Fatal(err)
	}
	// An update and a delete.
	if err := s.Apply([]Op{
		{Table: Processes, Key: "p-1", Fleet: "demo", Machine: "m-1", State: "exited", Ended: true, Body: []byte(`{"id":"p-1","state":"exited"}`)},
		{Table: Fleets, Key: "demo", Delete: true},
	}); err != nil {
		t.Fatal(err)
	}
	s.Close()

	s, err = Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	snap, err := s.Load()
	if err != nil {
		t.Fatal(err)
	}
	if len(snap.Fleets) != 0 || len(snap.Machines) != 1 || len(snap.Processes) != 2 || snap.Meta["admin"] != "hash" || snap.LastEventSeq != 2 {
		t.Fatalf("snapshot %+v", snap)
	}
	if string(snap.Processes[0].Body) != `{"id":"p-1","state":"exited"}` {
		t.Fatalf("update lost: %s", snap.Processes[0].Body)
	}
	evs, err := s.Events(1, 10)
	if err != nil || len(evs) != 1 || string(evs[0].Body) != `{"type":"y"}` {
		t.Fatalf("events %v %v", evs, err)
	}
}

func TestApplyIsAllOrNothing(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), "vmm.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	err = s.Apply([]Op{
		{Table: Fleets, Key: "a", Body: []byte(`{}`)},
		{Table: Events, Seq: 1, Body: []byte(`{}`)},
		{Table: Events, Seq: 1, Body: []byte(`{}`)}, // duplicate key: fails
	})
	if err == nil {
		t.Fatal("duplicate event seq accepted")
	}
	snap, _ := s.Load()
	if len(snap.Fleets) != 0 || snap.LastEventSeq != 0 {
		t.Fatalf("a failed batch left %+v", snap)
	}
}

func TestPruneKeepsNewest(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), "vmm.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var ops []Op
	for i := 1; i <= 10; i++ {
		ops = append(ops, Op{Table: Events, Seq: int64(i), Body: []byte(`{}`)},
			Op{Table: Processes, Key: string(rune('a' + i)), Ended: i%2 == 0, Order: int64(i), Body: []byte(`{}`)})
	}
	if err := s.Apply(ops); err != nil {
		t.Fatal(err)
	}
	// In bounded steps: 2 rows of each kind at a time.
	steps := 0
	for more := true; more; steps++ {
		if more, err = s.Prune(3, 2, 2); err != nil {
			t.Fatal(err)
		}
		if steps > 10 {
			t.Fatal("prune never finishes")
		}
	}
	if steps != 4 { // 7 events: 2+2+2+1
		t.Errorf("pruned in %d steps, want 4", steps)
	}
	evs, _ := s.Events(0, 100)
	snap, _ := s.Load()
	if len(evs) != 3 || evs[0].Key != "8" || len(snap.Processes) != 5+2 {
		t.Fatalf("events %d (first %s), processes %d", len(evs), evs[0].Key, len(snap.Processes))
	}
}

// BenchmarkApply: one transaction of 32 process upserts and an event, as
// a report that adopts a machine's processes writes.
//
//	go test ./internal/store -run '^$' -bench Apply
func BenchmarkApply(b *testing.B) {
	s, err := Open(filepath.Join(b.TempDir(), "vmm.db"))
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	body := []byte(`{"id":"p","state":"ready","command":["/opt/game/server"],"labels":{"region":"eu"},"ports":{"game":30000}}`)
	ops := make([]Op, 33)
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		for j := 0; j < 32; j++ {
			ops[j] = Op{Table: Processes, Key: fmt.Sprintf("p-%d", j), Fleet: "f", Machine: "m", State: "ready",
				Order: int64(i*32 + j), Body: body}
		}
		ops[32] = Op{Table: Events, Seq: int64(i + 1), Body: body}
		if err := s.Apply(ops); err != nil {
			b.Fatal(err)
		}
	}
}
