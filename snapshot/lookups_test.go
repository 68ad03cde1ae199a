package snapshot

import (
	"bytes"
	"context"
	"sync"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
)

// lookupRecorder is a remote tier that records how many action-cache
// reads are in flight at once; each read waits (up to a bound) for others
// to arrive, so reads sent together are seen together. Reads under a
// function the recorder rejects fail as a cache that checks hash lengths
// per function does.
type lookupRecorder struct {
	cache.Tier
	reject digest.Function

	mu       sync.Mutex
	inFlight int
	most     int
	calls    int
	grow     chan struct{}
}

func (r *lookupRecorder) GetActionResult(ctx context.Context, ns cache.Namespace, key *repb.Digest) (*repb.ActionResult, error) {
	r.mu.Lock()
	r.inFlight++
	r.calls++
	r.most = max(r.most, r.inFlight)
	close(r.grow)
	r.grow = make(chan struct{})
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		r.inFlight--
		r.mu.Unlock()
	}()
	// Wait while others keep arriving (a guard, not a measurement: reads
	// sent one after another each wait out the bound alone).
	for {
		r.mu.Lock()
		grow := r.grow
		r.mu.Unlock()
		select {
		case <-grow:
			continue
		case <-time.After(200 * time.Millisecond):
		}
		break
	}
	if r.reject != 0 && ns.Function == r.reject {
		return nil, errkind.New(errkind.InvalidArgument, "hash has length 64, while 40 characters were expected")
	}
	return r.Tier.GetActionResult(ctx, ns, key)
}

// TestKeySetLookupsGoOutTogether: a cold host looking up a key set whose
// only snapshot is under the last fallback asks the remote for every key's
// manifest under every digest function at once, not one after another.
func TestKeySetLookupsGoOutTogether(t *testing.T) {
	ctx := context.Background()
	remoteLC, err := localcache.New(t.TempDir(), localcache.Options{MaxBytes: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	defer remoteLC.Close()
	writer := newHost(t, remoteLC, Options{})
	mem, files := vmFiles(t, t.TempDir(), 90, 1<<20)
	writer.save(t, writer.keys(t, taskOn("main", "", "")).GetBranchKey(), mem, files, true)

	for _, tc := range []struct {
		name   string
		reject digest.Function
	}{
		{"every function answers", 0},
		{"a secondary function is rejected", digest.SHA256},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := &lookupRecorder{Tier: remoteLC, reject: tc.reject, grow: make(chan struct{})}
			cold := newHost(t, rec, Options{RemoteFunctions: []digest.Function{digest.BLAKE3, digest.Function(7), digest.SHA256}})
			ks := cold.keys(t, taskOn("feat/a", "feat", "main")) // found under the third key
			rec.mu.Lock()
			rec.most, rec.calls = 0, 0
			rec.mu.Unlock()
			snap, err := cold.loader.GetSnapshot(ctx, ks, GetOptions{ReadPolicy: LocalFirst})
			if err != nil {
				t.Fatal(err)
			}
			if snap.FallbackIndex != 2 || snap.Source != SourceRemote {
				t.Fatalf("found at fallback %d in %s, want 2 in the remote", snap.FallbackIndex, snap.Source)
			}
			got, _ := cold.restoreBytes(t, snap)
			if !bytes.Equal(got, mustRead(t, mem)) {
				t.Fatal("restored bytes differ")
			}
			rec.mu.Lock()
			most, calls := rec.most, rec.calls
			rec.mu.Unlock()
			// Three keys, two functions snaploader writes (the one it does
			// not write is never asked for): six reads, all at once.
			if calls != 6 || most != 6 {
				t.Errorf("%d manifest reads, at most %d at once; want 6, all at once", calls, most)
			}
		})
	}
}
