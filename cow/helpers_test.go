package cow

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
)

// dirCAS is a small directory-backed blob store standing in for the local
// cache: blobs are files named by hash, verified when written and opened.
type dirCAS struct {
	dir       string
	opens     atomic.Int64
	closes    atomic.Int64
	writes    atomic.Int64
	openDelay time.Duration
	openErr   func(d *repb.Digest) error // injected failure, may be nil

	mu    sync.Mutex
	order []string // hashes in order of Open calls
}

func newDirCAS(t testing.TB) *dirCAS {
	return &dirCAS{dir: t.TempDir()}
}

func (c *dirCAS) path(d *repb.Digest) string { return filepath.Join(c.dir, d.Hash) }

func (c *dirCAS) FindMissing(ctx context.Context, ns cache.Namespace, ds []*repb.Digest) ([]*repb.Digest, error) {
	var out []*repb.Digest
	for _, d := range ds {
		if _, err := os.Stat(c.path(d)); err != nil {
			out = append(out, d)
		}
	}
	return out, nil
}

func (c *dirCAS) Write(ctx context.Context, ns cache.Namespace, d *repb.Digest, r io.Reader) error {
	b, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	if got := digest.Compute(ns.Function, b); !digest.Equal(got, d) {
		return status.Errorf(codes.InvalidArgument, "blob %s hashes to %s", digest.String(d), digest.String(got))
	}
	tmp := c.path(d) + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	c.writes.Add(1)
	return os.Rename(tmp, c.path(d))
}

type fileBlob struct {
	*os.File
	size int64
	c    *dirCAS
}

func (b *fileBlob) Size() int64 { return b.size }
func (b *fileBlob) WithContents(fn func(cache.Contents) error) error {
	return fn(cache.Contents{File: b.File})
}
func (b *fileBlob) Close() error {
	b.c.closes.Add(1)
	return b.File.Close()
}

func (c *dirCAS) Open(ctx context.Context, ns cache.Namespace, d *repb.Digest) (cache.Blob, error) {
	c.mu.Lock()
	c.order = append(c.order, d.Hash)
	c.mu.Unlock()
	c.opens.Add(1)
	if c.openDelay > 0 {
		time.Sleep(c.openDelay)
	}
	if c.openErr != nil {
		if err := c.openErr(d); err != nil {
			return nil, err
		}
	}
	b, err := os.ReadFile(c.path(d))
	if errors.Is(err, os.ErrNotExist) {
		return nil, cache.NotFoundf("blob %s not found", digest.String(d))
	}
	if err != nil {
		return nil, err
	}
	if got := digest.Compute(ns.Function, b); !digest.Equal(got, d) {
		return nil, status.Errorf(codes.DataLoss, "blob %s is corrupt", digest.String(d))
	}
	f, err := os.Open(c.path(d))
	if err != nil {
		return nil, err
	}
	return &fileBlob{File: f, size: d.SizeBytes, c: c}, nil
}

// OpenTier is Open: the directory is the one tier.
func (c *dirCAS) OpenTier(ctx context.Context, ns cache.Namespace, d *repb.Digest) (cache.Blob, string, error) {
	b, err := c.Open(ctx, ns, d)
	return b, cache.TierLocal, err
}

// ReadVerifiedRange serves no ranges: chunks are opened whole.
func (c *dirCAS) ReadVerifiedRange(context.Context, cache.Namespace, *repb.Digest, *repb.Digest, []byte, int64) error {
	return cache.ErrNoRange
}

// Fetch opens d and closes it again.
func (c *dirCAS) Fetch(ctx context.Context, ns cache.Namespace, d *repb.Digest) error {
	b, err := c.Open(ctx, ns, d)
	if err != nil {
		return err
	}
	return b.Close()
}

// PutHashed is Write: the directory hashes what it stores.
func (c *dirCAS) PutHashed(ctx context.Context, ns cache.Namespace, d *repb.Digest, data []byte) error {
	return c.Write(ctx, ns, d, bytes.NewReader(data))
}

const testCS = 16 * PageSize // 64 KiB chunks keep test data small

// randBytes returns n deterministic pseudo-random bytes.
func randBytes(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := 0; i+8 <= n; i += 8 {
		v := r.Uint64()
		for k := range 8 {
			b[i+k] = byte(v >> (8 * k))
		}
	}
	for i := n &^ 7; i < n; i++ {
		b[i] = byte(r.Uint32())
	}
	return b
}

// layout builds file content: for each chunk, 'd' = random data,
// 'z' = explicit zeros, 'h' = hole (sparse), plus a short tail of tail bytes.
func layout(t testing.TB, dir, spec string, tail int) (string, []byte) {
	t.Helper()
	size := int64(len(spec))*testCS + int64(tail)
	want := make([]byte, size)
	path := filepath.Join(dir, "file")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	for i, k := range spec {
		off := int64(i) * testCS
		switch k {
		case 'd':
			copy(want[off:], randBytes(uint64(i+1), testCS))
			if _, err := f.WriteAt(want[off:off+testCS], off); err != nil {
				t.Fatal(err)
			}
		case 'z':
			if _, err := f.WriteAt(make([]byte, testCS), off); err != nil {
				t.Fatal(err)
			}
		}
	}
	if tail > 0 {
		off := int64(len(spec)) * testCS
		copy(want[off:], randBytes(999, tail))
		if _, err := f.WriteAt(want[off:], off); err != nil {
			t.Fatal(err)
		}
	}
	return path, want
}

func testOpts(t testing.TB) Options {
	return Options{ChunkSize: testCS, TempDir: t.TempDir(), ReadAhead: -1}
}

// newStore splits a file with the given layout and returns a lazy store
// over the result, reopened so that nothing has been fetched.
func newStore(t *testing.T, spec string, tail int, opts Options) (*Store, *dirCAS, []byte) {
	t.Helper()
	cas := newDirCAS(t)
	path, want := layout(t, t.TempDir(), spec, tail)
	s0, _, err := FromFile(context.Background(), "mem", path, cas, cas, opts)
	if err != nil {
		t.Fatal(err)
	}
	cf := s0.ChunkedFile()
	if err := s0.Close(); err != nil {
		t.Fatal(err)
	}
	s, err := Open("mem", cf, cas, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	cas.opens.Store(0)
	cas.closes.Store(0)
	return s, cas, want
}

func readAll(t *testing.T, s *Store) []byte {
	t.Helper()
	got := make([]byte, s.Size())
	n, err := s.ReadAt(got, 0)
	if err != nil || n != len(got) {
		t.Fatalf("ReadAt(all) = %d, %v", n, err)
	}
	return got
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
