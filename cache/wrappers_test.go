package cache_test

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"slices"
	"sync"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/klauspost/compress/zstd"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/failover"
	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/internal/cachecount"
)

// recorder is a local cache that notes which of its write paths and
// Close were called.
type recorder struct {
	*localcache.Cache
	mu    sync.Mutex
	calls []string
}

func (r *recorder) note(call string) {
	r.mu.Lock()
	r.calls = append(r.calls, call)
	r.mu.Unlock()
}

func (r *recorder) took() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	calls := r.calls
	r.calls = nil
	return calls
}

func (r *recorder) Write(ctx context.Context, ns cache.Namespace, d *repb.Digest, src io.Reader) error {
	r.note("Write")
	return r.Cache.Write(ctx, ns, d, src)
}

func (r *recorder) WriteCompressed(ctx context.Context, ns cache.Namespace, d *repb.Digest, src io.Reader) error {
	r.note("WriteCompressed")
	return r.Cache.WriteCompressed(ctx, ns, d, src)
}

func (r *recorder) PutHashed(ctx context.Context, ns cache.Namespace, d *repb.Digest, data []byte) error {
	r.note("PutHashed")
	return r.Cache.PutHashed(ctx, ns, d, data)
}

func (r *recorder) Close() error {
	r.note("Close")
	return nil
}

// TestWrappersKeepTheContract checks that wrapping a tier keeps each part
// of the contract: zstd frames reach the wrapped tier as a compressed
// write (so a tier storing zstd keeps them as sent), bytes just hashed as
// a hashed store, and Close closes it.
func TestWrappersKeepTheContract(t *testing.T) {
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	for _, tc := range []struct {
		name string
		wrap func(t *testing.T, c cache.Tier) cache.Tier
		// hashed is the call a hashed store arrives as.
		hashed string
	}{
		{"breaker", func(t *testing.T, c cache.Tier) cache.Tier {
			return cache.NewBreaker(c, cache.BreakerOptions{Logger: quiet})
		}, "PutHashed"},
		{"verifying", func(t *testing.T, c cache.Tier) cache.Tier { return cache.Verifying(c) }, "PutHashed"},
		{"counting", func(t *testing.T, c cache.Tier) cache.Tier { return cachecount.NewCounting(c) }, "PutHashed"},
		// A failover member's guard streams the bytes, so that they count
		// as progress: the remote hashes what it receives anyway.
		{"failover", func(t *testing.T, c cache.Tier) cache.Tier {
			ft, err := failover.New([]failover.Remote{{Tier: c, Name: "recorded"}}, failover.Options{Logger: quiet})
			if err != nil {
				t.Fatal(err)
			}
			return ft
		}, "Write"},
		{"breaker over counting over verifying", func(t *testing.T, c cache.Tier) cache.Tier {
			return cache.NewBreaker(cachecount.NewCounting(cache.Verifying(c)), cache.BreakerOptions{Logger: quiet})
		}, "PutHashed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			rec := &recorder{Cache: newLocal(t, "")}
			w := tc.wrap(t, rec)

			data := randBytes(50, mib)
			d := digest.Compute(digest.BLAKE3, data)
			enc, err := zstd.NewWriter(nil)
			if err != nil {
				t.Fatal(err)
			}
			frames := enc.EncodeAll(data, nil)
			enc.Close()
			if err := w.WriteCompressed(ctx, ns, d, bytes.NewReader(frames)); err != nil {
				t.Fatalf("WriteCompressed through %s: %v", tc.name, err)
			}
			if got := rec.took(); !slices.Equal(got, []string{"WriteCompressed"}) {
				t.Errorf("WriteCompressed through %s reached the tier as %v", tc.name, got)
			}

			other := randBytes(51, mib)
			od := digest.Compute(digest.BLAKE3, other)
			if err := w.PutHashed(ctx, ns, od, other); err != nil {
				t.Fatalf("PutHashed through %s: %v", tc.name, err)
			}
			if got := rec.took(); !slices.Equal(got, []string{tc.hashed}) {
				t.Errorf("PutHashed through %s reached the tier as %v, want %s", tc.name, got, tc.hashed)
			}
			for _, b := range []struct {
				d    *repb.Digest
				data []byte
			}{{d, data}, {od, other}} {
				got, err := cache.ReadAll(ctx, w, ns, b.d)
				if err != nil || !bytes.Equal(got, b.data) {
					t.Fatalf("reading %s back through %s: %d bytes, %v", digest.String(b.d), tc.name, len(got), err)
				}
			}

			if err := w.Close(); err != nil {
				t.Fatalf("Close through %s: %v", tc.name, err)
			}
			if got := rec.took(); !slices.Equal(got, []string{"Close"}) {
				t.Errorf("Close through %s reached the tier as %v", tc.name, got)
			}
		})
	}
}
