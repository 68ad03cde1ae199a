package cache

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"sync/atomic"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// flaky is a tier answering every call with err (nil = NotFound), counting
// the calls that reached it.
type flaky struct {
	err   atomic.Pointer[error]
	calls atomic.Int64
}

func (f *flaky) answer() error {
	f.calls.Add(1)
	if e := f.err.Load(); e != nil {
		return *e
	}
	return NotFoundf("absent")
}
func (f *flaky) set(err error) { f.err.Store(&err) }
func (f *flaky) FindMissing(context.Context, Namespace, []*repb.Digest) ([]*repb.Digest, error) {
	return nil, f.answer()
}
func (f *flaky) Read(context.Context, Namespace, *repb.Digest) (io.ReadCloser, error) {
	return nil, f.answer()
}
func (f *flaky) Write(context.Context, Namespace, *repb.Digest, io.Reader) error { return f.answer() }
func (f *flaky) WriteReporting(context.Context, Namespace, *repb.Digest, io.Reader) (bool, error) {
	return true, f.answer()
}
func (f *flaky) GetActionResult(context.Context, Namespace, *repb.Digest) (*repb.ActionResult, error) {
	return nil, f.answer()
}
func (f *flaky) UpdateActionResult(context.Context, Namespace, *repb.Digest, *repb.ActionResult) error {
	return f.answer()
}
func (f *flaky) ReadRange(context.Context, Namespace, *repb.Digest, int64, int64) (io.ReadCloser, error) {
	return nil, f.answer()
}
func (f *flaky) ReadCompressed(context.Context, Namespace, *repb.Digest) (io.ReadCloser, bool, error) {
	return nil, false, f.answer()
}
func (f *flaky) WriteCompressed(context.Context, Namespace, *repb.Digest, io.Reader) error {
	return f.answer()
}
func (f *flaky) PutHashed(context.Context, Namespace, *repb.Digest, []byte) error { return f.answer() }
func (f *flaky) Traits() Traits                                                   { return Traits{Description: "flaky", ServesRanges: true} }
func (f *flaky) Down() error                                                      { return nil }
func (f *flaky) Close() error                                                     { return nil }

func TestBreaker(t *testing.T) {
	ctx := context.Background()
	now := time.Unix(1000, 0)
	var logs bytes.Buffer
	inner := &flaky{}
	b := NewBreaker(inner, BreakerOptions{Name: "grpc://cache", RetryAfter: 10 * time.Second, Now: func() time.Time { return now }, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	get := func() error { _, err := b.GetActionResult(ctx, Namespace{}, &repb.Digest{}); return err }

	for _, tc := range []struct {
		name      string
		set       error // what the tier answers from now on
		advance   time.Duration
		wantCode  codes.Code
		wantCalls int64 // calls that reach the tier, cumulative
		wantDown  bool
	}{
		{"up: answers pass through", nil, 0, codes.NotFound, 1, false},
		{"outage trips the breaker", status.Error(codes.Unavailable, "connection refused"), 0, codes.Unavailable, 2, true},
		{"down: fails fast", nil, time.Second, codes.Unavailable, 2, true},
		{"a slow tier is an outage too", status.Error(codes.DeadlineExceeded, "slow"), 10 * time.Second, codes.DeadlineExceeded, 3, true},
		{"probe after RetryAfter, tier back", nil, 11 * time.Second, codes.NotFound, 4, false},
		{"not an outage: InvalidArgument", status.Error(codes.InvalidArgument, "bad"), 0, codes.InvalidArgument, 5, false},
	} {
		if tc.set != nil {
			inner.set(tc.set)
		} else {
			inner.err.Store(nil)
		}
		now = now.Add(tc.advance)
		err := get()
		if status.Code(err) != tc.wantCode || inner.calls.Load() != tc.wantCalls || (b.Down() != nil) != tc.wantDown {
			t.Fatalf("%s: got %v (calls %d, down %v), want %v (calls %d, down %v)", tc.name, err, inner.calls.Load(), b.Down(), tc.wantCode, tc.wantCalls, tc.wantDown)
		}
	}
	if n := bytes.Count(logs.Bytes(), []byte("remote tier unavailable")); n != 1 {
		t.Errorf("warned %d times about the outage, want once:\n%s", n, logs.String())
	}
}

func TestBreakerIgnoresCallerCancellation(t *testing.T) {
	inner := &flaky{}
	inner.set(context.DeadlineExceeded)
	b := NewBreaker(inner, BreakerOptions{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Nanosecond)
	defer cancel()
	<-ctx.Done()
	b.FindMissing(ctx, Namespace{}, nil)
	if b.Down() != nil {
		t.Error("a caller's own expired deadline tripped the breaker")
	}
}

func TestUnreachable(t *testing.T) {
	u := Unreachable("grpc://x", errors.New("dial: connection refused"))
	if _, err := u.GetActionResult(context.Background(), Namespace{}, &repb.Digest{}); status.Code(err) != codes.Unavailable {
		t.Errorf("got %v, want Unavailable", err)
	}
	if TierDown(u) == nil {
		t.Error("TierDown(Unreachable) is nil")
	}
	// Wrapping keeps every trait: the breaker's are the wrapped tier's.
	w := WithBreaker(Verifying(&flaky{}), BreakerOptions{})
	if tr := w.Traits(); !tr.VerifiesReads || !tr.ServesRanges || tr.Description != "flaky" {
		t.Errorf("wrapped traits %+v: want verified reads, ranges and the tier's description", tr)
	}
}
