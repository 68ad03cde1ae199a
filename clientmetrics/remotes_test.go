package clientmetrics

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/snaploader/snaploader/cache/failover"
)

// Each remote's counters are read at every write, labelled by its name.
func TestWatchRemotes(t *testing.T) {
	stats := []failover.RemoteStats{
		{Name: "grpc://regional:8980", Reads: 3, ReadBytes: 12 << 20, Failures: 2, Down: errors.New("breaker open")},
		{Name: "s3://snaps", Reads: 1, ReadBytes: 4 << 20},
	}
	m := New()
	m.WatchRemotes(func() []failover.RemoteStats { return stats })
	path := filepath.Join(t.TempDir(), "host.prom")
	for _, tc := range []struct {
		name string
		want []string
	}{
		{"first write", []string{
			`snaploader_remote_blob_reads_total{remote="grpc://regional:8980"} 3`,
			`snaploader_remote_blob_bytes_total{remote="grpc://regional:8980"} 1.2582912e+07`,
			`snaploader_remote_failures_total{remote="grpc://regional:8980"} 2`,
			`snaploader_remote_up{remote="grpc://regional:8980"} 0`,
			`snaploader_remote_blob_reads_total{remote="s3://snaps"} 1`,
			`snaploader_remote_failures_total{remote="s3://snaps"} 0`,
			`snaploader_remote_up{remote="s3://snaps"} 1`,
		}},
		{"after more reads", []string{
			`snaploader_remote_blob_reads_total{remote="s3://snaps"} 5`,
		}},
	} {
		if err := m.WriteTextfile(path); err != nil {
			t.Fatal(err)
		}
		text, _ := os.ReadFile(path)
		for _, w := range tc.want {
			if !strings.Contains(string(text), w+"\n") {
				t.Errorf("%s: textfile lacks %q:\n%s", tc.name, w, text)
			}
		}
		stats[1].Reads = 5
	}
}

// Nothing is registered without remotes, and a nil *Metrics takes it.
func TestWatchRemotesNone(t *testing.T) {
	var none *Metrics
	none.WatchRemotes(func() []failover.RemoteStats { return nil })
	m := New()
	m.WatchRemotes(nil)
	path := filepath.Join(t.TempDir(), "host.prom")
	if err := m.WriteTextfile(path); err != nil {
		t.Fatal(err)
	}
	if text, _ := os.ReadFile(path); strings.Contains(string(text), "snaploader_remote_blob") {
		t.Errorf("remote samples without remotes:\n%s", text)
	}
}
