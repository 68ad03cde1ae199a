package toxic

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/Shopify/toxiproxy/v2/toxics"
)

// LinkType is the toxic type of a bandwidth cap shared by every connection
// through one proxy (Toxiproxy's own "bandwidth" toxic caps each connection
// apart, so n connections get n times the rate). Its attribute is "rate"
// in KB/s, as for "bandwidth".
const LinkType = "link_bandwidth"

var registerLink sync.Once

// linkToxic is one link of Rate KB/s, in one direction, that the proxy's
// connections share first come, first served: each piece of data read
// from a connection is sent once the link has sent what was queued before
// it, like a NIC's transmit queue. A connection holds at most one piece
// in the queue (Toxiproxy reads the next only once this one is passed
// on), so a connection with little to send waits behind at most one piece
// of each busy connection, never behind megabytes.
type linkToxic struct {
	Rate int64 `json:"rate"` // KB/s

	mu   sync.Mutex
	next time.Time // when the link has sent everything reserved so far
}

// linkBurst is how far behind its schedule the link may fall (a late timer
// wake-up) and catch up with a burst, so that timer slack does not lower
// the rate.
const linkBurst = 2 * time.Millisecond

// reserve queues n bytes and returns when the link has sent them.
func (t *linkToxic) reserve(n int) time.Time {
	t.mu.Lock()
	defer t.mu.Unlock()
	now := time.Now()
	if t.next.Before(now.Add(-linkBurst)) {
		t.next = now.Add(-linkBurst)
	}
	t.next = t.next.Add(time.Duration(n) * time.Millisecond / time.Duration(t.Rate))
	return t.next
}

func (t *linkToxic) Pipe(stub *toxics.ToxicStub) {
	for {
		select {
		case <-stub.Interrupt:
			return
		case p := <-stub.Input:
			if p == nil {
				stub.Close()
				return
			}
			if t.Rate > 0 {
				sent := t.reserve(len(p.Data))
				if wait := time.Until(sent); wait > 0 {
					timer := time.NewTimer(wait)
					select {
					case <-timer.C:
					case <-stub.Interrupt:
						timer.Stop()
						_ = stub.WriteOutput(p, 5*time.Second) // drop nothing
						return
					}
				}
				// Toxiproxy's latency toxic delays a piece from its
				// timestamp: from when the link sent it, not from when
				// it was read (which would hide the latency behind the
				// piece's wait in the queue).
				p.Timestamp = sent
			}
			stub.Output <- p
		}
	}
}

// AddLink caps the proxy's stream ("downstream" or "upstream") at rateKBs
// KB/s shared by all its connections (see LinkType); add it before a
// "latency" toxic so that data is delayed after it is sent, as on a wire.
func (p *Proxy) AddLink(t testing.TB, stream string, rateKBs int64) string {
	t.Helper()
	name, err := p.addLink(stream, rateKBs)
	if err != nil {
		t.Fatal(err)
	}
	return name
}

func (p *Proxy) addLink(stream string, rateKBs int64) (string, error) {
	registerLink.Do(func() { toxics.Register(LinkType, new(linkToxic)) })
	return p.AddToxic(LinkType, stream, fmt.Sprintf(`"rate":%d`, rateKBs))
}

// Wire is an emulated network link, the same both ways.
type Wire struct {
	RateKBs   int64 // shared by all connections, each direction (LinkType); 0: no cap
	LatencyMs int64 // each way
}

// Emulate puts w between the proxy's clients and its upstream, in both
// directions: the shared cap, then the latency after it.
func (p *Proxy) Emulate(w Wire) error {
	for _, s := range []string{"downstream", "upstream"} {
		if w.RateKBs > 0 {
			if _, err := p.addLink(s, w.RateKBs); err != nil {
				return err
			}
		}
		if w.LatencyMs > 0 {
			if _, err := p.AddToxic("latency", s, fmt.Sprintf(`"latency":%d`, w.LatencyMs)); err != nil {
				return err
			}
		}
	}
	return nil
}
