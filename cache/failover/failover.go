// Package failover is a cache tier over an ordered list of remotes (say a
// regional `snaploader serve`, then the bucket behind it) that rides out
// their outages: a call goes to the first remote that answers, skipping
// one that is down, and a failure that is transient (Unavailable, a
// refused or reset connection, a deadline of one attempt, a stream cut
// mid-read) is retried with jittered exponential backoff, across the
// remotes, for a bounded time (Options.RetryFor, default one minute) before
// the call fails with an Unavailable error naming what was asked, the
// remotes tried and the last cause.
//
// # Reads
//
// A read tries the remotes in order: NotFound from one goes on to the
// next; a remote in an outage is skipped and tried again on the next pass.
// A blob is NotFound when every remote said so; while some remote is down
// and none had it, the read keeps trying within the bound (the blob may
// be on the one that is down). A stream cut in the middle resumes at the
// offset reached, on the first remote that serves the blob again (reading
// from the start and skipping what was delivered when it serves no
// ranges). Every byte delivered is hashed, and the final bytes of a blob
// are only delivered once the whole blob matched its digest: a read never
// ends cleanly on content that is not the blob, whichever remotes the
// pieces came from (a mismatch is DataLoss). A remote that reports its
// copy corrupt before delivering anything is skipped like one lacking it.
// Which remotes served a read is reported (ReadFrom, Options.OnRead,
// Stats), so that reports, traces and metrics can name them.
//
// # Other calls
//
// FindMissing is answered by the first remote that answers. An
// action-cache read is answered by the first remote that holds the entry;
// it is NotFound once every remote that answered said so (a remote that is
// down does not hold up a NotFound from another: in the intended order, a
// regional tier over a bucket and then that bucket, the bucket's answer
// is the regional tier's too). Writes and action-cache updates go to the
// first writable remote (Remote.ReadOnly unset) that is up; when it is in
// an outage they go to the next writable one. The remotes are meant to be
// views of one store (a regional tier writes through to its bucket), so
// the write is visible through each of them.
//
// # Outages
//
// Each remote gets its own breaker (cache.NewBreaker): after an outage new
// calls skip it at once until Options.BreakerRetryAfter has passed, then
// one call probes it. A call already under way never fails because a
// breaker is open: it keeps retrying and probing until RetryFor has
// passed without progress. An attempt fails as DeadlineExceeded (an
// outage) when a remote does not answer a call, or sends no byte of a
// stream, for Options.AttemptTimeout.
//
// # Building it
//
// Give New the remotes without breakers of their own (it adds one per
// remote; another in front of it would fail calls fast for its own
// period) and, for a REAPI remote, a Dial that makes a new client, so that
// a connection dropped silently on the way is replaced. A remote that
// cannot be dialled at start may be given as cache.Unreachable with that
// Dial: it is skipped, and dialled again at most once per AttemptTimeout
// until it answers.
package failover

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/errkind"
)

// Defaults of Options.
const (
	DefaultRetryFor          = time.Minute
	DefaultAttemptTimeout    = 15 * time.Second
	DefaultMinBackoff        = 50 * time.Millisecond
	DefaultMaxBackoff        = 2 * time.Second
	DefaultBreakerRetryAfter = time.Second
)

// Remote is one remote of the list.
type Remote struct {
	// Tier is the remote, not wrapped in a breaker (the failover tier
	// wraps it in its own).
	Tier cache.Tier
	// Name names it in errors, logs and reports (default: its traits'
	// description).
	Name string
	// ReadOnly keeps writes and action-cache updates off it.
	ReadOnly bool
	// Dial, when set, makes a new client of the remote (remote.Dial for a
	// REAPI cache). It is called on the next attempt after a call to the
	// remote stalled (AttemptTimeout without a byte): a gRPC connection
	// dropped silently on the way stalls every call on it, and only a new
	// connection gets through. The client it replaces is closed once the
	// calls still on it have had 2×AttemptTimeout to end. It is also how
	// a remote given as cache.Unreachable (down when the command started)
	// is dialled again.
	Dial func(context.Context) (cache.Tier, error)
}

// Options configure a Tier. The zero value gives the defaults.
type Options struct {
	// RetryFor bounds how long a call keeps retrying transient failures
	// without progress (a read that receives bytes starts the bound
	// again). Default DefaultRetryFor.
	RetryFor time.Duration
	// LookupRetryFor bounds the retries of every call but a blob read
	// (action-cache lookups and updates, FindMissing, writes): 0, the
	// default, makes one pass over the remotes, so that new work (a key
	// lookup, a save) does not wait on remotes that are down but goes on
	// with what the host has, while a blob read of a restore or of a
	// running VM rides out an outage for RetryFor.
	LookupRetryFor time.Duration
	// AttemptTimeout is the deadline of one attempt of a call, and the
	// longest a stream may go without a byte (default
	// DefaultAttemptTimeout).
	AttemptTimeout time.Duration
	// MinBackoff and MaxBackoff bound the delay between passes over the
	// remotes; it doubles from MinBackoff up to MaxBackoff and is
	// jittered (defaults DefaultMinBackoff, DefaultMaxBackoff).
	MinBackoff, MaxBackoff time.Duration
	// BreakerRetryAfter is how long new calls skip a remote after an
	// outage before one probes it (default DefaultBreakerRetryAfter).
	BreakerRetryAfter time.Duration
	// Logger gets the breakers' notices and retries; nil =
	// slog.Default().
	Logger *slog.Logger
	// OnRead, when set, is called once per read (Read, ReadRange,
	// ReadCompressed) when it ends: at the end of the stream, its error,
	// or Close.
	OnRead func(ReadEvent)
}

