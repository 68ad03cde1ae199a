package snapshot

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/cow"
)

// BenchmarkRestoreToReady measures GetSnapshot + UnpackSnapshot (manifest,
// small files, lazy stores open) for 1 GiB and 4 GiB chunked files. Each
// chunk holds a distinct page and zeros, so the cache stays small on disk
// while the manifest lists every chunk. Readiness must not grow with size
// beyond the chunk list.
func BenchmarkRestoreToReady(b *testing.B) {
	for _, gib := range []int64{1, 4} {
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
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				snap, err := l.GetSnapshot(ctx, ks, GetOptions{ReadPolicy: LocalFirst})
				if err != nil {
					b.Fatal(err)
				}
				u, err := l.UnpackSnapshot(ctx, snap, out, UnpackOptions{})
				if err != nil {
					b.Fatal(err)
				}
				u.Close()
			}
			b.ReportMetric(float64(size/cow.DefaultChunkSize), "chunks")
		})
	}
}
