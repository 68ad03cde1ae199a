package toxic

import (
	"testing"
	"time"

	"github.com/Shopify/toxiproxy/v2/stream"
	"github.com/Shopify/toxiproxy/v2/toxics"
)

// The link sends what connections queue one piece after another at its
// rate: a piece queued behind others is sent when they are, whichever
// connection queued them.
func TestLinkQueuesPiecesInTurn(t *testing.T) {
	for _, tc := range []struct {
		rate   int64 // KB/s
		pieces []int
		gaps   []time.Duration // between the sends of successive pieces
	}{
		{125000, []int{32768, 32768, 16384}, []time.Duration{262144 * time.Nanosecond, 131072 * time.Nanosecond}},
		{1000, []int{1000, 2000}, []time.Duration{2 * time.Millisecond}},
	} {
		l := &linkToxic{Rate: tc.rate}
		var sent []time.Time
		for _, n := range tc.pieces {
			sent = append(sent, l.reserve(n))
		}
		for i, want := range tc.gaps {
			if got := sent[i+1].Sub(sent[i]); got != want {
				t.Errorf("rate %d KB/s, pieces %v: piece %d sent %v after the one before, want %v", tc.rate, tc.pieces, i+1, got, want)
			}
		}
	}
}

// A piece leaves the link stamped with when the link sent it, so that a
// latency toxic after it delays it from then, not from when it was read.
func TestLinkStampsPiecesWhenSent(t *testing.T) {
	// Successive stamps are at least one piece's time apart at the link's
	// rate (exactly, unless a timer woke up more than linkBurst late); a
	// stamp left from when the piece was read would be the same for all.
	for _, tc := range []struct {
		rate   int64 // KB/s
		pieces []int
		gaps   []time.Duration // between the stamps of successive pieces
	}{
		{125000, []int{300000, 32768, 16384}, []time.Duration{262144 * time.Nanosecond, 131072 * time.Nanosecond}},
		{1000, []int{3000, 1000}, []time.Duration{time.Millisecond}},
		{1000, []int{10, 1000}, []time.Duration{time.Millisecond}},
	} {
		in := make(chan *stream.StreamChunk, len(tc.pieces)+1)
		out := make(chan *stream.StreamChunk, len(tc.pieces)+1)
		read := time.Unix(1, 0) // long before: the stamp must be replaced
		for _, n := range tc.pieces {
			in <- &stream.StreamChunk{Data: make([]byte, n), Timestamp: read}
		}
		in <- nil
		start := time.Now()
		(&linkToxic{Rate: tc.rate}).Pipe(toxics.NewToxicStub(in, out))
		var stamps []time.Time
		for p := range out {
			stamps = append(stamps, p.Timestamp)
		}
		if len(stamps) != len(tc.pieces) {
			t.Fatalf("rate %d KB/s: %d pieces out, want %d", tc.rate, len(stamps), len(tc.pieces))
		}
		if earliest := start.Add(-linkBurst); stamps[0].Before(earliest) {
			t.Errorf("rate %d KB/s: first piece stamped %v, before the link could send it (%v)", tc.rate, stamps[0], earliest)
		}
		for i, want := range tc.gaps {
			if got := stamps[i+1].Sub(stamps[i]); got < want || got > want+time.Second {
				t.Errorf("rate %d KB/s, pieces %v: piece %d stamped %v after the one before, want %v (or a late timer's more)", tc.rate, tc.pieces, i+1, got, want)
			}
		}
	}
}
