package cache_test

import (
	"bytes"
	"context"
	"io"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/internal/cachecount"
)

type down struct{ cache.Tier }

func (down) Read(context.Context, cache.Namespace, *repb.Digest) (io.ReadCloser, error) {
	return nil, status.Error(codes.Unavailable, "connection refused")
}

func readBlob(t *testing.T, o cache.Opener, d *repb.Digest) ([]byte, error) {
	t.Helper()
	b, err := o.Open(context.Background(), ns, d)
	if err != nil {
		return nil, err
	}
	defer b.Close()
	buf := make([]byte, b.Size())
	if _, err := b.ReadAt(buf, 0); err != nil && err != io.EOF {
		return nil, err
	}
	return buf, nil
}

func TestReadThrough(t *testing.T) {
	data := randBytes(2, 3*mib+5)
	d := digest.Compute(digest.BLAKE3, data)
	tests := []struct {
		name string
		// setup returns the local dir's cache and the remote; it may
		// store or damage data.
		setup       func(t *testing.T) (*localcache.Cache, cache.Tier)
		code        codes.Code
		wantFetches int64
	}{
		{"local hit", func(t *testing.T) (*localcache.Cache, cache.Tier) {
			l := newLocal(t, "")
			put(t, l, data)
			return l, newLocal(t, "")
		}, codes.OK, 0},
		{"fetched from remote", func(t *testing.T) (*localcache.Cache, cache.Tier) {
			r := newLocal(t, "")
			put(t, r, data)
			return newLocal(t, ""), r
		}, codes.OK, 1},
		{"corrupt local copy refetched", func(t *testing.T) (*localcache.Cache, cache.Tier) {
			l := newLocal(t, "")
			put(t, l, data)
			damage(t, l.Path(ns, d), "flip")
			r := newLocal(t, "")
			put(t, r, data)
			return newLocalBoot(t, l.Dir(), "after-a-crash"), r // the local copy is unverified
		}, codes.OK, 1},
		{"missing everywhere", func(t *testing.T) (*localcache.Cache, cache.Tier) {
			return newLocal(t, ""), newLocal(t, "")
		}, codes.NotFound, 0},
		{"corrupt in remote", func(t *testing.T) (*localcache.Cache, cache.Tier) {
			r := newLocal(t, "")
			put(t, r, data)
			damage(t, r.Path(ns, d), "flip") // r trusts its own write
			return newLocal(t, ""), r
		}, codes.DataLoss, 0},
		{"truncated in remote", func(t *testing.T) (*localcache.Cache, cache.Tier) {
			r := newLocal(t, "")
			put(t, r, data)
			damage(t, r.Path(ns, d), "truncate")
			return newLocal(t, ""), r
		}, codes.DataLoss, 0},
		{"remote down", func(t *testing.T) (*localcache.Cache, cache.Tier) {
			return newLocal(t, ""), down{newLocal(t, "")}
		}, codes.Unavailable, 0},
		{"no remote", func(t *testing.T) (*localcache.Cache, cache.Tier) {
			return newLocal(t, ""), nil
		}, codes.NotFound, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l, r := tt.setup(t)
			rt := cache.NewReadThrough(l, r)
			got, err := readBlob(t, rt, d)
			if status.Code(err) != tt.code {
				t.Fatalf("Open: %v, want %v", err, tt.code)
			}
			if err != nil {
				if !strings.Contains(err.Error(), d.Hash) {
					t.Errorf("error %q does not name the digest", err)
				}
				if m, _ := l.FindMissing(context.Background(), ns, []*repb.Digest{d}); len(m) != 1 {
					t.Error("failed fetch left the blob in the local tier")
				}
				return
			}
			if !bytes.Equal(got, data) {
				t.Fatal("wrong content")
			}
			if s := rt.Stats(); s.RemoteFetches != tt.wantFetches || s.RemoteBytes != tt.wantFetches*d.SizeBytes {
				t.Errorf("stats %+v, want %d fetches", s, tt.wantFetches)
			}
			// Now local: Read streams it without another fetch.
			rc, err := rt.Read(context.Background(), ns, d)
			if err != nil {
				t.Fatal(err)
			}
			got, _ = io.ReadAll(rc)
			rc.Close()
			if !bytes.Equal(got, data) || rt.Stats().RemoteFetches != tt.wantFetches {
				t.Errorf("second read: %d bytes, stats %+v", len(got), rt.Stats())
			}
			// The local tier really holds it, in a fresh instance too.
			if got, err := cache.ReadAll(context.Background(), newLocal(t, l.Dir()), ns, d); err != nil || !bytes.Equal(got, data) {
				t.Errorf("local tier after fetch: %v", err)
			}
		})
	}
}

func TestReadThroughFetchesOnce(t *testing.T) {
	for round := 0; round < 5; round++ {
		remote := newLocal(t, "")
		data := randBytes(uint64(10+round), 4096000)
		d := put(t, remote, data)
		counted := cachecount.NewCounting(remote)
		rt := cache.NewReadThrough(newLocal(t, ""), counted)
		var wg sync.WaitGroup
		errs := make([]error, 16)
		for i := range errs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				got, err := readBlob(t, rt, d)
				if err == nil && !bytes.Equal(got, data) {
					err = io.ErrUnexpectedEOF
				}
				errs[i] = err
			}()
		}
		wg.Wait()
		for _, err := range errs {
			if err != nil {
				t.Fatal(err)
			}
		}
		if s := counted.Stats(); s.Reads != 1 || s.ReadBytes != d.SizeBytes {
			t.Fatalf("remote stats %+v, want one read of %d bytes", s, d.SizeBytes)
		}
		if s := rt.Stats(); s.RemoteFetches != 1 {
			t.Fatalf("read-through stats %+v", s)
		}
	}
}

