package vmm

import (
	"sync"

	"dedi.dev/dedi/api"
)

// broker fans committed events out to the event streams. A subscriber that
// does not keep up is cut off (its channel closed) rather than slowing the
// VMM; it reconnects and resumes from the seq it last saw.
type broker struct {
	mu     sync.Mutex
	subs   map[chan api.Event]struct{}
	closed bool
}

func newBroker() *broker { return &broker{subs: map[chan api.Event]struct{}{}} }

func (b *broker) subscribe() (chan api.Event, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return nil, false
	}
	c := make(chan api.Event, 1024)
	b.subs[c] = struct{}{}
	return c, true
}

func (b *broker) unsubscribe(c chan api.Event) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, ok := b.subs[c]; ok {
		delete(b.subs, c)
		close(c)
	}
}

func (b *broker) publish(e api.Event) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for c := range b.subs {
		select {
		case c <- e:
		default:
			delete(b.subs, c)
			close(c)
		}
	}
}

func (b *broker) close() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return
	}
	b.closed = true
	for c := range b.subs {
		close(c)
	}
	b.subs = nil
}
