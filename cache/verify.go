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

// CheckFunction returns ns's digest function (digest.Default when unset)
// when it is one snaploader computes, else InvalidArgument.
func (ns Namespace) CheckFunction() (digest.Function, error) {
	switch fn := ns.DigestFunction(); fn {
	case digest.BLAKE3, digest.SHA256:
		return fn, nil
	}
	return 0, errkind.New(errkind.InvalidArgument, "unsupported digest function %v", ns.Function)
}

// CheckDigest is CheckFunction, and d a well-formed digest (else
// InvalidArgument): what every tier checks before it looks a blob or an
// entry up.
func (ns Namespace) CheckDigest(d *repb.Digest) (digest.Function, error) {
	fn, err := ns.CheckFunction()
	if err != nil {
		return 0, err
	}
	return fn, digest.Validate(d)
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

// Verifying returns a Tier whose reads verify the blob while streaming: at
// the end of the stream a content or length mismatch is a DataLoss error
// naming the digest instead of io.EOF. Every other method passes through.
// A tier whose reads already verify (Traits.VerifiesReads) is returned as
// it is.
func Verifying(c Tier) Tier {
	if c.Traits().VerifiesReads {
		return c
	}
	return verifying{c}
}

// verifying is Verifying's wrapper: each method of the contract, written
// out so that none is lost.
type verifying struct{ c Tier }

var _ Tier = verifying{}

// Traits are the wrapped tier's, with reads verified.
func (v verifying) Traits() Traits {
	t := v.c.Traits()
	t.VerifiesReads = true
	return t
}

func (v verifying) Read(ctx context.Context, ns Namespace, d *repb.Digest) (io.ReadCloser, error) {
	rc, err := v.c.Read(ctx, ns, d)
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

// ReadCompressed verifies a raw stream as Read does; zstd frames pass
// unverified, as the contract of CompressedReader says.
func (v verifying) ReadCompressed(ctx context.Context, ns Namespace, d *repb.Digest) (io.ReadCloser, bool, error) {
	rc, compressed, err := v.c.ReadCompressed(ctx, ns, d)
	if err != nil || compressed {
		return rc, compressed, err
	}
	vr, err := NewVerifyingReader(rc, ns.DigestFunction(), d)
	if err != nil {
		rc.Close()
		return nil, false, err
	}
	return vr, false, nil
}

func (v verifying) ReadRange(ctx context.Context, ns Namespace, d *repb.Digest, off, n int64) (io.ReadCloser, error) {
	return v.c.ReadRange(ctx, ns, d, off, n)
}

func (v verifying) FindMissing(ctx context.Context, ns Namespace, ds []*repb.Digest) ([]*repb.Digest, error) {
	return v.c.FindMissing(ctx, ns, ds)
}

func (v verifying) Write(ctx context.Context, ns Namespace, d *repb.Digest, r io.Reader) error {
	return v.c.Write(ctx, ns, d, r)
}

func (v verifying) WriteReporting(ctx context.Context, ns Namespace, d *repb.Digest, r io.Reader) (bool, error) {
	return v.c.WriteReporting(ctx, ns, d, r)
}

func (v verifying) GetActionResult(ctx context.Context, ns Namespace, key *repb.Digest) (*repb.ActionResult, error) {
	return v.c.GetActionResult(ctx, ns, key)
}

func (v verifying) UpdateActionResult(ctx context.Context, ns Namespace, key *repb.Digest, ar *repb.ActionResult) error {
	return v.c.UpdateActionResult(ctx, ns, key, ar)
}

// WriteCompressed passes through: the tier verifies what it stores.
func (v verifying) WriteCompressed(ctx context.Context, ns Namespace, d *repb.Digest, r io.Reader) error {
	return v.c.WriteCompressed(ctx, ns, d, r)
}

func (v verifying) PutHashed(ctx context.Context, ns Namespace, d *repb.Digest, data []byte) error {
	return v.c.PutHashed(ctx, ns, d, data)
}

func (v verifying) Down() error  { return v.c.Down() }
func (v verifying) Close() error { return v.c.Close() }
