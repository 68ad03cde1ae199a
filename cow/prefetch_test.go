package cow

import (
	"testing"
	"time"
)

// TestPrefetchPacing checks the reservations the rate bound hands out
// (computed waits, not measured ones).
func TestPrefetchPacing(t *testing.T) {
	for _, tc := range []struct {
		name  string
		rate  int64
		sizes []int64
		want  []time.Duration
	}{
		{"unbounded", -1, []int64{1 << 30, 1 << 30}, []time.Duration{0, 0}},
		{"1 MiB/s", 1 << 20, []int64{512 << 10, 512 << 10, 1 << 20}, []time.Duration{0, 500 * time.Millisecond, time.Second}},
		{"4 MiB/s", 4 << 20, []int64{4 << 20, 4 << 20}, []time.Duration{0, time.Second}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			q := &prefetchQueue{rate: tc.rate}
			for i, n := range tc.sizes {
				got := q.pace(n)
				if d := got - tc.want[i]; d < -50*time.Millisecond || d > 50*time.Millisecond {
					t.Errorf("reservation %d of %d bytes: wait %v, want about %v", i, n, got, tc.want[i])
				}
			}
		})
	}
}
