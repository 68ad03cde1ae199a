package cache

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"lukechampine.com/blake3/bao"

	"github.com/snaploader/snaploader/digest"
)

// OutboardGroup is the bao chunk group of chunk outboards: 2^4 BLAKE3
// chunks, so 16 KiB leaves (an outboard is about 1/256 of its data).
const OutboardGroup = 4

// OutboardAlign is the granularity of verified ranges: a range read through
// an outboard covers whole 16 KiB leaves (the last one may be short).
const OutboardAlign = 1024 << OutboardGroup

// Outboard computes the BLAKE3 outboard of data (bao, OutboardGroup) and
// the data's BLAKE3 digest, which is the outboard's root.
func Outboard(data []byte) (outboard []byte, d *repb.Digest) {
	ob, root := bao.EncodeBuf(data, OutboardGroup, true)
	return ob, &repb.Digest{Hash: hex.EncodeToString(root[:]), SizeBytes: int64(len(data))}
}

// RangeReader reads part of a blob, as every Tier does: n bytes from off
// (fewer at its end). The bytes are verified only when the tier's Traits
// say VerifiesRanges; else a caller checks them against an outboard. A
// tier that serves no ranges returns an error wrapping ErrNoRange.
type RangeReader interface {
	ReadRange(ctx context.Context, ns Namespace, d *repb.Digest, off, n int64) (io.ReadCloser, error)
}

// ErrNoRange says a verified range read cannot be done (no outboard, a
// digest function other than BLAKE3, a tier without range reads): the
// caller verifies the whole blob instead.
var ErrNoRange = errors.New("no verified range read available")

// AlignRange returns the outboard-aligned range of a blob of size bytes
// covering [off, off+n).
func AlignRange(size, off, n int64) (start, end int64) {
	start = off &^ (OutboardAlign - 1)
	end = min(size, (off+n+OutboardAlign-1)&^(OutboardAlign-1))
	return start, end
}

// VerifyRange checks data, the bytes of blob d at [start, start+len(data))
// (an aligned range, see AlignRange), against d's BLAKE3 digest through the
// blob's outboard. A mismatch is a DataLoss error naming the digest and
// range.
func VerifyRange(d *repb.Digest, outboard, data []byte, start int64) error {
	bad := func(format string, args ...any) error {
		return Corruptf("blob %s, range [%d, %d): %s", digest.String(d), start, start+int64(len(data)), fmt.Sprintf(format, args...))
	}
	root, err := hex.DecodeString(d.GetHash())
	if err != nil || len(root) != 32 {
		return bad("not a BLAKE3 digest")
	}
	if len(outboard) != bao.EncodedSize(int(d.GetSizeBytes()), OutboardGroup, true) {
		return bad("outboard has %d bytes, not the %d its size takes: corrupt", len(outboard), bao.EncodedSize(int(d.GetSizeBytes()), OutboardGroup, true))
	}
	if len(data) == 0 || start < 0 || start+int64(len(data)) > d.GetSizeBytes() {
		return bad("outside the blob's %d bytes", d.GetSizeBytes())
	}
	var slice bytes.Buffer
	if err := bao.ExtractSlice(&slice, bytes.NewReader(data), bytes.NewReader(outboard), OutboardGroup, uint64(start), uint64(len(data))); err != nil {
		return bad("outboard does not describe the range: corrupt (%v)", err)
	}
	got, ok := bao.VerifySlice(slice.Bytes(), OutboardGroup, uint64(start), uint64(len(data)), [32]byte(root))
	if !ok || !bytes.Equal(got, data) {
		return bad("data or outboard does not match the digest: corrupt")
	}
	return nil
}

