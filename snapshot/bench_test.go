package snapshot

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/cow"
)

// BenchmarkRestoreToReady measures GetSnapshot + UnpackSnapshot (manifest,
// trees, one availability check, small files, lazy stores open) for 1, 4,
// 16 and 64 GiB chunked files: ready-ms is their sum, get-ms and unpack-ms
// its parts (ns/op also counts closing the stores). Each chunk holds a
// distinct page and zeros, so the cache stays small on disk while the
// manifest lists every chunk (16,777 at 64 GiB).
//
//	go test -run '^$' -bench RestoreToReady -benchtime 10x ./snapshot/
func BenchmarkRestoreToReady(b *testing.B) {
	for _, gib := range []int64{1, 4, 16, 64} {
		b.Run(fmt.Sprintf("%dGiB", gib), func(b *testing.B) {
			ctx := context.Background()
			dir := b.TempDir()
			lc, err := localcache.New(filepath.Join(dir, "cache"), localcache.Options{MaxBytes: 8 << 30})
			if err != nil {
				b.Fatal(err)
			}
			defer lc.Close()
			l, err := New(lc, nil, Options{})
			if err != nil {
				b.Fatal(err)
			}
			size := gib << 30
			mem := filepath.Join(dir, "memory.img")
			f, err := os.Create(mem)
			if err != nil {
				b.Fatal(err)
			}
			f.Truncate(size)
			page := make([]byte, 4096)
			for off := int64(0); off < size; off += cow.DefaultChunkSize {
				binary.LittleEndian.PutUint64(page, uint64(off)+1)
				f.WriteAt(page, off)
			}
			f.Close()
			state := filepath.Join(dir, "vmstate")
			os.WriteFile(state, make([]byte, 300<<10), 0o644)
			ks, err := l.KeySet(ctx, taskOn("main", "", "main"), KeySetOptions{})
			if err != nil {
				b.Fatal(err)
			}
			s, _, err := cow.FromFile(ctx, "memory.img", mem, lc, lc, cow.Options{Namespace: l.Namespace(ks.GetWriteKey()), TempDir: lc.TempDir()})
			if err != nil {
				b.Fatal(err)
			}
			if _, err := l.CacheSnapshot(ctx, &SaveRequest{Key: ks.GetWriteKey(), Files: map[string]string{"vmstate": state}, Chunked: []*cow.Store{s}, Local: true, LocalManifest: true}); err != nil {
				b.Fatal(err)
			}
			s.Close()
			out := filepath.Join(dir, "out")
			var get, unpack time.Duration
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				t := time.Now()
				snap, err := l.GetSnapshot(ctx, ks, GetOptions{ReadPolicy: LocalFirst})
				if err != nil {
					b.Fatal(err)
				}
				t1 := time.Now()
				u, err := l.UnpackSnapshot(ctx, snap, out, UnpackOptions{Replace: true}) // the previous iteration's files
				if err != nil {
					b.Fatal(err)
				}
				get, unpack = get+t1.Sub(t), unpack+time.Since(t1)
				u.Close()
			}
			b.ReportMetric(float64(size/cow.DefaultChunkSize), "chunks")
			b.ReportMetric(float64((get+unpack).Microseconds())/1e3/float64(b.N), "ready-ms")
			b.ReportMetric(float64(get.Microseconds())/1e3/float64(b.N), "get-ms")
			b.ReportMetric(float64(unpack.Microseconds())/1e3/float64(b.N), "unpack-ms")
		})
	}
}
