package remote_test

import (
	"bytes"
	"context"
	"strings"
	"sync/atomic"
	"testing"

	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/remote"
	"github.com/snaploader/snaploader/server"
)

// offsetIgnoring makes the server behave like caches that ignore
// read_offset on compressed-blobs reads and resend the stream from its
// start, and cuts the first compressed read after two messages.
type offsetIgnoring struct {
	cut     atomic.Bool
	ignored atomic.Int32 // compressed reads asked at an offset
}

func (f *offsetIgnoring) intercept(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if info.FullMethod != "/google.bytestream.ByteStream/Read" {
		return handler(srv, ss)
	}
	return handler(srv, &offsetIgnoringStream{ServerStream: ss, f: f})
}

type offsetIgnoringStream struct {
	grpc.ServerStream
	f          *offsetIgnoring
	compressed bool
	sent       int
}

func (s *offsetIgnoringStream) RecvMsg(m any) error {
	err := s.ServerStream.RecvMsg(m)
	if req, ok := m.(*bspb.ReadRequest); ok && err == nil && strings.Contains(req.ResourceName, "compressed-blobs/") {
		s.compressed = true
		if req.ReadOffset > 0 {
			s.f.ignored.Add(1)
			req.ReadOffset = 0
		}
	}
	return err
}

func (s *offsetIgnoringStream) SendMsg(m any) error {
	if s.compressed && s.sent == 2 && s.f.cut.CompareAndSwap(false, true) {
		return status.Error(codes.Unavailable, "injected: connection lost")
	}
	s.sent++
	return s.ServerStream.SendMsg(m)
}

// A compressed read cut in the middle, from a server that would resend a
// compressed stream from byte zero, resumes where it stopped and delivers
// the blob's bytes, verified.
func TestCompressedReadResumesOnServerIgnoringOffsets(t *testing.T) {
	f := &offsetIgnoring{}
	e := start(t, server.Options{}, grpc.ChainStreamInterceptor(f.intercept))
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
