package cache

import (
	"context"
	"errors"
	"io"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
)

// DigestFunction is ns.Function, or digest.Default when it is unset.
func (ns Namespace) DigestFunction() digest.Function {
	if ns.Function == repb.DigestFunction_UNKNOWN {
		return digest.Default
	}
	return ns.Function
}

// Corruptf returns a DataLoss error: stored data that failed digest
// verification. Only a verified mismatch creates one.
func Corruptf(format string, args ...any) error { return errkind.DataLossf(format, args...) }

// IsCorrupt reports whether err means "data failed verification" (kind
// DataLoss): the only error after which a tier may drop the entry.
func IsCorrupt(err error) bool { return errkind.Is(err, errkind.DataLoss) }

// NewVerifyingReader returns a reader over rc that hashes the bytes as they
// pass. At the end of the stream it returns a DataLoss error naming d
// instead of io.EOF when the content or the length does not match d; it
// fails as soon as rc yields more bytes than d's size. Close closes rc.
func NewVerifyingReader(rc io.ReadCloser, fn digest.Function, d *repb.Digest) (io.ReadCloser, error) {
	v, err := digest.NewVerifier(fn, d)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "verifying blob %s: %v", digest.String(d), err)
	}
	return &verifyingReader{rc: rc, v: v, d: d}, nil
}

type verifyingReader struct {
	rc  io.ReadCloser
	v   *digest.Verifier
	d   *repb.Digest
	n   int64
	err error // sticky terminal error
}

func (r *verifyingReader) Read(p []byte) (int, error) {
	if r.err != nil {
		return 0, r.err
	}
	n, err := r.rc.Read(p)
	if n > 0 {
		r.v.Write(p[:n])
		r.n += int64(n)
		if r.n > r.d.SizeBytes {
			r.err = Corruptf("corrupt blob %s: more than %d bytes", digest.String(r.d), r.d.SizeBytes)
			return 0, r.err
		}
	}
	if errors.Is(err, io.EOF) {
		if cerr := r.v.Check(); cerr != nil {
			r.err = Corruptf("corrupt blob %s: %v", digest.String(r.d), cerr)
			// The bytes of this call are suspect too: withhold them.
			return 0, r.err
		}
		r.err = io.EOF
	} else if err != nil {
		r.err = err
	}
	return n, err
}

func (r *verifyingReader) Close() error { return r.rc.Close() }

// ReadVerifier is implemented by caches whose Read already verifies every
// blob against its digest (the REAPI and S3 clients, and Verifying's own
// result), so that Verifying does not hash the same bytes again.
type ReadVerifier interface {
	VerifiesReads()
}

// Verifying returns a Cache whose Read verifies the blob while streaming:
// at the end of the stream a content or length mismatch is a DataLoss
// error naming the digest instead of io.EOF. Other methods pass through.
// A cache that already verifies its reads is returned as it is.
func Verifying(c Cache) Cache {
	if _, ok := c.(ReadVerifier); ok {
		return c
	}
	return verifying{c}
}

type verifying struct{ Cache }

// VerifiesReads marks the result as verifying.
func (verifying) VerifiesReads() {}

func (v verifying) Read(ctx context.Context, ns Namespace, d *repb.Digest) (io.ReadCloser, error) {
	rc, err := v.Cache.Read(ctx, ns, d)
	if err != nil {
		return nil, err
	}
	vr, err := NewVerifyingReader(rc, ns.DigestFunction(), d)
	if err != nil {
		rc.Close()
		return nil, err
	}
	return vr, nil
}

// Down forwards the wrapped tier's health (see Health).
func (v verifying) Down() error { return TierDown(v.Cache) }

// VerifiedWriter is implemented by tiers that can store content the caller
// has already verified against its digest (e.g. read from the local cache,
// whose reads verify) without hashing it again.
type VerifiedWriter interface {
	WriteVerified(ctx context.Context, ns Namespace, d *repb.Digest, r io.Reader) error
}

// WriteVerified stores r, which the caller has verified yields d, in c: by
// c's WriteVerified when it has one, else by Write.
func WriteVerified(ctx context.Context, c Cache, ns Namespace, d *repb.Digest, r io.Reader) error {
	if vw, ok := c.(VerifiedWriter); ok {
		return vw.WriteVerified(ctx, ns, d, r)
	}
	return c.Write(ctx, ns, d, r)
}

// WriteVerified forwards to the wrapped tier (see VerifiedWriter).
func (v verifying) WriteVerified(ctx context.Context, ns Namespace, d *repb.Digest, r io.Reader) error {
	return WriteVerified(ctx, v.Cache, ns, d, r)
}
