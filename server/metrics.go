package server

import (
	"fmt"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/snaploader/snaploader/cache"
	"google.golang.org/grpc/status"
)

type metrics struct {
	requests *prometheus.CounterVec
	latency  *prometheus.HistogramVec
	bytes    *prometheus.CounterVec
	ac       *prometheus.CounterVec
	cas      *prometheus.CounterVec
	corrupt  prometheus.Counter
	// storedCompressed counts compressed-blobs reads answered with the
	// backend's stored frames.
	storedCompressed prometheus.Counter
	// The lookup counts again, for the status page.
	acHits, acMisses, casHits, casMisses atomic.Int64
}

func newMetrics(reg prometheus.Registerer, backend cache.Backend, uploadMemory func() float64) (*metrics, error) {
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "snaploader_server_requests_total",
			Help: "REAPI requests by method and gRPC status code.",
		}, []string{"method", "code"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "snaploader_server_request_duration_seconds",
			Help:    "REAPI request latency by method.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 4, 10),
		}, []string{"method"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "snaploader_server_blob_bytes_total",
			Help: "Blob bytes received (in) and sent (out), as on the wire.",
		}, []string{"direction"}),
		ac: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "snaploader_server_action_cache_lookups_total",
			Help: "Action-cache lookups by result (hit or miss).",
		}, []string{"result"}),
		cas: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "snaploader_server_cas_lookups_total",
			Help: "Blobs asked for by FindMissingBlobs, by result (hit = present, miss = missing).",
		}, []string{"result"}),
	}
	m.corrupt = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "snaploader_server_corrupt_blobs_total",
		Help: "Blobs found corrupt while being served, and dropped.",
	})
	m.storedCompressed = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "snaploader_server_stored_compressed_reads_total",
		Help: "compressed-blobs reads answered with the zstd frames the backend stores, without encoding.",
	})
	collectors := []prometheus.Collector{m.requests, m.latency, m.bytes, m.ac, m.cas, m.corrupt, m.storedCompressed,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "snaploader_server_upload_memory_bytes",
			Help: "Memory charged to uploads in flight (bounded by --max-upload-memory).",
		}, uploadMemory)}
	if backend.Traits().MaxBytes > 0 {
		collectors = append(collectors, prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "snaploader_server_evictions_total",
			Help: "Entries the backing cache evicted to stay under its bound.",
		}, func() float64 { return float64(backend.Evictions()) }))
	}
	for _, c := range collectors {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("server: registering metrics: %w", err)
		}
	}
	for _, d := range []string{"in", "out"} {
		m.bytes.WithLabelValues(d)
	}
	for _, r := range []string{"hit", "miss"} {
		m.ac.WithLabelValues(r)
		m.cas.WithLabelValues(r)
	}
	return m, nil
}

// observe records one finished request; use it deferred with the named
// error result.
func (m *metrics) observe(method string, start time.Time, err *error) {
	m.requests.WithLabelValues(method, status.Code(*err).String()).Inc()
	m.latency.WithLabelValues(method).Observe(time.Since(start).Seconds())
}

// lookups records a FindMissingBlobs outcome.
func (m *metrics) lookups(asked, missing int) {
	m.cas.WithLabelValues("hit").Add(float64(asked - missing))
	m.cas.WithLabelValues("miss").Add(float64(missing))
	m.casHits.Add(int64(asked - missing))
	m.casMisses.Add(int64(missing))
}

// acLookup records a GetActionResult outcome.
func (m *metrics) acLookup(hit bool) {
	if hit {
		m.ac.WithLabelValues("hit").Inc()
		m.acHits.Add(1)
		return
	}
	m.ac.WithLabelValues("miss").Inc()
	m.acMisses.Add(1)
}

func (m *metrics) in(n int)  { m.bytes.WithLabelValues("in").Add(float64(n)) }
func (m *metrics) out(n int) { m.bytes.WithLabelValues("out").Add(float64(n)) }
