package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/internal/zstdio"
)

// maxDecoderWindow is the largest zstd window an upload may use: the
// reference encoder's levels 1 to 19 use at most 8 MiB. The decoder
// allocates the window a frame declares, so it is charged to the upload
// memory budget in full.
const maxDecoderWindow = zstdio.MinWindow

// decoderOverhead is a zstd decoder's memory beyond its window (block
// buffers, the ring's spare blocks) plus the decode copy buffer.
const decoderOverhead = 2 << 20

// uploadCharge is the memory charged to one upload stream: the transport's
// receive window, the message being handled and the one received ahead
// (messages larger than chunkBytes are charged extra as they come), and
// for zstd the decoder.
func uploadCharge(size int64, compressed bool) int64 {
	n := int64(streamWindow + 2*chunkBytes)
	if compressed {
		n += maxDecoderWindow + decoderOverhead
	}
	return n
}

// Write receives a blob, resumably when uncompressed. The data streams into
// a file in the scratch directory (a zstd upload is decoded as it arrives)
// and is hashed on the way; it reaches the backend only after finish_write
// and a matching digest, so an abandoned or lying upload stores nothing.
//
// Every bound is the server's own: the claimed size must be within
// MaxBlobBytes, is reserved on disk (against the local cache's bound, with
// its entries) before any data is accepted, and no more data than claimed
// is taken; the stream's memory is charged to MaxUploadMemory; a stream
// idle for IdleTimeout is aborted, and an interrupted upload is kept for
// UploadTTL to be resumed, then deleted.
func (s *Server) Write(stream bspb.ByteStream_WriteServer) (err error) {
	defer s.m.observe("Write", time.Now(), &err)
	ctx := stream.Context()
	rx := newReceiver(stream, s.opts.IdleTimeout)
	defer rx.stop()
	req, err := rx.next(ctx)
	if err != nil {
		if errors.Is(err, io.EOF) {
			return status.Error(codes.InvalidArgument, "write stream without requests")
		}
		return err
	}
	r, _, err := parseWrite(req.ResourceName)
	if err != nil {
		return err
	}
	ns, c, err := s.namespace(ctx, r.instance, r.fn)
	if err != nil {
		return err
	}
	d := r.d
	if err := c.checkWrite("writing blob " + digest.String(d)); err != nil {
		return err
	}
	switch {
	case req.WriteOffset < 0:
		return status.Errorf(codes.InvalidArgument, "writing blob %s: negative write_offset %d", digest.String(d), req.WriteOffset)
	case d.SizeBytes > s.opts.MaxBlobBytes:
		return status.Errorf(codes.InvalidArgument, "writing blob %s: %d bytes is more than this server stores per blob (limit %d bytes)", digest.String(d), d.SizeBytes, s.opts.MaxBlobBytes)
	case r.compressed && req.WriteOffset != 0:
		return status.Errorf(codes.InvalidArgument, "writing blob %s: compressed uploads cannot resume (write_offset %d)", digest.String(d), req.WriteOffset)
	case req.WriteOffset > d.SizeBytes:
		return status.Errorf(codes.InvalidArgument, "writing blob %s: write_offset %d beyond its size", digest.String(d), req.WriteOffset)
	}
	if d.SizeBytes == 0 {
		return stream.SendAndClose(&bspb.WriteResponse{CommittedSize: 0})
	}
	if missing, err := s.backend.FindMissing(ctx, ns, []*repb.Digest{d}); err == nil && len(missing) == 0 {
		cs := d.SizeBytes
		if r.compressed {
			cs = -1
		}
		return stream.SendAndClose(&bspb.WriteResponse{CommittedSize: cs})
	}
	what := "writing blob " + digest.String(d)
	release, err := s.mem.acquire(ctx, uploadCharge(d.SizeBytes, r.compressed), s.opts.IdleTimeout, what)
	if err != nil {
		return err
	}
	defer release()
	// A backend that stores blobs compressed takes a zstd upload's frames
	// as they came (the upload file holds them, bounded by the same limit
	// as the stream); otherwise the file holds the decoded content.
	// A backend that stores blobs compressed takes a verified zstd
	// upload's frames as they are (the first n bytes of the upload file).
	keepFrames := r.compressed && s.backend.Traits().StoresCompressed
	claim := d.SizeBytes
	if keepFrames {
		claim = compressedLimit(d)
	}
	key := uploadKey{group: ns.Group, name: req.ResourceName}
	u, err := s.uploads.get(key, ns.Function, d, func() (space, error) { return s.reserve(claim) })
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	keep := false
	defer func() { s.uploads.release(u, keep) }()
	var cs int64
	switch {
	case keepFrames:
		if cs, err = s.receiveCompressed(ctx, rx, key.name, ns.Function, d, u, req, true); err == nil {
			if err = s.backend.PutCompressedFile(ctx, ns, d, u.f, u.size, u.space); err == nil {
				u.stored = true
			}
		}
	case r.compressed:
		if cs, err = s.receiveCompressed(ctx, rx, key.name, ns.Function, d, u, req, false); err == nil {
			err = s.commit(ctx, ns, d, u)
		}
	default:
		keep, err = s.receive(ctx, rx, key.name, d, u, req)
		cs = d.SizeBytes
		if err == nil {
			err = s.commit(ctx, ns, d, u)
		}
	}
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	return stream.SendAndClose(&bspb.WriteResponse{CommittedSize: cs})
}

