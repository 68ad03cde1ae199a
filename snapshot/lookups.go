package snapshot

import (
	"context"
	"sync"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
	"github.com/snaploader/snaploader/proto/snapshotpb"
)

// remoteLookups are one GetSnapshot's reads of remote manifests. The first
// time a key needs its remote manifest, the manifests of that key and of
// every later key of the set are asked for at once (each under every
// digest function), so a cold lookup of a key set costs one round trip to
// the remote, not one per key and function; a host that finds its
// snapshot locally asks the remote nothing.
type remoteLookups struct {
	l    *Loader
	keys []*snapshotpb.SnapshotKey

	once    sync.Once
	cancel  context.CancelFunc
	results []*manifestLookup // by key index, from the first asked for
	from    int
}

// manifestLookup is one manifest read in flight.
type manifestLookup struct {
	done chan struct{}
	ar   *repb.ActionResult
	err  error
}

func newRemoteLookups(l *Loader, keys []*snapshotpb.SnapshotKey) *remoteLookups {
	return &remoteLookups{l: l, keys: keys}
}

// get returns the remote manifest of key idx (whose manifest key is mk),
// starting the reads of it and of every later key on the first call.
func (rl *remoteLookups) get(ctx context.Context, idx int, mk *repb.Digest) (*repb.ActionResult, error) {
	rl.once.Do(func() {
		lctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
		rl.cancel, rl.from = cancel, idx
		for i := idx; i < len(rl.keys); i++ {
			k, err := RemoteManifestKey(rl.keys[i])
			m := &manifestLookup{done: make(chan struct{})}
			rl.results = append(rl.results, m)
			if err != nil {
				m.err = err
				close(m.done)
				continue
			}
			go func() {
				defer close(m.done)
				m.ar, m.err = rl.l.getManifest(lctx, true, rl.keys[i].GetInstanceName(), k)
			}()
		}
	})
	i := idx - rl.from
	if i < 0 || i >= len(rl.results) {
		return rl.l.getManifest(ctx, true, rl.keys[idx].GetInstanceName(), mk)
	}
	m := rl.results[i]
	select {
	case <-m.done:
		return m.ar, m.err
	case <-ctx.Done():
		return nil, errkind.New(errkind.Of(ctx.Err()), "reading remote manifest %s: %w", digest.String(mk), ctx.Err())
	}
}

// close stops the reads still in flight.
func (rl *remoteLookups) close() {
	if rl != nil && rl.cancel != nil {
		rl.cancel()
	}
}

// getManifestAll reads the manifest under key from a tier under every
// digest function it may be stored under, all at once, and returns the
// first found in the order of preference. A function the tier rejects for
// this digest (a cache that checks hash lengths per function) is a miss
// there, unless it is the loader's own.
func (l *Loader) getManifestAll(ctx context.Context, c cache.Cache, fns []digest.Function, instance string, key *repb.Digest) (*repb.ActionResult, error) {
	type result struct {
		ar  *repb.ActionResult
		err error
	}
	results := make([]result, len(fns))
	var wg sync.WaitGroup
	for i, fn := range fns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ar, err := c.GetActionResult(ctx, l.ns(instance, fn), key)
			results[i] = result{ar, err}
		}()
	}
	wg.Wait()
	var first error
	for i, r := range results {
		switch {
		case r.err == nil:
			return r.ar, nil
		case cache.IsNotFound(r.err), i > 0 && errkind.Is(r.err, errkind.InvalidArgument):
			if first == nil {
				first = r.err
			}
		default:
			return nil, r.err
		}
	}
	return nil, first
}
