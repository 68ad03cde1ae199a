package failover

import (
	"context"
	"errors"
	"io"
	"sync"
	"sync/atomic"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/errkind"
)

// stallError is the error of an attempt the guard cut for want of
// progress: DeadlineExceeded.
type stallError struct{ msg string }

func (e *stallError) Error() string              { return e.msg }
func (e *stallError) GRPCStatus() *status.Status { return status.New(codes.DeadlineExceeded, e.msg) }

func isStall(err error) bool {
	var se *stallError
	return errors.As(err, &se)
}

// switchable is a remote that can be dialled afresh: a gRPC connection
// whose stream stalled may be dead without knowing it (a peer or middle
// box that dropped it silently), and every call on it would stall too. On
// the next attempt after a stall the member dials a new client, which
// takes the calls from then on; the old one is closed once the calls
// still on it have had AttemptTimeout to end.
type switchable struct {
	cur  atomic.Pointer[tierBox]
	dial func(context.Context) (cache.Tier, error)

	mu       sync.Mutex
	stale    bool      // a stall was seen since the last dial
	lastDial time.Time // of the last dial attempt
}

var _ cache.Tier = (*switchable)(nil)

type tierBox struct{ t cache.Tier }

func newSwitchable(t cache.Tier, dial func(context.Context) (cache.Tier, error)) *switchable {
	s := &switchable{dial: dial}
	s.cur.Store(&tierBox{t})
	return s
}

func (s *switchable) tier() cache.Tier { return s.cur.Load().t }

// stalled records that an attempt on the current client stalled.
func (s *switchable) stalled() {
	if s.dial == nil {
		return
	}
	s.mu.Lock()
	s.stale = true
	s.mu.Unlock()
}

// refresh dials a new client when the current one stalled since the last
// dial, or knows it is down (cache.Unreachable, for a remote that could
// not be dialled before), at most once per timeout; the old one is closed
// later.
func (s *switchable) refresh(ctx context.Context, timeout time.Duration) error {
	if s.dial == nil {
		return nil
	}
	s.mu.Lock()
	if !(s.stale || cache.TierDown(s.tier()) != nil) || time.Since(s.lastDial) < timeout {
		s.mu.Unlock()
		return nil
	}
	s.lastDial = time.Now()
	s.mu.Unlock()
	dctx, cancel := context.WithTimeout(ctx, timeout)
	t, err := s.dial(dctx)
	cancel()
	if err != nil {
		return errkind.New(errkind.Unavailable, "dialling again after a stall: %w", err)
	}
	s.mu.Lock()
	s.stale = false
	s.mu.Unlock()
	old := s.cur.Swap(&tierBox{t})
	time.AfterFunc(2*timeout, func() { old.t.Close() })
	return nil
}

func (s *switchable) Traits() cache.Traits { return s.tier().Traits() }
func (s *switchable) Down() error          { return s.tier().Down() }

func (s *switchable) FindMissing(ctx context.Context, ns cache.Namespace, ds []*repb.Digest) ([]*repb.Digest, error) {
	return s.tier().FindMissing(ctx, ns, ds)
}

func (s *switchable) Read(ctx context.Context, ns cache.Namespace, d *repb.Digest) (io.ReadCloser, error) {
	return s.tier().Read(ctx, ns, d)
}

func (s *switchable) ReadRange(ctx context.Context, ns cache.Namespace, d *repb.Digest, off, n int64) (io.ReadCloser, error) {
	return s.tier().ReadRange(ctx, ns, d, off, n)
}

func (s *switchable) ReadCompressed(ctx context.Context, ns cache.Namespace, d *repb.Digest) (io.ReadCloser, bool, error) {
	return s.tier().ReadCompressed(ctx, ns, d)
}

func (s *switchable) Write(ctx context.Context, ns cache.Namespace, d *repb.Digest, r io.Reader) error {
	return s.tier().Write(ctx, ns, d, r)
}

func (s *switchable) WriteReporting(ctx context.Context, ns cache.Namespace, d *repb.Digest, r io.Reader) (bool, error) {
	return s.tier().WriteReporting(ctx, ns, d, r)
}

func (s *switchable) GetActionResult(ctx context.Context, ns cache.Namespace, key *repb.Digest) (*repb.ActionResult, error) {
	return s.tier().GetActionResult(ctx, ns, key)
}

func (s *switchable) UpdateActionResult(ctx context.Context, ns cache.Namespace, key *repb.Digest, ar *repb.ActionResult) error {
	return s.tier().UpdateActionResult(ctx, ns, key, ar)
}

func (s *switchable) WriteCompressed(ctx context.Context, ns cache.Namespace, d *repb.Digest, r io.Reader) error {
	return s.tier().WriteCompressed(ctx, ns, d, r)
}

func (s *switchable) PutHashed(ctx context.Context, ns cache.Namespace, d *repb.Digest, data []byte) error {
	return s.tier().PutHashed(ctx, ns, d, data)
}

// Close closes the current client.
func (s *switchable) Close() error { return s.tier().Close() }