// ReadVerifiedRange fills p with the bytes of blob d at off, verified
// before it returns: from a copy already held (the local tier, or a fetch
// just verified), else by reading only the aligned range p needs from the
// remote and checking it against the blob's outboard (fetched once and kept
// in the local tier). An error wrapping ErrNoRange means no verified range
// read is possible; corrupt data or outboard is a DataLoss error naming
// the digest and range.
func (rt *ReadThrough) ReadVerifiedRange(ctx context.Context, ns Namespace, d, outboard *repb.Digest, p []byte, off int64) error {
	if off < 0 || len(p) == 0 || off+int64(len(p)) > d.GetSizeBytes() {
		return status.Errorf(codes.InvalidArgument, "reading blob %s at [%d, %d): outside its %d bytes", digest.String(d), off, off+int64(len(p)), d.GetSizeBytes())
	}
	key := blobKey(ns, d)
	if h := rt.acquire(key); h != nil {
		defer h.release()
		if bp := h.buf.Load(); bp != nil {
			copy(p, (*bp)[off:])
			return nil
		}
	}
	if b, err := rt.local.Open(ctx, ns, d); err == nil {
		defer b.Close()
		if n, err := b.ReadAt(p, off); n < len(p) {
			return fmt.Errorf("reading blob %s at offset %d from the local tier: %w", digest.String(d), off, err)
		}
		return nil
	}
	if rt.remote == nil || !rt.remote.Traits().ServesRanges || outboard == nil || ns.DigestFunction() != digest.BLAKE3 {
		return ErrNoRange
	}
	// The outboard (local after the first read of the blob) and the range
	// are fetched together.
	obCh := make(chan obResult, 1)
	go func() { obCh <- rt.readOutboard(ctx, ns, d, outboard) }()
	start, end := AlignRange(d.GetSizeBytes(), off, int64(len(p)))
	rc, err := rt.remote.ReadRange(ctx, ns, d, start, end-start)
	if err != nil {
		<-obCh
		if status.Code(err) == codes.Unimplemented {
			return fmt.Errorf("%w: %v", ErrNoRange, err)
		}
		return fmt.Errorf("reading blob %s at [%d, %d) from the remote: %w", digest.String(d), start, end, err)
	}
	data := make([]byte, end-start)
	n, err := io.ReadFull(rc, data)
	rc.Close()
	if err != nil {
		<-obCh
		if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
			err = Corruptf("the remote sent %d bytes: short", n)
		}
		return fmt.Errorf("reading blob %s at [%d, %d) from the remote: %w", digest.String(d), start, end, err)
	}
	obr := <-obCh
	if obr.err != nil {
		return obr.err
	}
	if err := VerifyRange(d, obr.data, data, start); err != nil {
		rt.remoteErrors.Add(1)
		return fmt.Errorf("verifying blob %s at [%d, %d) with outboard %s: %w", digest.String(d), start, end, digest.String(outboard), err)
	}
	rt.rangeReads.Add(1)
	rt.rangeBytes.Add(end - start)
	copy(p, data[off-start:])
	return nil
}

type obResult struct {
	data []byte
	err  error
}

// readOutboard reads blob d's outboard through the tiers (so that it is
// kept in the local tier).
func (rt *ReadThrough) readOutboard(ctx context.Context, ns Namespace, d, outboard *repb.Digest) obResult {
	ob, _, err := rt.OpenTier(ctx, ns, outboard)
	if err != nil {
		if IsNotFound(err) {
			return obResult{err: fmt.Errorf("%w: outboard %s: %v", ErrNoRange, digest.String(outboard), err)}
		}
		return obResult{err: fmt.Errorf("opening outboard %s of blob %s: %w", digest.String(outboard), digest.String(d), err)}
	}
	// Closing a blob just fetched waits for its write into the local
	// tier, which the range read need not wait for.
	defer func() { go ob.Close() }()
	data := make([]byte, ob.Size())
	if n, err := ob.ReadAt(data, 0); n < len(data) {
		return obResult{err: fmt.Errorf("reading outboard %s of blob %s: %w", digest.String(outboard), digest.String(d), err)}
	}
	return obResult{data: data}
}
