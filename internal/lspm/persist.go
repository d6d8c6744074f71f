package lspm

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"
)

// persister writes process records and removes process dirs off the loop.
// Replacing a file by rename costs about a millisecond on ext4 (it flushes
// the new file's data), which the loop must not wait for: heartbeats and
// spawns would queue behind it. Writes to one dir coalesce to the newest, so
// records reach the disk in order; Run flushes everything before it returns.
type persister struct {
	mu       sync.Mutex
	pending  map[string]persistOp // by process dir
	order    []string
	barriers int // synced markers queued so far, for their keys
	wake     chan struct{}
	onErr    func(dir string, err error)
}

type persistOp struct {
	data   []byte        // the record; nil with remove
	remove bool          // remove the whole dir
	synced chan struct{} // a marker: closed once everything queued before it is applied
}

func newPersister(onErr func(dir string, err error)) *persister {
	return &persister{pending: map[string]persistOp{}, wake: make(chan struct{}, 1), onErr: onErr}
}

func (p *persister) put(dir string, op persistOp) {
	p.mu.Lock()
	if _, queued := p.pending[dir]; !queued {
		p.order = append(p.order, dir)
	}
	p.pending[dir] = op
	p.mu.Unlock()
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// synced returns a channel closed once every operation queued before the
// call has been applied: an answer that must not be lost to a kill -9 of
// the LSPM (a game's ready) waits for it.
func (p *persister) synced() <-chan struct{} {
	done := make(chan struct{})
	p.mu.Lock()
	p.barriers++
	key := "\x00synced-" + strconv.Itoa(p.barriers) // no dir has this name
	p.mu.Unlock()
	p.put(key, persistOp{synced: done})
	return done
}

// waitSynced waits for a synced channel, at most syncWait: the answer
// goes out even when the disk is that slow.
func waitSynced(c <-chan struct{}) {
	if c == nil {
		return
	}
	t := time.NewTimer(syncWait)
	defer t.Stop()
	select {
	case <-c:
	case <-t.C:
	}
}

const syncWait = time.Second

// write queues data as dir's record.json.
func (p *persister) write(dir string, data []byte) { p.put(dir, persistOp{data: data}) }

// remove queues the removal of dir, dropping a write still queued for it.
func (p *persister) remove(dir string) { p.put(dir, persistOp{remove: true}) }

// run applies queued operations until ctx is done, then flushes.
func (p *persister) run(ctx context.Context) {
	for {
		select {
		case <-p.wake:
			p.flush()
		case <-ctx.Done():
			p.flush()
			return
		}
	}
}

func (p *persister) flush() {
	for {
		p.mu.Lock()
		if len(p.order) == 0 {
			p.mu.Unlock()
			return
		}
		dir := p.order[0]
		p.order = p.order[1:]
		op := p.pending[dir]
		delete(p.pending, dir)
		p.mu.Unlock()
		var err error
		if op.synced != nil {
			close(op.synced)
			continue
		}
		if op.remove {
			err = os.RemoveAll(dir)
		} else {
			err = writeFileAtomic(filepath.Join(dir, recordFile), op.data)
		}
		if err != nil && p.onErr != nil {
			p.onErr(dir, err)
		}
	}
}
