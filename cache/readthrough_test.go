package cache_test

import (
	"bytes"
	"context"
	"io"
	"strings"
	"sync"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/digest"
)

type down struct{ cache.Cache }

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
		setup       func(t *testing.T) (*localcache.Cache, cache.Cache)
		code        codes.Code
		wantFetches int64
	}{
		{"local hit", func(t *testing.T) (*localcache.Cache, cache.Cache) {
			l := newLocal(t, "")
			put(t, l, data)
			return l, newLocal(t, "")
		}, codes.OK, 0},
		{"fetched from remote", func(t *testing.T) (*localcache.Cache, cache.Cache) {
			r := newLocal(t, "")
			put(t, r, data)
			return newLocal(t, ""), r
		}, codes.OK, 1},
		{"corrupt local copy refetched", func(t *testing.T) (*localcache.Cache, cache.Cache) {
			l := newLocal(t, "")
			put(t, l, data)
			damage(t, l.Path(ns, d), "flip")
			r := newLocal(t, "")
			put(t, r, data)
			return newLocal(t, l.Dir()), r // a restart: the local copy is unverified
		}, codes.OK, 1},
		{"missing everywhere", func(t *testing.T) (*localcache.Cache, cache.Cache) {
			return newLocal(t, ""), newLocal(t, "")
		}, codes.NotFound, 0},
		{"corrupt in remote", func(t *testing.T) (*localcache.Cache, cache.Cache) {
			r := newLocal(t, "")
			put(t, r, data)
			damage(t, r.Path(ns, d), "flip") // r trusts its own write
			return newLocal(t, ""), r
		}, codes.Internal, 0},
		{"truncated in remote", func(t *testing.T) (*localcache.Cache, cache.Cache) {
			r := newLocal(t, "")
			put(t, r, data)
			damage(t, r.Path(ns, d), "truncate")
			return newLocal(t, ""), r
		}, codes.Internal, 0},
		{"remote down", func(t *testing.T) (*localcache.Cache, cache.Cache) {
			return newLocal(t, ""), down{newLocal(t, "")}
		}, codes.Unavailable, 0},
		{"no remote", func(t *testing.T) (*localcache.Cache, cache.Cache) {
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
		counted := cache.NewCounting(remote)
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
