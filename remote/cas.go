package remote

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
	"github.com/snaploader/snaploader/internal/zstdio"
)

const (
	// chunkBytes is the payload of each ByteStream write request.
	chunkBytes = 1 << 20
	// batchOverhead is left in a batch call for the envelope.
	batchOverhead = 4 << 10
	// maxBuffered is the largest blob read into memory to make an upload
	// resumable (or to compress it) when its reader cannot seek.
	maxBuffered = 64 << 20
	// maxDecoderWindow bounds a zstd decoder's memory.
	maxDecoderWindow = zstdio.MaxWindow
)

// blobPath is "blobs/{fn/}{hash}/{size}" or its compressed-blobs form.
func blobPath(fn digest.Function, d *repb.Digest, compressed bool) string {
	p := "blobs/"
	if compressed {
		p = "compressed-blobs/zstd/"
	}
	if fn != digest.SHA256 {
		p += digest.FunctionName(fn) + "/"
	}
	return p + d.Hash + "/" + strconv.FormatInt(d.SizeBytes, 10)
}

func withInstance(inst, p string) string {
	if inst == "" {
		return p
	}
	return inst + "/" + p
}

// ReadResourceName is the ByteStream resource name for reading d.
func ReadResourceName(instance string, fn digest.Function, d *repb.Digest, compressed bool) string {
	return withInstance(instance, blobPath(fn, d, compressed))
}

// WriteResourceName is the ByteStream resource name for uploading d.
func WriteResourceName(instance, uuid string, fn digest.Function, d *repb.Digest, compressed bool) string {
	return withInstance(instance, "uploads/"+uuid+"/"+blobPath(fn, d, compressed))
}

// streamTimeout is the deadline of one ByteStream call moving n bytes:
// CallTimeout plus a second per 8 MiB, so that large blobs on slow links
// are not cut off.
func (c *Client) streamTimeout(n int64) time.Duration {
	return c.opts.CallTimeout + time.Duration(n>>23)*time.Second
}

// maxBatchedBlob is the largest single blob sent or fetched with a batch
// call; larger ones stream through ByteStream, whose first bytes arrive
// sooner and which keeps no whole-blob message in memory (measured on
// loopback with 4 MB chunks: ByteStream ~1.8x the throughput of a batch
// call and a tenth of its time to first byte).
const maxBatchedBlob = 1 << 20

// batchable reports whether a blob of n bytes goes through a batch call.
func (c *Client) batchable(n int64) bool {
	return n <= maxBatchedBlob && n+batchOverhead <= c.maxBatch
}

// FindMissing returns the digests the server lacks, in batches of at most
// FindMissingBatch digests per call. The empty blob is never missing.
func (c *Client) FindMissing(ctx context.Context, ns cache.Namespace, ds []*repb.Digest) ([]*repb.Digest, error) {
	inst, fn, err := c.ns(ns)
	if err != nil {
		return nil, err
	}
	want := make([]*repb.Digest, 0, len(ds))
	for _, d := range ds {
		if err := digest.Validate(d); err != nil {
			return nil, err
		}
		if d.SizeBytes > 0 {
			want = append(want, d)
		}
	}
	var missing []*repb.Digest
	for len(want) > 0 {
		batch := want[:min(len(want), c.opts.FindMissingBatch)]
		want = want[len(batch):]
		var resp *repb.FindMissingBlobsResponse
		err := c.retry(ctx, func(ctx context.Context) (err error) {
			resp, err = c.cas.FindMissingBlobs(ctx, &repb.FindMissingBlobsRequest{InstanceName: inst, BlobDigests: batch, DigestFunction: fn})
			return err
		})
		if err != nil {
			return nil, fmt.Errorf("finding missing blobs among %d (first %s) on %s: %w", len(batch), digest.String(batch[0]), c.target, err)
		}
		missing = append(missing, resp.MissingBlobDigests...)
	}
	return missing, nil
}

// Traits: every read is verified as it is received (a compressed
// transfer is decoded and verified too), and a server may answer reads of
// part of a blob (unverified: the caller checks them against an outboard)
// until it has refused one.
func (c *Client) Traits() cache.Traits {
	return cache.Traits{Description: c.target, VerifiesReads: true, ServesRanges: !c.ranges.refused.Load()}
}

// ReadCompressed is Read: the content, decoded and verified (the server's
// zstd transfer is undone as it is received).
func (c *Client) ReadCompressed(ctx context.Context, ns cache.Namespace, d *repb.Digest) (io.ReadCloser, bool, error) {
	return cache.ReadWhole(ctx, c, ns, d)
}

var _ cache.Tier = (*Client)(nil)

// WriteCompressed decodes the zstd frames of r and writes the content
// (Write compresses the transfer again when the server takes zstd).
func (c *Client) WriteCompressed(ctx context.Context, ns cache.Namespace, d *repb.Digest, r io.Reader) error {
	return cache.WriteDecoded(ctx, c, ns, d, r)
}

// PutHashed is Write of data: the server verifies what it receives anyway.
func (c *Client) PutHashed(ctx context.Context, ns cache.Namespace, d *repb.Digest, data []byte) error {
	return cache.WriteBytes(ctx, c, ns, d, data)
}

// Down is nil: a client's outages are the errors of its calls (the
// breaker over it tells).
func (c *Client) Down() error { return nil }

