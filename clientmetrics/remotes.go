package clientmetrics

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/snaploader/snaploader/cache/failover"
)

// remotesCollector reports each remote's counters (cache/failover) at
// every scrape or textfile write, labelled with the remote's name: its URL
// as given to --remote, which carries no credentials.
type remotesCollector struct {
	stats                          func() []failover.RemoteStats
	reads, bytes, failures, upDesc *prometheus.Desc
}

// WatchRemotes reports the remotes stats returns (failover.Tier.Stats):
// snaploader_remote_blob_reads_total{remote}, snaploader_remote_blob_bytes_total{remote},
// snaploader_remote_failures_total{remote} and snaploader_remote_up{remote}.
// Call it once.
func (m *Metrics) WatchRemotes(stats func() []failover.RemoteStats) {
	if m == nil || stats == nil {
		return
	}
	label := []string{"remote"}
	m.reg.MustRegister(&remotesCollector{
		stats: stats,
		reads: prometheus.NewDesc("snaploader_remote_blob_reads_total",
			"Blob reads (and resumptions of cut reads) served by each remote, in --remote order.", label, nil),
		bytes: prometheus.NewDesc("snaploader_remote_blob_bytes_total",
			"Blob bytes delivered by each remote.", label, nil),
		failures: prometheus.NewDesc("snaploader_remote_failures_total",
			"Transient failures of calls to each remote (refused, reset, Unavailable, stalled), each retried or failed over.", label, nil),
		upDesc: prometheus.NewDesc("snaploader_remote_up",
			"1 while a remote is taking calls, 0 while its breaker keeps new calls off it after an outage.", label, nil),
	})
}

func (c *remotesCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.reads
	ch <- c.bytes
	ch <- c.failures
	ch <- c.upDesc
}

func (c *remotesCollector) Collect(ch chan<- prometheus.Metric) {
	for _, s := range c.stats() {
		up := 1.0
		if s.Down != nil {
			up = 0
		}
		ch <- prometheus.MustNewConstMetric(c.reads, prometheus.CounterValue, float64(s.Reads), s.Name)
		ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.CounterValue, float64(s.ReadBytes), s.Name)
		ch <- prometheus.MustNewConstMetric(c.failures, prometheus.CounterValue, float64(s.Failures), s.Name)
		ch <- prometheus.MustNewConstMetric(c.upDesc, prometheus.GaugeValue, up, s.Name)
	}
}