// ReadEvent describes a read that ended.
type ReadEvent struct {
	Digest *repb.Digest
	// Offset and Length are the range read (the whole blob for Read).
	Offset, Length int64
	// Remotes are the remotes that delivered bytes, in order (one unless
	// the read was resumed on another).
	Remotes []string
	// Bytes delivered; Attempts opened (1 unless resumed or retried).
	Bytes    int64
	Attempts int
	// Complete is true when the read delivered all its bytes, verified.
	Complete bool
	Err      error
	Duration time.Duration
}

// Tier is a cache.Tier over ordered remotes (see the package
// documentation). It is safe for concurrent use.
type Tier struct {
	members []*member
	opts    Options
}

type member struct {
	name     string
	raw      cache.Tier // sw
	sw       *switchable
	tier     cache.Tier // raw, guarded by AttemptTimeout, behind a breaker
	breaker  *cache.Breaker
	readOnly bool

	reads, readBytes, failures, notFound, writes atomic.Int64
}

var _ cache.Tier = (*Tier)(nil)

// New returns a Tier over remotes, tried in their order.
func New(remotes []Remote, opts Options) (*Tier, error) {
	if len(remotes) == 0 {
		return nil, errkind.New(errkind.InvalidArgument, "failover: no remote")
	}
	if opts.RetryFor <= 0 {
		opts.RetryFor = DefaultRetryFor
	}
	if opts.AttemptTimeout <= 0 {
		opts.AttemptTimeout = DefaultAttemptTimeout
	}
	if opts.MinBackoff <= 0 {
		opts.MinBackoff = DefaultMinBackoff
	}
	if opts.MaxBackoff <= 0 {
		opts.MaxBackoff = DefaultMaxBackoff
	}
	opts.MaxBackoff = max(opts.MaxBackoff, opts.MinBackoff)
	if opts.BreakerRetryAfter <= 0 {
		opts.BreakerRetryAfter = DefaultBreakerRetryAfter
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	t := &Tier{opts: opts}
	seen := map[string]bool{}
	for i, r := range remotes {
		if r.Tier == nil {
			return nil, errkind.New(errkind.InvalidArgument, "failover: remote %d is nil", i+1)
		}
		name := r.Name
		if name == "" {
			name = r.Tier.Traits().Description
		}
		if seen[name] {
			name = fmt.Sprintf("%s (#%d)", name, i+1)
		}
		seen[name] = true
		sw := newSwitchable(r.Tier, r.Dial)
		m := &member{name: name, raw: sw, sw: sw, readOnly: r.ReadOnly}
		m.breaker = cache.NewBreaker(guard(sw, name, opts.AttemptTimeout), cache.BreakerOptions{
			Name: name, RetryAfter: opts.BreakerRetryAfter, Logger: opts.Logger,
		})
		m.tier = m.breaker
		t.members = append(t.members, m)
	}
	return t, nil
}

// Close closes the remotes' clients (the ones given to New, or those
// Remote.Dial made since). The Tier must not be used afterwards.
func (t *Tier) Close() error {
	var errs []error
	for _, m := range t.members {
		errs = append(errs, m.sw.Close())
	}
	return errors.Join(errs...)
}

// ready prepares m for an attempt: a new client after a stall (see
// Remote.Dial). An error is a failure of m.
func (t *Tier) ready(ctx context.Context, m *member) error {
	return m.sw.refresh(ctx, t.opts.AttemptTimeout)
}

// Names are the remotes' names, in order.
func (t *Tier) Names() []string {
	var ns []string
	for _, m := range t.members {
		ns = append(ns, m.name)
	}
	return ns
}

// Traits: reads are verified here (whichever remotes the bytes came
// from); ranges are read from the remotes that serve them, unverified;
// compressed reads are the raw content; nothing is kept on this host.
func (t *Tier) Traits() cache.Traits {
	tr := cache.Traits{
		Description:             "remotes " + strings.Join(t.Names(), ", then "),
		VerifiesReads:           true,
		VerifiesCompressedReads: true,
	}
	for _, m := range t.members {
		tr.ServesRanges = tr.ServesRanges || m.raw.Traits().ServesRanges
	}
	return tr
}

// remotesVerify reports whether every remote's whole reads verify the
// blob (so that a read need not hash it again).
func (t *Tier) remotesVerify() bool {
	for _, m := range t.members {
		if !m.raw.Traits().VerifiesReads {
			return false
		}
	}
	return true
}

// Down is an error when every remote is down, else nil.
func (t *Tier) Down() error {
	var errs []error
	for _, m := range t.members {
		err := m.breaker.Down()
		if err == nil {
			return nil
		}
		errs = append(errs, fmt.Errorf("%s: %w", m.name, err))
	}
	return errkind.New(errkind.Unavailable, "every remote is down: %w", errors.Join(errs...))
}

// RemoteStats are one remote's counters.
type RemoteStats struct {
	Name      string
	Reads     int64 // reads (or resumed reads) it served
	ReadBytes int64 // bytes it delivered
	Failures  int64 // transient failures of calls to it (and calls its open breaker refused)
	NotFound  int64 // reads and entry lookups it answered NotFound
	Writes    int64 // writes and action-cache updates it took
	Down      error // its breaker's outage, nil while up
}

// Stats returns each remote's counters, in order.
func (t *Tier) Stats() []RemoteStats {
	var s []RemoteStats
	for _, m := range t.members {
		s = append(s, RemoteStats{Name: m.name, Reads: m.reads.Load(), ReadBytes: m.readBytes.Load(),
			Failures: m.failures.Load(), NotFound: m.notFound.Load(), Writes: m.writes.Load(), Down: m.breaker.Down()})
	}
	return s
}

// Transient reports whether err is a failure worth retrying: an outage
// (Unavailable, a deadline, a breaker that is open), a refused, reset or
// broken connection, or a stream that ended early.
func Transient(err error) bool {
	if err == nil {
		return false
	}
	if cache.IsOutage(err) {
		return true
	}
	switch status.Code(err) {
	case codes.Aborted:
		return true
	}
	return errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.EPIPE)
}