// Read opens a blob; its content is verified against d as it is read (a
// mismatch is a DataLoss error at the end). A missing blob is NotFound.
func (c *Client) Read(ctx context.Context, ns cache.Namespace, d *repb.Digest) (io.ReadCloser, error) {
	inst, fn, err := c.ns(ns)
	if err != nil {
		return nil, err
	}
	if err := digest.Validate(d); err != nil {
		return nil, err
	}
	if d.SizeBytes == 0 {
		return io.NopCloser(bytes.NewReader(nil)), nil
	}
	if c.batchable(d.SizeBytes) {
		b, err := c.batchRead(ctx, inst, fn, d)
		if err != nil {
			return nil, fmt.Errorf("reading blob %s from %s: %w", digest.String(d), c.target, err)
		}
		return io.NopCloser(bytes.NewReader(b)), nil
	}
	v, err := digest.NewVerifier(fn, d)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	sr := &streamReader{c: c, ctx: ctx, inst: inst, fn: fn, d: d, compressed: c.zstd, v: v}
	if err := sr.start(); err != nil {
		sr.Close()
		return nil, fmt.Errorf("reading blob %s from %s: %w", digest.String(d), c.target, err)
	}
	return sr, nil
}

func (c *Client) batchRead(ctx context.Context, inst string, fn digest.Function, d *repb.Digest) ([]byte, error) {
	var resp *repb.BatchReadBlobsResponse
	err := c.retry(ctx, func(ctx context.Context) error {
		var err error
		cas, _ := c.faults()
		resp, err = cas.BatchReadBlobs(ctx, &repb.BatchReadBlobsRequest{InstanceName: inst, Digests: []*repb.Digest{d}, DigestFunction: fn})
		if err != nil {
			return err
		}
		if len(resp.Responses) != 1 {
			return status.Errorf(codes.Internal, "server returned %d responses for one digest", len(resp.Responses))
		}
		return status.ErrorProto(resp.Responses[0].Status)
	})
	if err != nil {
		return nil, err
	}
	r := resp.Responses[0]
	data := r.Data
	switch r.Compressor {
	case repb.Compressor_IDENTITY:
	case repb.Compressor_ZSTD:
		data, err = decodeAll(data, d.SizeBytes)
		if err != nil {
			return nil, cache.Corruptf("decompressing: %v", err)
		}
	default:
		return nil, status.Errorf(codes.Internal, "server used compressor %v, which was not asked for", r.Compressor)
	}
	if got := digest.Compute(fn, data); !digest.Equal(got, d) {
		return nil, cache.Corruptf("data is %s: corrupt", digest.String(got))
	}
	return data, nil
}

// ReadRange reads n bytes of blob d from off (fewer at its end) with one
// ByteStream read (read_offset, read_limit) of the uncompressed resource
// over the fault lane (see Options.SharedFaultLane), retrying. The bytes
// are not verified: the caller checks them (see cache.RangeReader). A
// server that refuses range reads (UNIMPLEMENTED, or OUT_OF_RANGE for the
// read limit) is asked once: that read and every later one is an error
// wrapping cache.ErrNoRange.
func (c *Client) ReadRange(ctx context.Context, ns cache.Namespace, d *repb.Digest, off, n int64) (io.ReadCloser, error) {
	inst, fn, err := c.ns(ns)
	if err != nil {
		return nil, err
	}
	if err := digest.Validate(d); err != nil {
		return nil, err
	}
	if off < 0 || n <= 0 || off >= d.SizeBytes {
		return nil, status.Errorf(codes.InvalidArgument, "reading blob %s at offset %d, %d bytes: outside its %d bytes", digest.String(d), off, n, d.SizeBytes)
	}
	n = min(n, d.SizeBytes-off)
	noRange := func(why string) error {
		return errkind.New(errkind.Unimplemented, "reading blob %s at [%d, %d) from %s: the server serves no part of a blob (%s): %w", digest.String(d), off, off+n, c.target, why, cache.ErrNoRange)
	}
	done, refused, err := c.ranges.turn(ctx)
	if err != nil {
		return nil, fmt.Errorf("reading blob %s at [%d, %d) from %s: %w", digest.String(d), off, off+n, c.target, err)
	}
	if refused {
		return nil, noRange("it refused an earlier range read")
	}
	buf := make([]byte, 0, n)
	err = c.retry(ctx, func(ctx context.Context) error {
		buf = buf[:0]
		_, bs := c.faults()
		stream, err := bs.Read(ctx, &bspb.ReadRequest{ResourceName: ReadResourceName(inst, fn, d, false), ReadOffset: off, ReadLimit: n})
		if err != nil {
			return err
		}
		for {
			msg, err := stream.Recv()
			if errors.Is(err, io.EOF) {
				return nil
			}
			if err != nil {
				return err
			}
			if int64(len(buf)+len(msg.Data)) > n {
				return cache.Corruptf("server sent more than the %d bytes asked for", n)
			}
			buf = append(buf, msg.Data...)
			if int64(len(buf)) == n {
				// Done: the server may still be checking the rest of
				// the blob, which this read does not wait for.
				return nil
			}
		}
	})
	done(err)
	if refusesRanges(err) {
		return nil, noRange(errkind.Text(err))
	}
	if err != nil {
		return nil, fmt.Errorf("reading blob %s at [%d, %d) from %s: %w", digest.String(d), off, off+n, c.target, err)
	}
	return io.NopCloser(bytes.NewReader(buf)), nil
}
