package cache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// IsOutage reports whether err means the tier itself is down or too slow
// (Unavailable, or a deadline the tier did not meet), as opposed to an
// answer about the request (NotFound, InvalidArgument, corrupt data).
func IsOutage(err error) bool {
	switch status.Code(err) {
	case codes.Unavailable, codes.DeadlineExceeded:
		return true
	}
	return errors.Is(err, context.DeadlineExceeded)
}

// TierDown is t.Down(), nil for no tier.
func TierDown(t Tier) error {
	if t == nil {
		return nil
	}
	return t.Down()
}

// BreakerOptions configure NewBreaker.
type BreakerOptions struct {
	// Name names the tier in messages (e.g. its URL).
	Name string
	// RetryAfter is how long calls fail fast after an outage before one
	// call is let through to see whether the tier is back (default 10s).
	RetryAfter time.Duration
	// Logger gets one warning when the tier goes down and one notice when
	// it is back; nil = slog.Default().
	Logger *slog.Logger
	// Now returns the current time (tests); nil = time.Now.
	Now func() time.Time
}

// Breaker wraps a tier so that an outage costs one timeout, not one per
// call: after a call fails with an outage (IsOutage), every call fails at
// once with Unavailable naming the first error, until RetryAfter has
// passed; then one call at a time probes the tier, and the first success
// closes the breaker again. Down says whether it is open.
type Breaker struct {
	c    Tier
	opts BreakerOptions

	mu      sync.Mutex
	down    error     // the outage, nil while up
	retryAt time.Time // when the next probe may go through
	probing bool
}

var (
	_ Tier = (*Breaker)(nil)
	_ Tier = unreachable{}
)

// NewBreaker wraps c.
func NewBreaker(c Tier, opts BreakerOptions) *Breaker {
	if opts.RetryAfter <= 0 {
		opts.RetryAfter = 10 * time.Second
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Name == "" {
		opts.Name = "remote tier"
	}
	return &Breaker{c: c, opts: opts}
}

// Down returns the outage the tier is in, nil while it is up.
func (b *Breaker) Down() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.down
}

// Unwrap returns the wrapped tier.
func (b *Breaker) Unwrap() Tier { return b.c }

// Traits are the wrapped tier's: the breaker does not change what is read.
func (b *Breaker) Traits() Traits { return b.c.Traits() }

// admit says whether a call may go to the tier now; probe is true when
// the call is the one testing a tier that is down.
func (b *Breaker) admit() (probe bool, err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.down == nil {
		return false, nil
	}
	if b.probing || b.opts.Now().Before(b.retryAt) {
		return false, status.Errorf(codes.Unavailable, "%s is down (first error: %v)", b.opts.Name, b.down)
	}
	b.probing = true
	return true, nil
}

// done records a call's outcome.
func (b *Breaker) done(ctx context.Context, probe bool, err error) {
	outage := err != nil && IsOutage(err) && ctx.Err() == nil
	b.mu.Lock()
	defer b.mu.Unlock()
	if probe {
		b.probing = false
	}
	switch {
	case outage && b.down == nil:
		b.down = err
		b.retryAt = b.opts.Now().Add(b.opts.RetryAfter)
		b.opts.Logger.Warn("remote tier unavailable; new lookups skip it while blob reads already waiting ride out the outage within their retry bound", "remote", b.opts.Name, "err", err)
	case outage:
		b.retryAt = b.opts.Now().Add(b.opts.RetryAfter)
	case b.down != nil && (err == nil || !IsOutage(err)) && ctx.Err() == nil:
		b.down = nil
		b.opts.Logger.Warn("remote tier is back", "remote", b.opts.Name)
	}
}

func (b *Breaker) call(ctx context.Context, f func() error) error {
	probe, err := b.admit()
	if err != nil {
		return err
	}
	err = f()
	b.done(ctx, probe, err)
	return err
}

// FindMissing implements Cache.
func (b *Breaker) FindMissing(ctx context.Context, ns Namespace, ds []*repb.Digest) (missing []*repb.Digest, err error) {
	err = b.call(ctx, func() error { missing, err = b.c.FindMissing(ctx, ns, ds); return err })
	return missing, err
}

// Read implements Cache. An outage in the middle of a stream also trips
// the breaker.
func (b *Breaker) Read(ctx context.Context, ns Namespace, d *repb.Digest) (rc io.ReadCloser, err error) {
	err = b.call(ctx, func() error { rc, err = b.c.Read(ctx, ns, d); return err })
	if err != nil {
		return nil, err
	}
	return &breakerReader{ReadCloser: rc, b: b, ctx: ctx}, nil
}

type breakerReader struct {
	io.ReadCloser
	b   *Breaker
	ctx context.Context
}

func (r *breakerReader) Read(p []byte) (int, error) {
	n, err := r.ReadCloser.Read(p)
	if err != nil && err != io.EOF && IsOutage(err) {
		r.b.done(r.ctx, false, err)
	}
	return n, err
}

