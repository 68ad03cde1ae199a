package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"testing"
	"time"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/cow"
	"github.com/snaploader/snaploader/internal/testutil"
	"github.com/snaploader/snaploader/snapshot"
)

// benchMiB is SNAPLOADER_BENCH_MIB (default 1024).
func benchMiB(b *testing.B) int { return int(testutil.BenchMiB(b, 1024)) }

// benchHost is a host with a fresh cache dir and a remote at url.
func benchHost(b *testing.B, url string) (*localcache.Cache, *snapshot.Loader) {
	return benchHostWith(b, url, nil)
}

// benchHostWith is benchHost with the remote tier wrapped by wrap (nil:
// as it is).
func benchHostWith(b *testing.B, url string, wrap func(cache.Tier, *localcache.Cache) cache.Tier) (*localcache.Cache, *snapshot.Loader) {
	b.Helper()
	lc, err := localcache.New(b.TempDir(), localcache.Options{MaxBytes: 16 << 30})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { lc.Close() })
	var tier cache.Tier = dial(b, url)
	if wrap != nil {
		tier = wrap(cache.Verifying(tier), lc)
	}
	l, err := snapshot.New(lc, tier, snapshot.Options{})
	if err != nil {
		b.Fatal(err)
	}
	return lc, l
}

// saveRemote splits path on a fresh host and publishes it to url.
func saveRemote(b *testing.B, url, path string) { saveRemoteWith(b, url, path, nil) }

// saveRemoteWith is saveRemote through a wrapped remote tier.
func saveRemoteWith(b *testing.B, url, path string, wrap func(cache.Tier, *localcache.Cache) cache.Tier) {
	lc, l := benchHostWith(b, url, wrap)
	saveFile(b, lc, l, path)
}

// saveFile splits path as the chunked file memory.img on the host of lc
// and l, and saves it locally and to its remote.
func saveFile(b *testing.B, lc *localcache.Cache, l *snapshot.Loader, path string) {
	ctx := context.Background()
	ks, err := l.KeySet(ctx, task, snapshot.KeySetOptions{})
	if err != nil {
		b.Fatal(err)
	}
	s, _, err := cow.FromFile(ctx, "memory.img", path, lc, lc, cow.Options{Namespace: l.Namespace(ks.GetWriteKey()), TempDir: lc.TempDir()})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	if _, err := l.CacheSnapshot(ctx, &snapshot.SaveRequest{Key: ks.GetWriteKey(), Chunked: []*cow.Store{s}, Local: true, Remote: true}); err != nil {
		b.Fatal(err)
	}
}

// BenchmarkRemoteTier measures, in one run: cp of the file (baseline), a
// first save to `snaploader serve` (over disk and, when MinIO is installed,
// over S3), a lazy sequential read of the whole file from serve into an
// empty local cache, and the time to first byte of unfetched chunks.
//
//	SNAPLOADER_BENCH_MIB=1024 go test -run '^$' -bench RemoteTier -benchtime 1x ./e2e/
func BenchmarkRemoteTier(b *testing.B) {
	size := int64(benchMiB(b)) << 20
	dir := b.TempDir()
	path := filepath.Join(dir, "memory.img")
	writeVM(b, path, int(size), 9)
	b.Run("cp", func(b *testing.B) {
		b.SetBytes(size)
		for b.Loop() {
			if out, err := exec.Command("cp", path, filepath.Join(dir, "copy")).CombinedOutput(); err != nil {
				b.Fatalf("cp: %v %s", err, out)
			}
			os.Remove(filepath.Join(dir, "copy"))
		}
	})
	srv := startServe(b, nil, "--cache-dir", b.TempDir())
	b.Run("first-save-to-serve", func(b *testing.B) {
		b.SetBytes(size)
		for b.Loop() {
			b.StopTimer()
			s := startServe(b, nil, "--cache-dir", b.TempDir())
			b.StartTimer()
			saveRemote(b, s.url(), path)
			b.StopTimer()
			s.stop()
			b.StartTimer()
		}
	})
	if m, ok := tryMinIO(b); ok {
		env := []string{"AWS_ACCESS_KEY_ID=" + m.AccessKey, "AWS_SECRET_ACCESS_KEY=" + m.SecretKey}
		b.Run("first-save-to-serve-over-minio", func(b *testing.B) {
			b.SetBytes(size)
			for b.Loop() {
				b.StopTimer()
				s := startServe(b, env, "--s3", fmt.Sprintf("s3://%s?endpoint=%s&secure=false", m.NewBucket(b), m.Endpoint))
				b.StartTimer()
				saveRemote(b, s.url(), path)
				b.StopTimer()
				s.stop()
				b.StartTimer()
			}
		})
	}
	saveRemote(b, srv.url(), path)
	b.Run("lazy-read-from-serve", func(b *testing.B) {
		b.SetBytes(size)
		ctx := context.Background()
		buf := make([]byte, 1<<20)
		for b.Loop() {
			b.StopTimer()
			_, l := benchHost(b, srv.url())
			b.StartTimer()
			ks, _ := l.KeySet(ctx, task, snapshot.KeySetOptions{})
			snap, err := l.GetSnapshot(ctx, ks, snapshot.GetOptions{ReadPolicy: snapshot.LocalFirst})
			if err != nil {
				b.Fatal(err)
			}
			u, err := l.UnpackSnapshot(ctx, snap, b.TempDir(), snapshot.UnpackOptions{})
			if err != nil {
				b.Fatal(err)
			}
			s := u.Stores["memory.img"]
			for off := int64(0); off < s.Size(); off += int64(len(buf)) {
				n := min(int64(len(buf)), s.Size()-off)
				if _, err := s.ReadAt(buf[:n], off); err != nil {
					b.Fatal(err)
				}
			}
			st := s.Stats()
			b.ReportMetric(float64(st.ForegroundFetches), "foreground-fetches")
			b.ReportMetric(float64(st.Prefetched), "prefetched")
			u.Close()
		}
	})
	b.Run("first-byte-of-unfetched-chunk", func(b *testing.B) {
		ctx := context.Background()
		var lat []time.Duration
		one := make([]byte, 1)
		for b.Loop() {
			b.StopTimer()
			_, l := benchHost(b, srv.url())
			ks, _ := l.KeySet(ctx, task, snapshot.KeySetOptions{})
			snap, err := l.GetSnapshot(ctx, ks, snapshot.GetOptions{ReadPolicy: snapshot.LocalFirst})
			if err != nil {
				b.Fatal(err)
			}
			u, err := l.UnpackSnapshot(ctx, snap, b.TempDir(), snapshot.UnpackOptions{ReadAhead: -1})
			if err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
			for _, c := range snap.Manifest.GetChunkedFiles()[0].GetChunks() {
				t := time.Now()
				if _, err := u.Stores["memory.img"].ReadAt(one, c.GetOffset()); err != nil {
					b.Fatal(err)
				}
				lat = append(lat, time.Since(t))
			}
			b.StopTimer()
			u.Close()
			b.StartTimer()
		}
		sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
		if len(lat) > 0 {
			b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
			b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
		}
	})
}

// tryMinIO starts MinIO when it is installed; benchmarks run without it.
func tryMinIO(b *testing.B) (testutil.MinIO, bool) {
	if _, err := exec.LookPath("minio"); err != nil {
		if _, err := os.Stat(filepath.Join(os.Getenv("HOME"), "go", "bin", "minio")); err != nil {
			b.Log("minio not installed: skipping the S3-backed serve figure")
			return testutil.MinIO{}, false
		}
	}
	return testutil.StartMinIO(b), true
}
