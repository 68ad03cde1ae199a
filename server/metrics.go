package server

import (
	"fmt"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/status"
)

type metrics struct {
	requests *prometheus.CounterVec
	latency  *prometheus.HistogramVec
	bytes    *prometheus.CounterVec
	ac       *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
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
	}
	for _, c := range []prometheus.Collector{m.requests, m.latency, m.bytes, m.ac} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("server: registering metrics: %w", err)
		}
	}
	for _, d := range []string{"in", "out"} {
		m.bytes.WithLabelValues(d)
	}
	for _, r := range []string{"hit", "miss"} {
		m.ac.WithLabelValues(r)
	}
	return m, nil
}

// observe records one finished request; use it deferred with the named
// error result.
func (m *metrics) observe(method string, start time.Time, err *error) {
	m.requests.WithLabelValues(method, status.Code(*err).String()).Inc()
	m.latency.WithLabelValues(method).Observe(time.Since(start).Seconds())
}

func (m *metrics) in(n int)  { m.bytes.WithLabelValues("in").Add(float64(n)) }
func (m *metrics) out(n int) { m.bytes.WithLabelValues("out").Add(float64(n)) }
