package encrypted

import (
	"context"
	"fmt"
	"io"
	"path/filepath"
	"sync"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/cachetest"
	"github.com/snaploader/snaploader/cache/localcache"
)

// TestConformance runs the tier suite on the wrapper over a local cache.
// The wrapper cannot be reopened: which ciphertext holds a plaintext blob
// it learns from the blobs it writes and the entries it reads, so a new
// one reads blobs only through entries.
func TestConformance(t *testing.T) {
	cachetest.Run(t, cachetest.Harness{
		New: func(t *testing.T) cachetest.Tier {
			inner := &restartable{dir: t.TempDir()}
			inner.restart(t)
			c := wrap(t, inner, ring(t, 1))
			return cachetest.Tier{
				Cache: c,
				// The ciphertext is damaged in the wrapped tier, which then
				// restarts (as a local cache shared by processes does) and
				// so verifies it again instead of trusting its own write.
				Corrupt: func(t *testing.T, ns cache.Namespace, d *repb.Digest, damage func([]byte) []byte) {
					s := c.lookupAny(ns.DigestFunction(), d)
					if s == nil {
						t.Fatalf("no ciphertext known for %s", d.Hash)
					}
					cachetest.DamageFile(t, inner.local().Path(ns, s), damage)
					inner.restart(t)
				},
				// The wrapped tier returns the stored entry with a byte of
				// its sealed payload flipped.
				CorruptActionResult: func(t *testing.T, ns cache.Namespace, key *repb.Digest) {
					ctx := context.Background()
					stored, err := inner.GetActionResult(ctx, ns, key)
					if err != nil {
						t.Fatal(err)
					}
					se, ok := SealedEntryOf(stored)
					if !ok {
						t.Fatal("the stored entry is not sealed")
					}
					se.Ciphertext[len(se.Ciphertext)/2] ^= 0x40
					a, err := anypb.New(se)
					if err != nil {
						t.Fatal(err)
					}
					stored.ExecutionMetadata.AuxiliaryMetadata = []*anypb.Any{a}
					if err := inner.UpdateActionResult(ctx, ns, key, stored); err != nil {
						t.Fatal(err)
					}
				},
				Leftovers: func(t *testing.T) []string {
					lc := inner.local()
					return cachetest.FilesUnder(t, filepath.Join(lc.Dir(), "tmp"), filepath.Join(lc.Dir(), "cas"), c.opts.TempDir)
				},
				Exhaust: cachetest.ExhaustDescriptors,
			}
		},
		Full: func(t *testing.T, size int64) (cache.Cache, func()) {
			fs := cachetest.SmallFilesystem(t, 4*size+1<<20)
			inner := &restartable{dir: filepath.Join(fs, "cache")}
			inner.restart(t)
			return wrap(t, inner, ring(t, 1)), cachetest.Fill(t, fs, size/2)
		},
	})
}

// restartable is a local cache that restarts under the wrapper: restart
// opens its directory again as a process of another boot, which trusts no
// verification of the last one.
type restartable struct {
	dir   string
	mu    sync.Mutex
	lc    *localcache.Cache
	boots int
}

func (r *restartable) restart(t *testing.T) {
	t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	r.boots++
	lc, err := localcache.New(r.dir, localcache.Options{MaxBytes: 1 << 30, BootID: fmt.Sprintf("boot-%d", r.boots)})
	if err != nil {
		t.Fatal(err)
	}
	r.lc = lc
}

func (r *restartable) local() *localcache.Cache {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.lc
}

func (r *restartable) FindMissing(ctx context.Context, ns cache.Namespace, ds []*repb.Digest) ([]*repb.Digest, error) {
	return r.local().FindMissing(ctx, ns, ds)
}

func (r *restartable) Read(ctx context.Context, ns cache.Namespace, d *repb.Digest) (io.ReadCloser, error) {
	return r.local().Read(ctx, ns, d)
}

func (r *restartable) Write(ctx context.Context, ns cache.Namespace, d *repb.Digest, rd io.Reader) error {
	return r.local().Write(ctx, ns, d, rd)
}

func (r *restartable) WriteReporting(ctx context.Context, ns cache.Namespace, d *repb.Digest, rd io.Reader) (bool, error) {
	return r.local().WriteReporting(ctx, ns, d, rd)
}

func (r *restartable) GetActionResult(ctx context.Context, ns cache.Namespace, key *repb.Digest) (*repb.ActionResult, error) {
	return r.local().GetActionResult(ctx, ns, key)
}

func (r *restartable) UpdateActionResult(ctx context.Context, ns cache.Namespace, key *repb.Digest, ar *repb.ActionResult) error {
	return r.local().UpdateActionResult(ctx, ns, key, ar)
}

func (r *restartable) ReadRange(ctx context.Context, ns cache.Namespace, d *repb.Digest, off, n int64) (io.ReadCloser, error) {
	return r.local().ReadRange(ctx, ns, d, off, n)
}

func (r *restartable) ReadCompressed(ctx context.Context, ns cache.Namespace, d *repb.Digest) (io.ReadCloser, bool, error) {
	return r.local().ReadCompressed(ctx, ns, d)
}

func (r *restartable) Traits() cache.Traits { return r.local().Traits() }

func (r *restartable) WriteCompressed(ctx context.Context, ns cache.Namespace, d *repb.Digest, rd io.Reader) error {
	return r.local().WriteCompressed(ctx, ns, d, rd)
}

func (r *restartable) PutHashed(ctx context.Context, ns cache.Namespace, d *repb.Digest, data []byte) error {
	return r.local().PutHashed(ctx, ns, d, data)
}

func (r *restartable) Down() error  { return nil }
func (r *restartable) Close() error { return r.local().Close() }