// Write implements Cache.
func (b *Breaker) Write(ctx context.Context, ns Namespace, d *repb.Digest, r io.Reader) error {
	return b.call(ctx, func() error { return b.c.Write(ctx, ns, d, r) })
}

// WriteReporting implements Tier.
func (b *Breaker) WriteReporting(ctx context.Context, ns Namespace, d *repb.Digest, r io.Reader) (stored bool, err error) {
	err = b.call(ctx, func() error { stored, err = b.c.WriteReporting(ctx, ns, d, r); return err })
	return stored, err
}

// GetActionResult implements Cache.
func (b *Breaker) GetActionResult(ctx context.Context, ns Namespace, key *repb.Digest) (ar *repb.ActionResult, err error) {
	err = b.call(ctx, func() error { ar, err = b.c.GetActionResult(ctx, ns, key); return err })
	return ar, err
}

// UpdateActionResult implements Cache.
func (b *Breaker) UpdateActionResult(ctx context.Context, ns Namespace, key *repb.Digest, ar *repb.ActionResult) error {
	return b.call(ctx, func() error { return b.c.UpdateActionResult(ctx, ns, key, ar) })
}

// WithBreaker wraps c in a Breaker.
func WithBreaker(c Tier, opts BreakerOptions) Tier { return NewBreaker(c, opts) }

// Unreachable is a tier that could not be reached at all (e.g. its
// capabilities could not be read): every call fails with err, wrapped as
// Unavailable, and Down is err.
func Unreachable(name string, err error) Tier {
	return unreachable{name: name, err: fmt.Errorf("%s: %w", name, err)}
}

type unreachable struct {
	name string
	err  error
}

func (u unreachable) Traits() Traits { return Traits{Description: u.name} }

func (u unreachable) ReadRange(context.Context, Namespace, *repb.Digest, int64, int64) (io.ReadCloser, error) {
	return nil, u.fail()
}

func (u unreachable) ReadCompressed(context.Context, Namespace, *repb.Digest) (io.ReadCloser, bool, error) {
	return nil, false, u.fail()
}

func (u unreachable) Down() error  { return u.err }
func (u unreachable) Close() error { return nil }
func (u unreachable) WriteCompressed(context.Context, Namespace, *repb.Digest, io.Reader) error {
	return u.fail()
}
func (u unreachable) PutHashed(context.Context, Namespace, *repb.Digest, []byte) error {
	return u.fail()
}
func (u unreachable) fail() error {
	if IsOutage(u.err) {
		return u.err
	}
	return status.Errorf(codes.Unavailable, "%v", u.err)
}
func (u unreachable) FindMissing(context.Context, Namespace, []*repb.Digest) ([]*repb.Digest, error) {
	return nil, u.fail()
}
func (u unreachable) Read(context.Context, Namespace, *repb.Digest) (io.ReadCloser, error) {
	return nil, u.fail()
}
func (u unreachable) Write(context.Context, Namespace, *repb.Digest, io.Reader) error {
	return u.fail()
}

func (u unreachable) WriteReporting(ctx context.Context, ns Namespace, d *repb.Digest, r io.Reader) (bool, error) {
	return false, u.Write(ctx, ns, d, r)
}
func (u unreachable) GetActionResult(context.Context, Namespace, *repb.Digest) (*repb.ActionResult, error) {
	return nil, u.fail()
}
func (u unreachable) UpdateActionResult(context.Context, Namespace, *repb.Digest, *repb.ActionResult) error {
	return u.fail()
}

// ReadRange implements Tier.
func (b *Breaker) ReadRange(ctx context.Context, ns Namespace, d *repb.Digest, off, n int64) (rc io.ReadCloser, err error) {
	err = b.call(ctx, func() error { rc, err = b.c.ReadRange(ctx, ns, d, off, n); return err })
	if err != nil {
		return nil, err
	}
	return &breakerReader{ReadCloser: rc, b: b, ctx: ctx}, nil
}

// ReadCompressed implements Tier. An outage in the middle of a stream also
// trips the breaker.
func (b *Breaker) ReadCompressed(ctx context.Context, ns Namespace, d *repb.Digest) (rc io.ReadCloser, compressed bool, err error) {
	err = b.call(ctx, func() error { rc, compressed, err = b.c.ReadCompressed(ctx, ns, d); return err })
	if err != nil {
		return nil, false, err
	}
	return &breakerReader{ReadCloser: rc, b: b, ctx: ctx}, compressed, nil
}

// WriteCompressed implements Tier.
func (b *Breaker) WriteCompressed(ctx context.Context, ns Namespace, d *repb.Digest, r io.Reader) error {
	return b.call(ctx, func() error { return b.c.WriteCompressed(ctx, ns, d, r) })
}

// PutHashed implements Tier.
func (b *Breaker) PutHashed(ctx context.Context, ns Namespace, d *repb.Digest, data []byte) error {
	return b.call(ctx, func() error { return b.c.PutHashed(ctx, ns, d, data) })
}

// Close closes the wrapped tier.
func (b *Breaker) Close() error { return b.c.Close() }
