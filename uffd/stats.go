package uffd

import (
	"sync/atomic"
	"time"
)

// Stats counts the work a Server did for one restore.
type Stats struct {
	Faults       uint64 // page-fault events received from the VMM
	Wakes        uint64 // faults on already-populated pages resolved with UFFDIO_WAKE
	Fetches      uint64 // blocks read from Memory
	BytesRead    uint64 // bytes read from Memory
	PagesCopied  uint64 // pages installed with UFFDIO_COPY
	BytesCopied  uint64 // bytes installed with UFFDIO_COPY
	ZeroPages    uint64 // pages installed as zero pages (holes and removed ranges)
	Removes      uint64 // UFFD_EVENT_REMOVE events (balloon, madvise(MADV_DONTNEED))
	RemovedPages uint64 // pages those events covered inside the served regions
	// Fault latency: from reading the fault event to its resolution.
	LatencyP50 time.Duration
	LatencyP99 time.Duration
	LatencyMax time.Duration
	// Latency is a histogram of fault latencies; bucket i counts faults
	// resolved within Latency[i].UpperBound (and above the previous bound).
	Latency []LatencyBucket
}

// LatencyBucket is one histogram bucket of Stats.Latency.
type LatencyBucket struct {
	UpperBound time.Duration
	Count      uint64
}

// Histogram buckets: powers of two from 1µs up to ~67s; the last bucket is
// open-ended.
const numBuckets = 27

func bucketBound(i int) time.Duration { return time.Microsecond << i }

type counters struct {
	faults, wakes, fetches, bytesRead   atomic.Uint64
	pagesCopied, bytesCopied, zeroPages atomic.Uint64
	removes, removedPages               atomic.Uint64
	maxLatency                          atomic.Int64
	buckets                             [numBuckets]atomic.Uint64
}

func (c *counters) observe(d time.Duration) {
	i := 0
	for i < numBuckets-1 && d > bucketBound(i) {
		i++
	}
	c.buckets[i].Add(1)
	for {
		m := c.maxLatency.Load()
		if int64(d) <= m || c.maxLatency.CompareAndSwap(m, int64(d)) {
			return
		}
	}
}

func (c *counters) snapshot() Stats {
	s := Stats{
		Faults:       c.faults.Load(),
		Wakes:        c.wakes.Load(),
		Fetches:      c.fetches.Load(),
		BytesRead:    c.bytesRead.Load(),
		PagesCopied:  c.pagesCopied.Load(),
		BytesCopied:  c.bytesCopied.Load(),
		ZeroPages:    c.zeroPages.Load(),
		Removes:      c.removes.Load(),
		RemovedPages: c.removedPages.Load(),
		LatencyMax:   time.Duration(c.maxLatency.Load()),
	}
	var total uint64
	for i := range c.buckets {
		n := c.buckets[i].Load()
		s.Latency = append(s.Latency, LatencyBucket{UpperBound: bucketBound(i), Count: n})
		total += n
	}
	s.LatencyP50 = quantile(s.Latency, total, 0.50, s.LatencyMax)
	s.LatencyP99 = quantile(s.Latency, total, 0.99, s.LatencyMax)
	return s
}

// quantile returns the upper bound of the bucket holding the q-quantile,
// capped at the maximum observed latency.
func quantile(b []LatencyBucket, total uint64, q float64, max time.Duration) time.Duration {
	if total == 0 {
		return 0
	}
	rank := uint64(q*float64(total) + 0.5)
	if rank < 1 {
		rank = 1
	}
	var seen uint64
	for _, x := range b {
		seen += x.Count
		if seen >= rank {
			if x.UpperBound > max {
				return max
			}
			return x.UpperBound
		}
	}
	return max
}
