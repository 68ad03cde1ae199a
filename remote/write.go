package remote

import (
	"context"
	"errors"
	"fmt"
	"io"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
)

// readExact reads exactly n bytes from r and checks r has no more.
func readExact(d *repb.Digest, r io.Reader) ([]byte, error) {
	b := make([]byte, d.SizeBytes)
	if n, err := io.ReadFull(r, b); err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
			return nil, status.Errorf(codes.InvalidArgument, "blob %s: reader yields only %d bytes", digest.String(d), n)
		}
		return nil, fmt.Errorf("reading blob %s to upload: %w", digest.String(d), err)
	}
	if err := checkEnd(d, r); err != nil {
		return nil, err
	}
	return b, nil
}

func checkEnd(d *repb.Digest, r io.Reader) error {
	var one [1]byte
	if n, _ := io.ReadFull(r, one[:]); n > 0 {
		return status.Errorf(codes.InvalidArgument, "blob %s: reader yields more than %d bytes", digest.String(d), d.SizeBytes)
	}
	return nil
}

// Write uploads a blob: small ones in a batch call, large ones over
// ByteStream (zstd-compressed when offered), resuming an interrupted
// upload where the server's QueryWriteStatus says it stopped.
func (c *Client) Write(ctx context.Context, ns cache.Namespace, d *repb.Digest, r io.Reader) error {
	inst, fn, err := c.ns(ns)
	if err != nil {
		return err
	}
	if err := digest.Validate(d); err != nil {
		return err
	}
	if d.SizeBytes == 0 {
		return checkEnd(d, r)
	}
	if c.batchable(d.SizeBytes) {
		data, err := readExact(d, r)
		if err != nil {
			return err
		}
		err = c.retry(ctx, func(ctx context.Context) error {
			resp, err := c.cas.BatchUpdateBlobs(ctx, &repb.BatchUpdateBlobsRequest{
				InstanceName:   inst,
				Requests:       []*repb.BatchUpdateBlobsRequest_Request{{Digest: d, Data: data}},
				DigestFunction: fn,
			})
			if err != nil {
				return err
			}
			if len(resp.Responses) != 1 {
				return status.Errorf(codes.Internal, "server returned %d responses for one blob", len(resp.Responses))
			}
			return status.ErrorProto(resp.Responses[0].Status)
		})
		if err != nil {
			return fmt.Errorf("writing blob %s to %s: %w", digest.String(d), c.target, err)
		}
		return nil
	}
	if err := c.writeStream(ctx, inst, fn, d, r); err != nil {
		return fmt.Errorf("writing blob %s to %s: %w", digest.String(d), c.target, err)
	}
	return nil
}

// WriteReporting is Write; the blob is stored (or was already) when it
// returns nil.
func (c *Client) WriteReporting(ctx context.Context, ns cache.Namespace, d *repb.Digest, r io.Reader) (bool, error) {
	return true, c.Write(ctx, ns, d, r)
}

// upload is what a ByteStream write sends.
type upload struct {
	data       []byte        // whole payload in memory, or
	rs         io.ReadSeeker // a seekable source starting at base, or
	r          io.Reader     // a one-shot source
	base       int64
	total      int64 // payload bytes
	compressed bool
}

func (c *Client) writeStream(ctx context.Context, inst string, fn digest.Function, d *repb.Digest, r io.Reader) error {
	u := &upload{total: d.SizeBytes}
	rs, seekable := r.(io.ReadSeeker)
	switch {
	case (c.zstd || !seekable) && d.SizeBytes <= maxBuffered:
		data, err := readExact(d, r)
		if err != nil {
			return err
		}
		if c.zstd {
			data = encoder.EncodeAll(data, make([]byte, 0, len(data)/2))
			u.compressed = true
		}
		u.data, u.total = data, int64(len(data))
	case seekable:
		base, err := rs.Seek(0, io.SeekCurrent)
		if err != nil {
			return fmt.Errorf("seeking source: %w", err)
		}
		u.rs, u.base = rs, base
	default:
		u.r = r
	}
	id := newUUID()
	var off int64
	for attempt := 0; ; attempt++ {
		name := WriteResourceName(inst, id, fn, d, u.compressed)
		err := c.writeOnce(ctx, name, d, u, off)
		if err == nil {
			return nil
		}
		if !retryable(err) || attempt >= c.opts.MaxRetries || u.r != nil {
			return err
		}
		if err := c.backoff(ctx, attempt); err != nil {
			return err
		}
		if u.compressed {
			// Compressed uploads restart from the beginning.
			id, off = newUUID(), 0
			continue
		}
		var q *bspb.QueryWriteStatusResponse
		qerr := c.retry(ctx, func(ctx context.Context) (err error) {
			q, err = c.bs.QueryWriteStatus(ctx, &bspb.QueryWriteStatusRequest{ResourceName: name})
			return err
		})
		switch {
		case qerr == nil && q.Complete:
			return nil
		case qerr == nil && q.CommittedSize >= 0 && q.CommittedSize <= u.total:
			off = q.CommittedSize
		default:
			off = 0
		}
	}
}

// writeOnce sends u from off in one Write call.
func (c *Client) writeOnce(ctx context.Context, name string, d *repb.Digest, u *upload, off int64) error {
	ctx, cancel := context.WithTimeout(ctx, c.streamTimeout(u.total-off))
	defer cancel()
	if u.rs != nil {
		if _, err := u.rs.Seek(u.base+off, io.SeekStart); err != nil {
			return fmt.Errorf("seeking source to %d: %w", off, err)
		}
	}
	stream, err := c.bs.Write(ctx)
	if err != nil {
		return err
	}
	pos := off
	var buf []byte
	if u.data == nil {
		// Reused: gRPC encodes a message before Send returns.
		buf = make([]byte, min(u.total, chunkBytes))
	}
	for first := true; pos < u.total || first; first = false {
		n := min(u.total-pos, chunkBytes)
		var chunk []byte
		if u.data != nil {
			chunk = u.data[pos : pos+n]
		} else {
			chunk = buf[:n]
			src := u.r
			if u.rs != nil {
				src = u.rs
			}
			if k, err := io.ReadFull(src, chunk); err != nil {
				stream.CloseSend()
				if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
					return status.Errorf(codes.InvalidArgument, "blob %s: reader yields only %d bytes", digest.String(d), pos+int64(k))
				}
				return fmt.Errorf("reading source at %d: %w", pos, err)
			}
			if pos+n == u.total {
				if err := checkEnd(d, src); err != nil {
					stream.CloseSend()
					return err
				}
			}
		}
		req := &bspb.WriteRequest{WriteOffset: pos, Data: chunk, FinishWrite: pos+n == u.total}
		if first {
			req.ResourceName = name
		}
		if err := stream.Send(req); err != nil {
			if errors.Is(err, io.EOF) {
				break // the server ended the call; its status follows
			}
			return err
		}
		pos += n
	}
	resp, err := stream.CloseAndRecv()
	if err != nil {
		return err
	}
	if cs := resp.CommittedSize; cs != d.SizeBytes && !(u.compressed && (cs == -1 || cs == u.total)) {
		return status.Errorf(codes.Internal, "server committed %d bytes of %d", cs, u.total)
	}
	return nil
}