// receive takes an uncompressed upload's messages into u. On error it
// reports whether the partial upload is worth keeping for a resumption.
func (s *Server) receive(ctx context.Context, rx *receiver, name string, d *repb.Digest, u *upload, req *bspb.WriteRequest) (keep bool, err error) {
	switch {
	case req.WriteOffset > u.size:
		return u.size > 0, status.Errorf(codes.InvalidArgument, "write_offset %d beyond the %d bytes committed", req.WriteOffset, u.size)
	case req.WriteOffset < u.size:
		if err := u.truncate(req.WriteOffset); err != nil {
			return false, s.ioErr(err, "truncating an upload")
		}
	}
	charged := int64(chunkBytes)
	for {
		if req.WriteOffset != u.size {
			return u.size > 0, status.Errorf(codes.InvalidArgument, "write_offset %d, expected %d", req.WriteOffset, u.size)
		}
		if u.size+int64(len(req.Data)) > d.SizeBytes {
			return false, status.Errorf(codes.InvalidArgument, "more than its %d bytes sent", d.SizeBytes)
		}
		if l := int64(len(req.Data)); l > charged {
			more, err := s.mem.acquire(ctx, 2*(l-charged), s.opts.IdleTimeout, "receiving a large message")
			if err != nil {
				return true, err
			}
			defer more()
			charged = l
		}
		if err := u.write(req.Data); err != nil {
			return false, s.ioErr(err, "storing upload data")
		}
		s.m.in(len(req.Data))
		if req.FinishWrite {
			return false, nil
		}
		if req, err = rx.next(ctx); err != nil {
			var ie *idleError
			switch {
			case errors.As(err, &ie):
				return false, err
			case errors.Is(err, io.EOF):
				return true, status.Errorf(codes.InvalidArgument, "stream closed after %d bytes without finish_write", u.size)
			}
			return true, err
		}
		if req.ResourceName != "" && req.ResourceName != name {
			return false, status.Error(codes.InvalidArgument, "resource name changed mid-stream")
		}
	}
}

// commit verifies the upload in u and hands it to the backend: a local
// cache takes the file itself (renamed, its reservation counted over to
// the entry); other backends read it.
func (s *Server) commit(ctx context.Context, ns cache.Namespace, d *repb.Digest, u *upload) error {
	if u.size != d.SizeBytes {
		return status.Errorf(codes.InvalidArgument, "got %d bytes, digest says %d", u.size, d.SizeBytes)
	}
	if err := u.f.Truncate(u.size); err != nil {
		return s.ioErr(err, "sizing an upload")
	}
	v := u.v
	if v == nil || u.hashed != u.size {
		// Resumed below what was hashed: hash the file again.
		var err error
		if v, err = digest.NewVerifier(ns.Function, d); err != nil {
			return status.Error(codes.InvalidArgument, err.Error())
		}
		if _, err := copyBuffered(v, io.NewSectionReader(u.f, 0, u.size)); err != nil {
			return s.ioErr(err, "reading an upload back")
		}
	}
	if err := v.Check(); err != nil {
		return status.Errorf(codes.InvalidArgument, "data does not match its digest: %v", err)
	}
	if err := s.backend.PutFile(ctx, ns, d, u.f, u.space); err != nil {
		return err
	}
	u.stored = true
	return nil
}

// QueryWriteStatus reports how much of an interrupted upload the server
// holds, or that the blob is complete.
func (s *Server) QueryWriteStatus(ctx context.Context, req *bspb.QueryWriteStatusRequest) (_ *bspb.QueryWriteStatusResponse, err error) {
	defer s.m.observe("QueryWriteStatus", time.Now(), &err)
	r, _, err := parseWrite(req.ResourceName)
	if err != nil {
		return nil, err
	}
	ns, _, err := s.namespace(ctx, r.instance, r.fn)
	if err != nil {
		return nil, err
	}
	if r.d.SizeBytes == 0 {
		return &bspb.QueryWriteStatusResponse{CommittedSize: 0, Complete: true}, nil
	}
	if missing, err := s.backend.FindMissing(ctx, ns, []*repb.Digest{r.d}); err == nil && len(missing) == 0 {
		return &bspb.QueryWriteStatusResponse{CommittedSize: r.d.SizeBytes, Complete: true}, nil
	}
	if n, ok := s.uploads.committed(uploadKey{group: ns.Group, name: req.ResourceName}); ok && !r.compressed {
		return &bspb.QueryWriteStatusResponse{CommittedSize: n}, nil
	}
	return nil, status.Errorf(codes.NotFound, "no upload %q", req.ResourceName)
}