// retrier tracks one call's failures and paces its passes over the
// remotes.
type retrier struct {
	t      *Tier
	what   string
	bound  time.Duration
	since  time.Time // start of the current run of failures (zero: none)
	passes int
	order  []string
	tries  map[string]int
	last   error
	lastBy string
}

func (t *Tier) retrier(what string) *retrier {
	return &retrier{t: t, what: what, bound: t.opts.RetryFor, tries: map[string]int{}}
}

// lookupRetrier is the retrier of a call that is not a blob read (a
// lookup, an existence check, a write): bounded by LookupRetryFor, so that
// new work does not wait on a dead remote.
func (t *Tier) lookupRetrier(what string) *retrier {
	return &retrier{t: t, what: what, bound: t.opts.LookupRetryFor, tries: map[string]int{}}
}

// failed records a transient failure of m.
func (r *retrier) failed(m *member, err error) {
	m.failures.Add(1)
	if isStall(err) {
		m.sw.stalled()
	}
	if r.since.IsZero() {
		r.since = time.Now()
	}
	if r.tries[m.name] == 0 {
		r.order = append(r.order, m.name)
	}
	r.tries[m.name]++
	r.last, r.lastBy = err, m.name
}

// progress says the call moved on: the bound starts again at the next
// failure.
func (r *retrier) progress() {
	r.since = time.Time{}
	r.passes = 0
}

// wait sleeps before the next pass, or returns the call's final error
// when the bound has passed (or ctx ended).
func (r *retrier) wait(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("%s: %w", r.what, status.FromContextError(err).Err())
	}
	if r.since.IsZero() {
		r.since = time.Now()
	}
	left := r.bound - time.Since(r.since)
	if left <= 0 {
		return r.final()
	}
	limit := min(r.t.opts.MinBackoff<<min(r.passes, 20), r.t.opts.MaxBackoff)
	r.passes++
	d := min(limit/2+rand.N(limit/2+1), left)
	r.t.opts.Logger.Debug("failover: retrying", "what", r.what, "after", d, "last_error", r.last)
	tm := time.NewTimer(d)
	defer tm.Stop()
	select {
	case <-ctx.Done():
		return fmt.Errorf("%s: %w", r.what, status.FromContextError(ctx.Err()).Err())
	case <-tm.C:
	}
	if time.Since(r.since) >= r.bound {
		return r.final()
	}
	return nil
}

// final is the Unavailable error of a call that ran out of time.
func (r *retrier) final() error {
	var tried []string
	for _, n := range r.order {
		tried = append(tried, fmt.Sprintf("%s (%d failed attempts)", n, r.tries[n]))
	}
	if len(tried) == 0 {
		tried = []string{"none answered"}
	}
	if r.last == nil {
		return errkind.New(errkind.Unavailable, "%s: no remote answered within %s", r.what, r.bound)
	}
	return errkind.New(errkind.Unavailable, "%s: no remote answered within %s; tried %s; last error, from %s: %w",
		r.what, r.bound, strings.Join(tried, ", "), r.lastBy, r.last)
}
