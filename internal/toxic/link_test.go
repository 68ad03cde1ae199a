package toxic

import (
	"testing"
	"time"
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