func TestReadThroughCanceledCaller(t *testing.T) {
	remote := newLocal(t, "")
	d := put(t, remote, randBytes(20, mib))
	rt := cache.NewReadThrough(newLocal(t, ""), remote)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := rt.Open(ctx, ns, d); status.Code(err) != codes.Canceled {
		t.Errorf("Open with canceled ctx: %v", err)
	}
}

// countingLocal is a local tier that counts what is written into it and
// read from its files.
type countingLocal struct {
	*localcache.Cache
	hashedPuts, hashedBytes, writes, fileReads atomic.Int64
}

func (c *countingLocal) PutHashed(ctx context.Context, ns cache.Namespace, d *repb.Digest, data []byte) error {
	c.hashedPuts.Add(1)
	c.hashedBytes.Add(int64(len(data)))
	return c.Cache.PutHashed(ctx, ns, d, data)
}

func (c *countingLocal) Write(ctx context.Context, ns cache.Namespace, d *repb.Digest, r io.Reader) error {
	c.writes.Add(1)
	return c.Cache.Write(ctx, ns, d, r)
}

func (c *countingLocal) Open(ctx context.Context, ns cache.Namespace, d *repb.Digest) (cache.Blob, error) {
	b, err := c.Cache.Open(ctx, ns, d)
	if err != nil {
		return nil, err
	}
	return countedBlob{b, &c.fileReads}, nil
}

type countedBlob struct {
	cache.Blob
	n *atomic.Int64
}

func (b countedBlob) ReadAt(p []byte, off int64) (int, error) {
	b.n.Add(1)
	return b.Blob.ReadAt(p, off)
}

// A fetched blob is verified once (one remote read), stored once (one
// write of its bytes into the local tier) and served to its reader from
// the verified buffer, not read back from the file just written; once it
// is closed the local tier holds it. With a budget smaller than one blob,
// the buffer of a blob whose write has ended is dropped and reads go on,
// correct, from the local file.
func TestReadThroughHandoff(t *testing.T) {
	for _, tc := range []struct {
		name      string
		budget    int64
		fileReads bool
	}{{"buffer", 0, false}, {"dropped", 1, true}, {"off", -1, true}} {
		t.Run(tc.name, func(t *testing.T) {
			remote := newLocal(t, "")
			counted := cachecount.NewCounting(remote)
			local := &countingLocal{Cache: newLocal(t, "")}
			rt := cache.NewReadThroughOptions(local, counted, cache.ReadThroughOptions{HandoffBytes: tc.budget})
			datas := [][]byte{randBytes(31, 4096000), randBytes(32, 3*mib+4097)}
			var ds []*repb.Digest
			var blobs []cache.Blob
			for _, data := range datas {
				d := put(t, remote, data)
				ds = append(ds, d)
				b, tier, err := rt.OpenTier(context.Background(), ns, d)
				if err != nil || tier != cache.TierRemote {
					t.Fatalf("OpenTier %s: tier %q, %v", d.Hash, tier, err)
				}
				blobs = append(blobs, b)
			}
			if tc.budget > 0 {
				// The first blob's write must end before its buffer goes.
				if err := rt.Fetch(context.Background(), ns, ds[0]); err != nil {
					t.Fatal(err)
				}
				if err := rt.Fetch(context.Background(), ns, ds[1]); err != nil {
					t.Fatal(err)
				}
				// A new handoff trims the old ones.
				b, err := rt.Open(context.Background(), ns, put(t, remote, randBytes(33, mib)))
				if err != nil {
					t.Fatal(err)
				}
				b.Close()
			}
			before := local.fileReads.Load()
			for i, b := range blobs {
				got := make([]byte, b.Size())
				// Read in two parts, the second reaching the end.
				n1, err1 := b.ReadAt(got[:b.Size()/3], 0)
				n2, err2 := b.ReadAt(got[b.Size()/3:], b.Size()/3)
				if err1 != nil || (err2 != nil && err2 != io.EOF) || int64(n1+n2) != b.Size() || !bytes.Equal(got, datas[i]) {
					t.Fatalf("blob %d: read %d+%d bytes (%v, %v), equal=%v", i, n1, n2, err1, err2, bytes.Equal(got, datas[i]))
				}
				if n, err := b.ReadAt(make([]byte, 10), b.Size()-4); n != 4 || err != io.EOF {
					t.Errorf("blob %d: read across the end: %d, %v", i, n, err)
				}
				if err := b.Close(); err != nil {
					t.Fatal(err)
				}
			}
			if got := local.fileReads.Load() > before; got != tc.fileReads {
				t.Errorf("reads went to the local file: %v, want %v", got, tc.fileReads)
			}
			wantReads := int64(len(ds))
			if tc.budget > 0 {
				wantReads++
			}
			if s := counted.Stats(); s.Reads != wantReads {
				t.Errorf("remote reads %d, want one per blob", s.Reads)
			}
			var want int64
			for _, d := range ds {
				want += d.SizeBytes
			}
			if tc.budget > 0 {
				want += mib
			}
			if local.hashedBytes.Load() != want || local.writes.Load() != 0 {
				t.Errorf("local tier got %d bytes in %d hashed puts and %d streamed writes, want %d bytes once", local.hashedBytes.Load(), local.hashedPuts.Load(), local.writes.Load(), want)
			}
			// Closed: the local tier holds every blob, in a fresh instance too.
			for i, d := range ds {
				if got, err := cache.ReadAll(context.Background(), newLocal(t, local.Dir()), ns, d); err != nil || !bytes.Equal(got, datas[i]) {
					t.Errorf("blob %d in the local tier after close: %v", i, err)
				}
			}
		})
	}
}
