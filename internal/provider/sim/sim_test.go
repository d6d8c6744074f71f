package sim

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"dedi.dev/dedi/internal/provider"
)

func spec(id, fleet string) provider.Spec {
	return provider.Spec{MachineID: id, Fleet: fleet, Token: "tok-" + id, VMMURL: "http://127.0.0.1:7700"}
}

func ids(ms []provider.Machine) string {
	var s []string
	for _, m := range ms {
		s = append(s, m.MachineID)
	}
	return strings.Join(s, ",")
}

func TestCreateListDeleteReopen(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s := New(dir)
	if s.Name() != "sim" {
		t.Errorf("Name() = %q", s.Name())
	}
	a, err := s.Create(ctx, spec("m-a", "f1"))
	if err != nil {
		t.Fatal(err)
	}
	if a.ProviderID != "m-a" || a.MachineID != "m-a" || a.Fleet != "f1" || a.Address != Address || a.LSPMURL != LSPMURL || a.CreatedAt.IsZero() {
		t.Errorf("Create returned %+v", a)
	}
	if _, err := s.Create(ctx, spec("m-a", "f1")); err == nil {
		t.Error("a second Create of m-a succeeded")
	}
	if _, err := s.Create(ctx, provider.Spec{MachineID: "m-x"}); err == nil {
		t.Error("Create without a token succeeded")
	}
	for _, id := range []string{"m-b", "m-c"} {
		if _, err := s.Create(ctx, spec(id, "f2")); err != nil {
			t.Fatal(err)
		}
	}
	if l, _ := s.List(ctx, "f2"); ids(l) != "m-b,m-c" {
		t.Errorf("List(f2) = %s", ids(l))
	}
	if err := s.Delete(ctx, "m-b"); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete(ctx, "m-b"); err != nil {
		t.Errorf("second Delete: %v", err)
	}
	if err := s.Delete(ctx, "never"); err != nil {
		t.Errorf("Delete of an unknown machine: %v", err)
	}
	if l, _ := s.List(ctx, ""); ids(l) != "m-a,m-c" {
		t.Errorf("List() = %s", ids(l))
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	// The log names every machine with its token, and a new Sim on the
	// dir sees what the first one left.
	f, err := os.Open(filepath.Join(dir, File))
	if err != nil {
		t.Fatal(err)
	}
	recs, err := ReadRecords(f)
	f.Close()
	if err != nil || len(recs) != 4 {
		t.Fatalf("ReadRecords: %d records, %v", len(recs), err)
	}
	if recs[0].MachineID != "m-a" || recs[0].Token != "tok-m-a" || recs[0].Fleet != "f1" || recs[3].MachineID != "m-b" || !recs[3].Deleted {
		t.Errorf("records: %+v", recs)
	}
	s2 := New(dir)
	defer s2.Close()
	if l, _ := s2.List(ctx, ""); ids(l) != "m-a,m-c" {
		t.Errorf("after reopen, List() = %s", ids(l))
	}
	if _, err := s2.Create(ctx, spec("m-b", "f2")); err != nil {
		t.Errorf("Create of a deleted id: %v", err)
	}
}

func TestConcurrentCreatesKeepLinesWhole(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s := New(dir)
	defer s.Close()
	const n = 200
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			if _, err := s.Create(ctx, spec(fmt.Sprintf("m-%03d", i), "f")); err != nil {
				t.Error(err)
			}
		}(i)
	}
	wg.Wait()
	f, err := os.Open(filepath.Join(dir, File))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	recs, err := ReadRecords(f)
	if err != nil || len(recs) != n {
		t.Fatalf("%d records, %v; want %d", len(recs), err, n)
	}
	if l, _ := s.List(ctx, "f"); len(l) != n {
		t.Errorf("List has %d machines, want %d", len(l), n)
	}
}

func TestReadRecordsSkipsTornLines(t *testing.T) {
	in := `{"machineId":"m-1","fleet":"f","token":"t1"}` + "\n" +
		`{"machineId":"m-2","fle` + "\n" +
		`{"machineId":"m-3","fleet":"f","token":"t3"}` + "\n" +
		`{"machineId":"m-4"`
	recs, err := ReadRecords(strings.NewReader(in))
	if err != nil || len(recs) != 2 || recs[0].MachineID != "m-1" || recs[1].Token != "t3" {
		t.Errorf("ReadRecords = %+v, %v", recs, err)
	}
}

func TestLSPMURLFile(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, URLFile), []byte("http://127.0.0.1:5555\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	s := New(dir)
	defer s.Close()
	m, err := s.Create(context.Background(), spec("m-a", "f"))
	if err != nil || m.LSPMURL != "http://127.0.0.1:5555" {
		t.Errorf("Create = %+v, %v; want LSPM URL http://127.0.0.1:5555", m, err)
	}
}

func TestUnwritableDir(t *testing.T) {
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	s := New(filepath.Join(file, "sub"))
	if _, err := s.Create(context.Background(), spec("m-a", "f")); err == nil {
		t.Error("Create succeeded on a dir that cannot exist")
	}
	if _, err := s.List(context.Background(), ""); err == nil {
		t.Error("List succeeded on a dir that cannot exist")
	}
}
