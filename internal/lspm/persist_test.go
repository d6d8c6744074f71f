package lspm

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// A synced channel closes only once the records queued before it are on
// disk, with the newest data: the ready answer waits for it.
func TestPersisterSynced(t *testing.T) {
	dir := t.TempDir()
	p := newPersister(func(dir string, err error) { t.Errorf("persist %s: %v", dir, err) })
	p.write(dir, []byte(`{"state":"starting"}`))
	p.write(dir, []byte(`{"state":"ready"}`))
	synced := p.synced()
	select {
	case <-synced:
		t.Fatal("synced before the persister ran")
	case <-time.After(50 * time.Millisecond):
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { p.run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	select {
	case <-synced:
	case <-time.After(5 * time.Second):
		t.Fatal("synced never closed")
	}
	raw, err := os.ReadFile(filepath.Join(dir, recordFile))
	if err != nil || string(raw) != `{"state":"ready"}` {
		t.Fatalf("record at synced: %q, %v", raw, err)
	}
	// A second marker, with nothing queued before it, closes too.
	select {
	case <-p.synced():
	case <-time.After(5 * time.Second):
		t.Fatal("an empty synced never closed")
	}
}
