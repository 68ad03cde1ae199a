// Package clientmetrics is what a snaploader host reports in Prometheus
// form: snapshot hits by tier and fallback index, cold starts, chunk bytes
// fetched by tier, how long the VM waited for chunks, what saves stored and
// why publishes were skipped. Long-running commands (`qemu restore`,
// `pager`) serve them on --metrics-addr; short ones (`save`, `restore`)
// write a node-exporter textfile (--metrics-textfile) when they finish.
package clientmetrics

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/snaploader/snaploader/cow"
	"github.com/snaploader/snaploader/snapshot"
)

// Metrics is one process's metrics, in a registry of its own. A nil
// *Metrics records nothing.
type Metrics struct {
	reg        *prometheus.Registry
	hits       *prometheus.CounterVec
	cold       prometheus.Counter
	fetched    *prometheus.CounterVec
	fetches    *prometheus.CounterVec
	wait       *prometheus.HistogramVec
	saveBytes  prometheus.Counter
	saveChunks prometheus.Counter
	saves      *prometheus.CounterVec
	skipped    *prometheus.CounterVec
	remoteDown prometheus.Counter
}

// New makes the metrics.
func New() *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		hits: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "snaploader_snapshot_hits_total", Help: "Snapshots found, by the tier their manifest came from and the index of the key that matched (0 = branch key).",
		}, []string{"tier", "fallback_index"}),
		cold: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "snaploader_cold_starts_total", Help: "Lookups that found no usable snapshot under any key.",
		}),
		fetched: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "snaploader_chunk_bytes_fetched_total", Help: "Bytes of chunks opened by restored stores, by the tier that served them.",
		}, []string{"tier"}),
		fetches: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "snaploader_chunk_fetches_total", Help: "Chunks opened by restored stores, by tier and by whether the VM waited (foreground) or read-ahead fetched them (prefetch).",
		}, []string{"tier", "kind"}),
		wait: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "snaploader_chunk_wait_seconds", Help: "How long a read or write of the VM waited for a chunk to be fetched, by tier.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16),
		}, []string{"tier"}),
		saveBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "snaploader_save_bytes_written_total", Help: "Bytes of chunks newly stored by saves.",
		}),
		saveChunks: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "snaploader_save_chunks_written_total", Help: "Chunks newly stored by saves.",
		}),
		saves: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "snaploader_saves_total", Help: "Saves, by where their manifest was published (local, remote, both).",
		}, []string{"published"}),
		skipped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "snaploader_publish_skipped_total", Help: "Saves that did not publish to the remote, by reason.",
		}, []string{"reason"}),
		remoteDown: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "snaploader_remote_unavailable_total", Help: "Commands that went on with the local tier because the remote was down or too slow.",
		}),
	}
	m.reg.MustRegister(m.hits, m.cold, m.fetched, m.fetches, m.wait, m.saveBytes, m.saveChunks, m.saves, m.skipped, m.remoteDown)
	return m
}

// Registry is the registry holding the metrics.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// Lookup records the outcome of a GetSnapshot: a hit (snap) or, when err
// says nothing was found, a cold start.
func (m *Metrics) Lookup(snap *snapshot.Snapshot, err error) {
	if m == nil {
		return
	}
	if err == nil && snap != nil {
		m.hits.WithLabelValues(string(snap.Source), strconv.Itoa(snap.FallbackIndex)).Inc()
		return
	}
	m.cold.Inc()
}

// Fetched records one chunk fetch; it fits cow.Options.OnFetch.
func (m *Metrics) Fetched(ev cow.FetchEvent) {
	if m == nil {
		return
	}
	tier := ev.Tier
	if tier == "" {
		tier = "unknown"
	}
	kind := "prefetch"
	if ev.Foreground {
		kind = "foreground"
		m.wait.WithLabelValues(tier).Observe(ev.Wait.Seconds())
	}
	m.fetched.WithLabelValues(tier).Add(float64(ev.Bytes))
	m.fetches.WithLabelValues(tier, kind).Inc()
}

// Saved records a save.
func (m *Metrics) Saved(res *snapshot.SaveResult) {
	if m == nil {
		return
	}
	t := res.Totals()
	m.saveBytes.Add(float64(t.BytesWritten))
	m.saveChunks.Add(float64(t.ChunksWritten))
	published := "none"
	switch {
	case res.PublishedLocal && res.PublishedRemote:
		published = "both"
	case res.PublishedRemote:
		published = "remote"
	case res.PublishedLocal:
		published = "local"
	}
	m.saves.WithLabelValues(published).Inc()
}

// PublishSkipped records a save that did not publish remotely, and why.
func (m *Metrics) PublishSkipped(reason string) {
	if m != nil {
		m.skipped.WithLabelValues(reason).Inc()
	}
}

// RemoteUnavailable records a command that degraded to the local tier.
func (m *Metrics) RemoteUnavailable() {
	if m != nil {
		m.remoteDown.Inc()
	}
}

// WriteTextfile writes the metrics in the text exposition format to path,
// atomically, for node-exporter's textfile collector.
func (m *Metrics) WriteTextfile(path string) error {
	if err := prometheus.WriteToTextfile(path, m.reg); err != nil {
		return fmt.Errorf("writing metrics textfile %s: %w", path, err)
	}
	return nil
}

// Serve serves the metrics at /metrics on addr until ctx ends; it returns
// the address it listens on.
func (m *Metrics) Serve(ctx context.Context, addr string) (string, error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return "", fmt.Errorf("metrics address %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	go func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			l.Close()
		}
	}()
	return l.Addr().String(), nil
}
