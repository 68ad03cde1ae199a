// Package cache defines the storage contracts every snaploader tier
// fulfils (Tier; Local for a host's own tier, Backend for what a server
// serves, Source for what the lazy store reads) and composable wrappers
// over them: digest-verifying reads, a breaker, a read-through second tier.
//
// Errors carry the kinds of package errkind, so that callers can tell
// NotFound (the blob or entry is absent), Unavailable (the tier is down),
// InvalidArgument, ResourceExhausted and DataLoss (stored data failed
// verification) apart, however deeply wrapped.
package cache

import (
	"context"
	"errors"
	"fmt"
	"io"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"

	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
)

// Namespace says where a request lives.
type Namespace struct {
	// Group is the tenant. The local cache partitions action-cache entries
	// by it; a remote derives it from credentials instead.
	Group string
	// Instance is the REAPI instance name.
	Instance string
	// Function is the digest function of every digest in the request.
	Function digest.Function
}

// Cache is a content-addressed store plus an action cache.
type Cache interface {
	// FindMissing returns the digests in ds that the cache does not hold.
	FindMissing(ctx context.Context, ns Namespace, ds []*repb.Digest) ([]*repb.Digest, error)
	// Read opens a blob. A missing blob is a NotFound error.
	Read(ctx context.Context, ns Namespace, d *repb.Digest) (io.ReadCloser, error)
	// Write stores a blob read from r; r must yield exactly the content d
	// names, else InvalidArgument and nothing is stored.
	Write(ctx context.Context, ns Namespace, d *repb.Digest, r io.Reader) error
	// GetActionResult returns the entry under key; NotFound when absent.
	GetActionResult(ctx context.Context, ns Namespace, key *repb.Digest) (*repb.ActionResult, error)
	// UpdateActionResult stores ar under key, replacing any entry.
	UpdateActionResult(ctx context.Context, ns Namespace, key *repb.Digest, ar *repb.ActionResult) error
}

// IsNotFound reports whether err means "absent".
func IsNotFound(err error) bool { return errkind.Is(err, errkind.NotFound) }

// NotFoundf returns a NotFound error.
func NotFoundf(format string, args ...any) error {
	return errkind.New(errkind.NotFound, format, args...)
}

// ReadAll reads a whole blob.
func ReadAll(ctx context.Context, c Cache, ns Namespace, d *repb.Digest) ([]byte, error) {
	return readAllInto(ctx, c, ns, d, make([]byte, 0, d.SizeBytes))
}

// readAllInto is ReadAll into buf's space (grown only when the blob is
// longer than d says).
func readAllInto(ctx context.Context, c Cache, ns Namespace, d *repb.Digest, buf []byte) ([]byte, error) {
	rc, err := c.Read(ctx, ns, d)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	b, err := readFull(rc, buf[:0])
	if err != nil {
		return nil, fmt.Errorf("reading blob %s: %w", digest.String(d), err)
	}
	return b, nil
}

// readFull appends r's bytes to buf up to io.EOF. Once buf is full it
// reads on into a small scratch array (the end of the stream is where a
// verifying reader checks the content), growing buf only if r has more.
func readFull(r io.Reader, buf []byte) ([]byte, error) {
	var scratch [64]byte
	for {
		var n int
		var err error
		if len(buf) == cap(buf) {
			n, err = r.Read(scratch[:])
			buf = append(buf, scratch[:n]...)
		} else {
			n, err = r.Read(buf[len(buf):cap(buf)])
			buf = buf[:len(buf)+n]
		}
		if errors.Is(err, io.EOF) {
			return buf, nil
		}
		if err != nil {
			return buf, err
		}
	}
}

// Blob is an open blob for random reads. Its content has been verified
// against its digest. Close releases it (and any pin against eviction).
type Blob interface {
	io.ReaderAt
	io.Closer
	Size() int64
	// WithContents calls fn with where the blob's bytes are, so that a
	// copy of the whole blob can skip reading it through ReadAt (see
	// Contents), and returns fn's error.
	WithContents(fn func(Contents) error) error
}

// Opener opens blobs for random reads; the local cache and the read-through
// tier implement it.
type Opener interface {
	Open(ctx context.Context, ns Namespace, d *repb.Digest) (Blob, error)
}
