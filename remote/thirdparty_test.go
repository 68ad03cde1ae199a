package remote_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"

	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/remote"
	"github.com/snaploader/snaploader/server"
	"github.com/snaploader/snaploader/snapshot"
)

// onReads is a server option wrapping the stream of every ByteStream Read.
func onReads(wrap func(grpc.ServerStream) grpc.ServerStream) grpc.ServerOption {
	return grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		if info.FullMethod == "/google.bytestream.ByteStream/Read" {
			ss = wrap(ss)
		}
		return handler(srv, ss)
	})
}

// A compressed read cut in the middle, from a server that would resend a
// compressed stream from byte zero, resumes where it stopped and delivers
// the blob's bytes, verified.
func TestCompressedReadResumesOnServerIgnoringOffsets(t *testing.T) {
	f := &compressedStreams{cutAfter: 2, ignoreOffsets: true}
	e := start(t, server.Options{}, onReads(f.stream))
	c := e.dial(t, remote.Options{})
	if !c.Compression() {
		t.Fatal("the server offers no zstd: nothing to test")
	}
	data := blob(6<<20, 17)
	for i := 0; i < len(data)/2; i += 997 {
		data[i] = 0
	}
	d := digest.Compute(c.DigestFunction(), data)
	if err := c.Write(context.Background(), cache.Namespace{}, d, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, c, cache.Namespace{}, d); !bytes.Equal(got, data) {
		t.Fatal("resumed read returned different data")
	}
	if !f.cut.Load() || e.calls("Read") != 2 {
		t.Fatalf("cut %v, %d Read calls; want a cut read and one resumption", f.cut.Load(), e.calls("Read"))
	}
	if n := f.ignored.Load(); n != 0 {
		t.Errorf("%d compressed reads resumed at an offset the server may ignore", n)
	}
}

// noRanges makes the server refuse every range read (a read limit) with
// code, as caches without range reads do, and counts the refusals.
type noRanges struct {
	code    codes.Code
	refused atomic.Int32
}

func (f *noRanges) stream(ss grpc.ServerStream) grpc.ServerStream {
	return &noRangesStream{ServerStream: ss, f: f}
}

type noRangesStream struct {
	grpc.ServerStream
	f *noRanges
}

func (s *noRangesStream) RecvMsg(m any) error {
	err := s.ServerStream.RecvMsg(m)
	if req, ok := m.(*bspb.ReadRequest); ok && err == nil && req.ReadLimit > 0 {
		s.f.refused.Add(1)
		return status.Errorf(s.f.code, "injected: read_limit %d not supported", req.ReadLimit)
	}
	return err
}

// A server without range reads is learned once: a lazy read touching
// every chunk of a snapshot sends one range read, which is refused, then
// verifies whole chunks; OUT_OF_RANGE for the read limit is such a refusal
// too.
func TestRangeReadsRefusedOncePerServer(t *testing.T) {
	for _, code := range []codes.Code{codes.Unimplemented, codes.OutOfRange} {
		t.Run(code.String(), func(t *testing.T) {
			ctx := context.Background()
			f := &noRanges{code: code}
			e := start(t, server.Options{}, onReads(f.stream))
			const chunk = 64 << 10
			data := blob(2<<20, 23)
			for i := len(data) / 2; i < len(data); i += 101 {
				data[i] = byte(i) | 1 // no chunk is a hole
			}
			mem := filepath.Join(t.TempDir(), "mem")
			if err := os.WriteFile(mem, data, 0o644); err != nil {
				t.Fatal(err)
			}
			host := func() *snapshot.Loader {
				lc, err := localcache.New(t.TempDir(), localcache.Options{MaxBytes: 1 << 30})
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { lc.Close() })
				c := e.dial(t, remote.Options{})
				l, err := snapshot.New(lc, c, snapshot.Options{Function: c.DigestFunction()})
				if err != nil {
					t.Fatal(err)
				}
				return l
			}
			task := snapshot.Task{InstanceName: "ci", PlatformHash: "p", ConfigurationHash: "c"}
			a := host()
			keys, err := a.KeySet(ctx, task, snapshot.KeySetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := a.CacheSnapshot(ctx, &snapshot.SaveRequest{Key: keys.GetWriteKey(), ChunkedFiles: []snapshot.NamedFile{{Name: "mem", Path: mem}},
				ChunkSize: chunk, Local: true, Remote: true}); err != nil {
				t.Fatal(err)
			}
			b := host()
			snap, err := b.GetSnapshot(ctx, keys, snapshot.GetOptions{ReadPolicy: snapshot.LocalFirst})
			if err != nil {
				t.Fatal(err)
			}
			u, err := b.UnpackSnapshot(ctx, snap, t.TempDir(), snapshot.UnpackOptions{ReadAhead: -1})
			if err != nil {
				t.Fatal(err)
			}
			defer u.Close()
			page := make([]byte, 4096)
			for off := int64(0); off < int64(len(data)); off += chunk {
				if _, err := u.Stores["mem"].ReadAt(page, off+8192); err != nil {
					t.Fatalf("reading at %d: %v", off+8192, err)
				}
				if !bytes.Equal(page, data[off+8192:off+8192+4096]) {
					t.Fatalf("bytes at %d differ", off+8192)
				}
			}
			if n := f.refused.Load(); n != 1 {
				t.Errorf("%d range reads refused over %d chunks; want 1 (learned once)", n, len(data)/chunk)
			}
		})
	}
}

// Concurrent range reads on a server without them wait for the first one's
// answer: one refusal, and every read is cache.ErrNoRange (the caller
// verifies the whole blob instead); the client's traits then say it
// serves no ranges.
func TestConcurrentRangeReadsRefusedOnce(t *testing.T) {
	f := &noRanges{code: codes.Unimplemented}
	e := start(t, server.Options{}, onReads(f.stream))
	c := e.dial(t, remote.Options{})
	data := blob(2<<20, 29)
	d := digest.Compute(c.DigestFunction(), data)
	if err := c.Write(context.Background(), cache.Namespace{}, d, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	if !c.Traits().ServesRanges {
		t.Fatal("a new client says its server serves no ranges")
	}
	errs := make(chan error, 8)
	for i := range 8 {
		go func() {
			_, err := c.ReadRange(context.Background(), cache.Namespace{}, d, int64(i)<<16, 4096)
			errs <- err
		}()
	}
	for range 8 {
		if err := <-errs; !errors.Is(err, cache.ErrNoRange) || status.Code(err) != codes.Unimplemented {
			t.Errorf("range read: %v; want Unimplemented wrapping cache.ErrNoRange", err)
		}
	}
	if n := f.refused.Load(); n != 1 {
		t.Errorf("%d range reads sent to a server without them; want 1", n)
	}
	if c.Traits().ServesRanges {
		t.Error("after a refusal the client still says its server serves ranges")
	}
	if got := readAll(t, c, cache.Namespace{}, d); !bytes.Equal(got, data) {
		t.Error("whole read after refused ranges returned different data")
	}
}
