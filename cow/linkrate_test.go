package cow

import (
	"testing"
	"time"
)

// The fetches in flight follow the link: two on a short, fast link, more
// as its latency grows, at most the configured bound, and fetches served
// locally or that failed say nothing about the link.
func TestLinkEstimateTarget(t *testing.T) {
	const chunk = 4096000
	ms := func(f float64) time.Duration { return time.Duration(f * float64(time.Millisecond)) }
	t0 := time.Unix(1000, 0)
	// pair: two fetches of a chunk begun together on a link of rate
	// bytes/s, the second done once both are delivered.
	pair := func(l *linkEstimate, at time.Time, rate float64) {
		a, b := l.begin(at), l.begin(at)
		one := time.Duration(chunk / rate * float64(time.Second))
		l.end(a, chunk, at.Add(one), true)
		l.end(b, chunk, at.Add(2*one), true)
	}
	lone := func(l *linkEstimate, at time.Time, dur time.Duration, observed bool) {
		l.end(l.begin(at), chunk, at.Add(dur), observed)
	}
	for _, tc := range []struct {
		name string
		run  func(l *linkEstimate)
		most int
		want int
	}{
		{"nothing completed", func(*linkEstimate) {}, 4, 1},
		{"nothing measured", func(l *linkEstimate) { lone(l, t0, time.Microsecond, false) }, 4, 2},
		{"bound below two", func(*linkEstimate) {}, 1, 1},
		// 1 Gbit/s, 1 ms each way: a 4 MB chunk is 32.8 ms on the wire.
		{"1 Gbit/s, 1 ms each way", func(l *linkEstimate) {
			pair(l, t0, 125e6)
			lone(l, t0.Add(time.Second), ms(32.77+4), true)
		}, 8, 2},
		// A bucket 50 ms away at 100 MB/s: 100 ms of round trips a chunk.
		{"100 MB/s, 50 ms each way", func(l *linkEstimate) {
			pair(l, t0, 100e6)
			lone(l, t0.Add(time.Second), ms(40.96+100), true)
		}, 8, 4},
		{"bounded", func(l *linkEstimate) {
			pair(l, t0, 100e6)
			lone(l, t0.Add(time.Second), ms(40.96+500), true)
		}, 4, 4},
		{"local opens are not the link", func(l *linkEstimate) {
			pair(l, t0, 100e6)
			lone(l, t0.Add(time.Second), ms(40.96+100), true)
			for i := range 20 {
				lone(l, t0.Add(2*time.Second+time.Duration(i)*time.Millisecond), time.Microsecond, false)
			}
		}, 8, 4},
		{"overlapping fetches are not lone", func(l *linkEstimate) {
			pair(l, t0, 100e6)
			a := l.begin(t0.Add(time.Second))
			b := l.begin(t0.Add(time.Second + ms(1)))
			l.end(b, chunk, t0.Add(time.Second+ms(500)), true)
			l.end(a, chunk, t0.Add(time.Second+ms(600)), true)
		}, 8, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var l linkEstimate
			tc.run(&l)
			if got := l.target(chunk, tc.most); got != tc.want {
				t.Errorf("target %d, want %d (rate %.0f B/s)", got, tc.want, l.rateLocked())
			}
			if n := l.inFlight(); n != 0 {
				t.Errorf("%d fetches still in flight", n)
			}
		})
	}
}

// Read-ahead waits while a fault is pending, and not otherwise.
func TestFaultGate(t *testing.T) {
	var g faultGate
	if g.wait(nil, time.Hour) {
		t.Fatal("waited with no fault pending")
	}
	g.enter()
	g.enter()
	waited := make(chan bool)
	go func() { waited <- g.wait(nil, time.Hour) }()
	g.leave()
	select {
	case <-waited:
		t.Fatal("stopped waiting with a fault still pending")
	case <-time.After(20 * time.Millisecond):
	}
	g.leave()
	if !<-waited {
		t.Error("wait says it did not wait")
	}
	g.enter()
	done := make(chan struct{})
	close(done)
	if !g.wait(done, time.Hour) {
		t.Error("wait with a closed done says it did not wait")
	}
	g.leave()
	if g.wait(nil, time.Hour) {
		t.Error("waited after every fault left")
	}
}

// The default bound of background opens is in bytes: chunks smaller than
// the default get more of them in flight, up to a cap, and a bound given
// is kept.
func TestDefaultPrefetchBound(t *testing.T) {
	for _, tc := range []struct {
		chunk int64
		given int
		want  int
	}{
		{DefaultChunkSize, 0, DefaultPrefetchConcurrency},
		{8 << 20, 0, DefaultPrefetchConcurrency},
		{512 << 10, 0, 31},
		{4096, 0, MaxDefaultPrefetchConcurrency},
		{512 << 10, 2, 2},
	} {
		o, err := Options{ChunkSize: tc.chunk, PrefetchConcurrency: tc.given}.withDefaults()
		if err != nil {
			t.Fatal(err)
		}
		if o.PrefetchConcurrency != tc.want {
			t.Errorf("chunks of %d bytes, PrefetchConcurrency %d: bound %d, want %d", tc.chunk, tc.given, o.PrefetchConcurrency, tc.want)
		}
	}

	// A bucket 50 ms to first byte, 100 MB/s per connection, 512 KiB
	// chunks: eight fetches together deliver eight chunks in 55 ms, and a
	// lone one shows the 50 ms. About one bandwidth-delay product is nine
	// chunks, more than DefaultPrefetchConcurrency; the default bound lets
	// the estimate have them.
	const chunk = 512 << 10
	one := 50*time.Millisecond + time.Duration(chunk/100e6*float64(time.Second))
	var l linkEstimate
	t0 := time.Unix(1000, 0)
	var ts []fetchTicket
	for range 8 {
		ts = append(ts, l.begin(t0))
	}
	for _, tk := range ts {
		l.end(tk, chunk, t0.Add(one), true)
	}
	l.end(l.begin(t0.Add(time.Second)), chunk, t0.Add(time.Second+one), true)
	o, err := Options{ChunkSize: chunk}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	if got := l.target(chunk, o.PrefetchConcurrency); got <= DefaultPrefetchConcurrency {
		t.Errorf("target %d within the default bound %d, want more than %d (rate %.0f B/s, latency %v)",
			got, o.PrefetchConcurrency, DefaultPrefetchConcurrency, l.rateLocked(), l.latencyLocked(l.rateLocked()))
	}
}
