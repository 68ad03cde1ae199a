package e2e

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/encrypted"
	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/snapshot"
)

// BenchmarkEncryption compares, in one run and alternating, a first save
// to a `snaploader serve` process and a lazy sequential read of the whole
// file from it into an empty cache, without and with client-side
// encryption.
//
//	SNAPLOADER_BENCH_MIB=1024 go test -run '^$' -bench Encryption -benchtime 3x ./e2e/
func BenchmarkEncryption(b *testing.B) {
	size := int64(benchMiB(b)) << 20
	path := filepath.Join(b.TempDir(), "memory.img")
	writeVM(b, path, int(size), 11)
	k, err := encrypted.NewKey(time.Now())
	if err != nil {
		b.Fatal(err)
	}
	keys, _ := encrypted.NewKeyring(k)
	sealed := func(seal bool) func(cache.Tier, *localcache.Cache) cache.Tier {
		if !seal {
			return nil
		}
		return func(tier cache.Tier, lc *localcache.Cache) cache.Tier {
			e, err := encrypted.New(tier, encrypted.Options{Keys: keys, TempDir: lc.TempDir()})
			if err != nil {
				b.Fatal(err)
			}
			return cache.Verifying(e)
		}
	}
	ctx := context.Background()
	read := func(b *testing.B, url string, seal bool) {
		_, l := benchHostWith(b, url, sealed(seal))
		ks, _ := l.KeySet(ctx, task, snapshot.KeySetOptions{})
		snap, err := l.GetSnapshot(ctx, ks, snapshot.GetOptions{ReadPolicy: snapshot.LocalFirst})
		if err != nil {
			b.Fatal(err)
		}
		u, err := l.UnpackSnapshot(ctx, snap, b.TempDir(), snapshot.UnpackOptions{})
		if err != nil {
			b.Fatal(err)
		}
		defer u.Close()
		s := u.Stores["memory.img"]
		buf := make([]byte, 1<<20)
		for off := int64(0); off < s.Size(); off += int64(len(buf)) {
			if _, err := s.ReadAt(buf[:min(int64(len(buf)), s.Size()-off)], off); err != nil {
				b.Fatal(err)
			}
		}
	}
	for _, mode := range []struct {
		name string
		seal bool
	}{{"plain", false}, {"encrypted", true}} {
		b.Run("first-save/"+mode.name, func(b *testing.B) {
			b.SetBytes(size)
			for b.Loop() {
				b.StopTimer()
				s := startServe(b, nil, "--cache-dir", b.TempDir())
				b.StartTimer()
				saveRemoteWith(b, s.url(), path, sealed(mode.seal))
				b.StopTimer()
				s.stop()
				b.StartTimer()
			}
		})
		b.Run("lazy-read/"+mode.name, func(b *testing.B) {
			s := startServe(b, nil, "--cache-dir", b.TempDir())
			saveRemoteWith(b, s.url(), path, sealed(mode.seal))
			b.SetBytes(size)
			for b.Loop() {
				read(b, s.url(), mode.seal)
			}
		})
	}
}
