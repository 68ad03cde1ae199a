package cache

import (
	"context"
	"fmt"
	"io"
	"sync/atomic"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"
	"golang.org/x/sync/singleflight"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/digest"
)

// LocalTier is the first tier of a ReadThrough: a cache that can also open
// blobs for random reads (the local disk cache).
type LocalTier interface {
	Cache
	Opener
}

// hashedPutter stores bytes already verified against their digest without
// hashing them again (the local cache offers it).
type hashedPutter interface {
	PutHashed(ctx context.Context, ns Namespace, d *repb.Digest, data []byte) error
}

// maxBufferedFetch is the largest blob fetched into memory to be verified
// once; larger blobs stream and are verified by both tiers.
const maxBufferedFetch = 64 << 20

// ReadThrough serves blobs from a local tier, filling it from a remote tier
// on a miss. A blob fetched from the remote is verified against its digest
// while streaming, written into the local tier (which verifies again) and
// served from there. Concurrent misses on one blob fetch it once.
type ReadThrough struct {
	local  LocalTier
	remote Cache
	sf     singleflight.Group

	localHits     atomic.Int64
	remoteFetches atomic.Int64
	remoteBytes   atomic.Int64
	remoteErrors  atomic.Int64
}

var _ Opener = (*ReadThrough)(nil)

// ReadThroughStats are a ReadThrough's counters.
type ReadThroughStats struct {
	LocalHits     int64 // opens served by the local tier without a fetch
	RemoteFetches int64 // blobs copied from the remote into the local tier
	RemoteBytes   int64 // bytes of those blobs
	RemoteErrors  int64 // fetches that failed
}

// NewReadThrough returns a ReadThrough over local and remote; a nil remote
// makes it a plain view of local.
func NewReadThrough(local LocalTier, remote Cache) *ReadThrough {
	return &ReadThrough{local: local, remote: remote}
}

// Stats returns the counters so far.
func (rt *ReadThrough) Stats() ReadThroughStats {
	return ReadThroughStats{
		LocalHits:     rt.localHits.Load(),
		RemoteFetches: rt.remoteFetches.Load(),
		RemoteBytes:   rt.remoteBytes.Load(),
		RemoteErrors:  rt.remoteErrors.Load(),
	}
}

// refetchable reports whether a local error should be answered from the
// remote: the blob is absent or failed verification (and was removed).
func refetchable(err error) bool {
	c := status.Code(err)
	return c == codes.NotFound || c == codes.Internal
}

// Open opens d from the local tier, fetching it from the remote first when
// the local tier lacks it or holds a corrupt copy. Errors keep the remote's
// status code (NotFound, Unavailable, Internal for corrupt remote data) and
// name the digest.
func (rt *ReadThrough) Open(ctx context.Context, ns Namespace, d *repb.Digest) (Blob, error) {
	b, _, err := rt.OpenTier(ctx, ns, d)
	return b, err
}

// Tier names of OpenTier.
const (
	TierLocal  = "local"
	TierRemote = "remote"
)

// OpenTier is Open, also saying which tier served the blob (TierLocal, or
// TierRemote when it had to be fetched).
func (rt *ReadThrough) OpenTier(ctx context.Context, ns Namespace, d *repb.Digest) (Blob, string, error) {
	span := trace.SpanFromContext(ctx)
	b, err := rt.local.Open(ctx, ns, d)
	if err == nil {
		rt.localHits.Add(1)
		span.SetAttributes(attribute.String("tier", TierLocal))
		return b, TierLocal, nil
	}
	if rt.remote == nil || !refetchable(err) {
		return nil, TierLocal, err
	}
	span.SetAttributes(attribute.String("tier", TierRemote))
	if err := rt.Fetch(ctx, ns, d); err != nil {
		return nil, TierRemote, err
	}
	b, err = rt.local.Open(ctx, ns, d)
	if err != nil {
		return nil, TierRemote, fmt.Errorf("opening blob %s after fetching it: %w", digest.String(d), err)
	}
	return b, TierRemote, nil
}

// Fetch makes sure the local tier holds a verified copy of d, copying it from
// the remote if needed (read-ahead uses it). Concurrent calls for one blob
// share one copy; a caller whose ctx ends stops waiting, but the copy runs on
// for the others.
func (rt *ReadThrough) Fetch(ctx context.Context, ns Namespace, d *repb.Digest) error {
	if rt.remote == nil {
		b, err := rt.local.Open(ctx, ns, d)
		if err != nil {
			return err
		}
		return b.Close()
	}
	key := fmt.Sprintf("%d/%s/%s/%d", ns.DigestFunction(), ns.Instance, d.GetHash(), d.GetSizeBytes())
	ch := rt.sf.DoChan(key, func() (any, error) {
		return nil, rt.fetch(context.WithoutCancel(ctx), ns, d)
	})
	select {
	case <-ctx.Done():
		return fmt.Errorf("fetching blob %s: %w", digest.String(d), status.FromContextError(ctx.Err()).Err())
	case res := <-ch:
		return res.Err
	}
}

func (rt *ReadThrough) fetch(ctx context.Context, ns Namespace, d *repb.Digest) error {
	// A fetch that finished just before this one started already did the
	// work; a corrupt local copy is removed by this Open.
	if b, err := rt.local.Open(ctx, ns, d); err == nil {
		return b.Close()
	}
	if hs, ok := rt.local.(hashedPutter); ok && d.GetSizeBytes() <= maxBufferedFetch {
		// Verify once while reading, then store without hashing again.
		b, err := ReadAll(ctx, Verifying(rt.remote), ns, d)
		if err == nil {
			err = hs.PutHashed(ctx, ns, d, b)
		}
		if err != nil {
			rt.remoteErrors.Add(1)
			return fmt.Errorf("fetching blob %s from remote: %w", digest.String(d), err)
		}
		rt.remoteFetches.Add(1)
		rt.remoteBytes.Add(d.GetSizeBytes())
		return nil
	}
	rc, err := Verifying(rt.remote).Read(ctx, ns, d)
	if err != nil {
		rt.remoteErrors.Add(1)
		return fmt.Errorf("fetching blob %s from remote: %w", digest.String(d), err)
	}
	defer rc.Close()
	if err := rt.local.Write(ctx, ns, d, rc); err != nil {
		rt.remoteErrors.Add(1)
		return fmt.Errorf("fetching blob %s from remote: %w", digest.String(d), err)
	}
	rt.remoteFetches.Add(1)
	rt.remoteBytes.Add(d.GetSizeBytes())
	return nil
}

// Read is Open as a stream: the blob is in the local tier and verified
// before the first byte is returned.
func (rt *ReadThrough) Read(ctx context.Context, ns Namespace, d *repb.Digest) (io.ReadCloser, error) {
	b, err := rt.Open(ctx, ns, d)
	if err != nil {
		return nil, err
	}
	return blobReader{io.NewSectionReader(b, 0, b.Size()), b}, nil
}

type blobReader struct {
	*io.SectionReader
	io.Closer
}
