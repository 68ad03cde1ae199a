package remote_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"strings"
	"sync/atomic"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/klauspost/compress/zstd"
	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/remote"
	"github.com/snaploader/snaploader/server"
)

// compressedStreams changes what the server does on compressed reads:
// replace, when set, turns the first message's data into its result and
// drops the others; cutAfter > 0 fails the first compressed read after
// that many messages; ignoreOffsets makes it resend a compressed stream
// from its start whatever read_offset asks (as some caches do), counting
// those reads in ignored.
type compressedStreams struct {
	replace       func([]byte) []byte
	cutAfter      int
	cut           atomic.Bool
	ignoreOffsets bool
	ignored       atomic.Int32
}

func (f *compressedStreams) stream(ss grpc.ServerStream) grpc.ServerStream {
	return &compressedStream{ServerStream: ss, f: f}
}

type compressedStream struct {
	grpc.ServerStream
	f          *compressedStreams
	compressed bool
	sent       int
}

func (s *compressedStream) RecvMsg(m any) error {
	err := s.ServerStream.RecvMsg(m)
	if req, ok := m.(*bspb.ReadRequest); ok && err == nil {
		s.compressed = strings.Contains(req.ResourceName, "compressed-blobs/")
		if s.compressed && s.f.ignoreOffsets && req.ReadOffset > 0 {
			s.f.ignored.Add(1)
			req.ReadOffset = 0
		}
	}
	return err
}

func (s *compressedStream) SendMsg(m any) error {
	if !s.compressed {
		return s.ServerStream.SendMsg(m)
	}
	s.sent++
	if s.f.cutAfter > 0 && s.sent > s.f.cutAfter && s.f.cut.CompareAndSwap(false, true) {
		return status.Error(codes.Unavailable, "injected: connection lost")
	}
	if s.f.replace != nil {
		if s.sent > 1 {
			return nil
		}
		m = &bspb.ReadResponse{Data: s.f.replace(m.(*bspb.ReadResponse).Data)}
	}
	return s.ServerStream.SendMsg(m)
}

// A compressed read into a buffer that holds the whole blob is received
// whole and decoded into that buffer; it is verified, resumes after a
// cut, and reports frames that decode to more than the blob, or do not
// decode, as corrupt.
func TestWholeBlobCompressedReads(t *testing.T) {
	const size = 6 << 20
	data := blob(size, 29)
	for i := 0; i < size/2; i += 991 {
		data[i] = 0
	}
	enc, err := zstd.NewWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name    string
		f       *compressedStreams
		corrupt bool
		reads   int
	}{
		{name: "undisturbed", f: &compressedStreams{}, reads: 1},
		{name: "cut", f: &compressedStreams{cutAfter: 2}, reads: 2},
		{name: "decodes to more", f: &compressedStreams{replace: func([]byte) []byte {
			return enc.EncodeAll(make([]byte, size+4096), nil)
		}}, corrupt: true, reads: 1},
		{name: "not zstd", f: &compressedStreams{replace: func(b []byte) []byte {
			return bytes.Repeat([]byte{0x5a}, len(b))
		}}, corrupt: true, reads: 1},
		{name: "other content", f: &compressedStreams{replace: func([]byte) []byte {
			return enc.EncodeAll(make([]byte, size), nil)
		}}, corrupt: true, reads: 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := start(t, server.Options{}, onReads(tc.f.stream))
			c := e.dial(t, remote.Options{})
			if !c.Compression() {
				t.Fatal("the server offers no zstd: nothing to test")
			}
			d := digest.Compute(c.DigestFunction(), data)
			ctx := context.Background()
			if err := c.Write(ctx, cache.Namespace{}, d, bytes.NewReader(data)); err != nil {
				t.Fatal(err)
			}
			got, err := readWhole(ctx, c, d)
			switch {
			case tc.corrupt && !cache.IsCorrupt(err):
				t.Fatalf("read: %v, want a corrupt blob", err)
			case !tc.corrupt && err != nil:
				t.Fatal(err)
			case !tc.corrupt && !bytes.Equal(got, data):
				t.Fatal("read returned other bytes")
			}
			if n := e.calls("Read"); n != tc.reads {
				t.Errorf("%d Read calls, want %d", n, tc.reads)
			}
		})
	}
}

// readWhole reads d with one buffer of its size, as a fetch into the
// local cache does, and checks that the blob ends there.
func readWhole(ctx context.Context, c cache.Tier, d *repb.Digest) ([]byte, error) {
	rc, err := c.Read(ctx, cache.Namespace{}, d)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	buf := make([]byte, d.GetSizeBytes())
	if _, err := io.ReadFull(rc, buf); err != nil {
		return nil, err
	}
	var one [1]byte
	if n, err := rc.Read(one[:]); n != 0 || !errors.Is(err, io.EOF) {
		if err == nil || errors.Is(err, io.EOF) {
			return nil, cache.Corruptf("more than %d bytes", d.GetSizeBytes())
		}
		return nil, err
	}
	return buf, nil
}
