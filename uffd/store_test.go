package uffd

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/cow"
)

// storeFromFile splits path into a fresh local cache and reopens it lazily
// through a second cache instance (as a restoring process would), after
// corrupt (when non-nil) has damaged the cache directory.
func storeFromFile(t *testing.T, path string, chunk int64, corrupt func(lc *localcache.Cache, cf *cow.Store)) *cow.Store {
	t.Helper()
	dir := t.TempDir()
	lc, err := localcache.New(dir, localcache.Options{})
	if err != nil {
		t.Fatal(err)
	}
	s, _, err := cow.FromFile(context.Background(), "memory", path, lc, lc, cow.Options{ChunkSize: chunk, TempDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	cf := s.ChunkedFile()
	if corrupt != nil {
		corrupt(lc, s)
	}
	s.Close()
	lc.Close()
	opts := localcache.Options{}
	if corrupt != nil {
		// The damage stands for a write torn by a crash: the next boot
		// trusts no verification of the last one.
		opts.BootID = "after-a-crash"
	}
	lc2, err := localcache.New(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lc2.Close() })
	st, err := cow.Open("memory", cf, lc2, cow.Options{ChunkSize: chunk, TempDir: t.TempDir(), ReadAhead: -1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

// TestServeFromCopyOnWriteStore serves guest memory lazily from a real
// copy-on-write store over the local cache, holes as zero pages.
func TestServeFromCopyOnWriteStore(t *testing.T) {
	requireUffd(t)
	const size, chunk = 8 << 20, 256 << 10
	path, _ := memFile(t, size, chunk, 2, 7, 30)
	st := storeFromFile(t, path, chunk, nil)
	s := serve(t, context.Background(), st, Options{ChunkSize: chunk})
	stub := startStub(t, s.sock, path, "-regions", "2")
	if err := stub.finish(t, 60*time.Second); err != nil {
		t.Fatalf("stub: %v; stderr: %s", err, stub.stderr.String())
	}
	if stub.result == nil || stub.result.Result != "ok" || stub.result.Mismatches != 0 || stub.result.Pages != size/page {
		t.Fatalf("stub result %+v, want every page equal to the snapshot", stub.result)
	}
	if err := s.wait(t, 10*time.Second); err != nil {
		t.Fatalf("Serve: %v", err)
	}
	if z := s.srv.Stats().ZeroPages; z != 3*chunk/page {
		t.Errorf("zero pages = %d, want the %d pages of the 3 holes", z, 3*chunk/page)
	}
	if f := st.Stats().Fetched; f != size/chunk-3 {
		t.Errorf("store fetched %d chunks, want %d (every data chunk once)", f, size/chunk-3)
	}
}

// corruptChunk returns a storeFromFile corrupt func flipping a bit at byte
// at of the idx-th chunk's blob; *victim is set to the chunk's hash.
func corruptChunk(t *testing.T, idx int, at int64, victim *string) func(lc *localcache.Cache, s *cow.Store) {
	return func(lc *localcache.Cache, s *cow.Store) {
		c := s.ChunkedFile().GetChunks()[idx]
		*victim = c.GetDigest().GetHash()
		p := lc.Path(cache.Namespace{}, c.GetDigest())
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		b[at] ^= 0x40
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// TestServeCorruptChunkFailsRestore: a chunk whose content no longer
// matches its digest makes the server kill the VMM, never serve it.
func TestServeCorruptChunkFailsRestore(t *testing.T) {
	requireUffd(t)
	const size, chunk = 4 << 20, 256 << 10
	path, _ := memFile(t, size, chunk)
	var victim string
	st := storeFromFile(t, path, chunk, corruptChunk(t, 5, 1234, &victim))
	s := serve(t, context.Background(), st, Options{ChunkSize: chunk})
	stub := startStub(t, s.sock, path)
	err := s.wait(t, 60*time.Second)
	if status.Code(err) != codes.DataLoss || !strings.Contains(err.Error(), victim) {
		t.Fatalf("Serve error %v, want Internal naming digest %s", err, victim)
	}
	werr := stub.finish(t, 10*time.Second)
	var ee *exec.ExitError
	if !errors.As(werr, &ee) || stub.result != nil {
		t.Fatalf("stub ended with %v and result %+v, want it killed without a result", werr, stub.result)
	}
}
