// Package tierurl opens the shared tiers URLs name, as every command of
// snaploader does: REAPI caches (grpc://HOST:PORT, grpcs://HOST:PORT,
// unix:///PATH) and S3 buckets (s3://BUCKET[/PREFIX]?...), in order, as
// one verified failover tier, with what the first cache said of itself:
// the digest function for new snapshots, its largest blob, whether this
// client may publish.
package tierurl

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	neturl "net/url"
	"strings"
	"time"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/failover"
	"github.com/snaploader/snaploader/cache/s3cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
	"github.com/snaploader/snaploader/remote"
)

// Options configure Open.
type Options struct {
	// Remote configures a REAPI client: credentials, TLS roots, timeouts,
	// and the digest function when the caller insists on one.
	Remote remote.Options
	// MaxBlobBytes is the largest blob the tier takes, for caches that do
	// not say (0: what they say, else no limit).
	MaxBlobBytes int64
	// Required makes a tier that cannot be reached a *DownError instead of
	// a tier that fails every call at once (so a host can go on with its
	// local cache while the shared one is down).
	Required bool
	// Logger gets the warning when a tier cannot be reached (nil:
	// slog.Default()).
	Logger *slog.Logger
	// RetryFor bounds how long a blob read rides out transient failures
	// (default failover.DefaultRetryFor, about a minute).
	RetryFor time.Duration
	// OnRead, when set, is told of every blob read: which remotes served
	// it (failover.ReadEvent).
	OnRead func(failover.ReadEvent)
}

// Opened is a tier opened from its URL.
type Opened struct {
	// Tier is the tier, verified and behind a breaker.
	Tier cache.Tier
	// Function is the digest function for new snapshots (the caller's
	// when the tier does not choose); EntryFunction the one version
	// entries live under; Functions those the tier accepts (nil: any).
	Function, EntryFunction digest.Function
	Functions               []digest.Function
	// MaxBlobBytes is the largest blob it takes (0: no stated limit).
	MaxBlobBytes int64
	// Writable is false when the tier refuses this client's action-cache
	// updates (a read-only key).
	Writable bool
	// Down is why no tier could be reached at start (each is dialled
	// again when used), nil when one was.
	Down error
	// Failover is Tier as the failover tier it is: its Stats name the
	// remotes that served.
	Failover *failover.Tier

	closer io.Closer
}

// Close releases the tier's connections.
func (o *Opened) Close() error {
	if o.closer == nil {
		return nil
	}
	return o.closer.Close()
}

// DownError is a tier that could not be reached (an error of Open when
// Options.Required and none could).
type DownError struct {
	URL string
	Err error
}

func (e *DownError) Error() string {
	return fmt.Sprintf("remote %s is unavailable: %s", e.URL, errkind.Text(e.Err))
}

// Unwrap returns the cause.
func (e *DownError) Unwrap() error { return e.Err }

// Open opens the tiers urls name, in order (a regional serve, then the
// bucket behind it, say), as one failover tier (cache/failover): a blob
// read tries them in order, skips one that is down and rides out a
// transient failure (a restart, reset connections, a stall) for
// opts.RetryFor, resuming a cut stream where it stopped and verifying
// every blob whichever remotes served it; lookups and writes make one pass
// over them, so that new work goes on with the local cache when all are
// down. Writes go to the first writable one. fn is the digest function for
// new snapshots when no remote chooses one; the first REAPI remote that
// answers gives the rest of what Opened says. A tier that cannot be reached
// at start is not an error unless opts.Required and none can: it is
// dialled again when used (Opened.Down says why none could be reached). An
// endpoint that answers another protocol, or a malformed URL, is
// InvalidArgument.
func Open(ctx context.Context, urls []string, fn digest.Function, opts Options) (*Opened, error) {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	o := &Opened{Function: fn, EntryFunction: digest.BLAKE3, Writable: true}
	var remotes []failover.Remote
	described := false
	var downs []error
	for _, url := range urls {
		dial, err := dialer(url, opts)
		if err != nil {
			return nil, err
		}
		t, c, err := dial(ctx)
		if err != nil {
			if ctx.Err() != nil || !cache.IsOutage(err) || errkind.Is(err, errkind.InvalidArgument) {
				for _, r := range remotes {
					r.Tier.Close()
				}
				return nil, err
			}
			// Its breaker warns at the first call it fails, once.
			downs = append(downs, &DownError{URL: Name(url), Err: err})
			t = cache.Unreachable(Name(url), err)
		} else if c != nil && !described {
			described = true
			o.Function, o.EntryFunction, o.Writable = c.DigestFunction(), c.EntryFunction(), c.CanUpdateActionCache()
			o.Functions, o.MaxBlobBytes = c.Functions(), c.MaxBlobBytes()
		}
		remotes = append(remotes, failover.Remote{Tier: cache.Verifying(t), Name: Name(url), Dial: func(ctx context.Context) (cache.Tier, error) {
			t, _, err := dial(ctx)
			if err != nil {
				return nil, err
			}
			return cache.Verifying(t), nil
		}})
	}
	if len(downs) == len(urls) && len(urls) > 0 {
		if opts.Required {
			return nil, downs[0]
		}
		o.Down = errors.Join(downs...)
	}
	if opts.MaxBlobBytes > 0 {
		o.MaxBlobBytes = opts.MaxBlobBytes
	}
	ft, err := failover.New(remotes, failover.Options{RetryFor: opts.RetryFor, Logger: opts.Logger, OnRead: opts.OnRead})
	if err != nil {
		for _, r := range remotes {
			r.Tier.Close()
		}
		return nil, err
	}
	// Closing the failover tier closes every remote's client.
	o.Tier, o.Failover, o.closer = ft, ft, ft
	return o, nil
}

// dialFunc opens a tier; a REAPI cache also gives its client, which says
// what the cache offers (nil for a bucket).
type dialFunc func(context.Context) (cache.Tier, *remote.Client, error)

// dialer returns how to open the tier url names.
func dialer(url string, opts Options) (dialFunc, error) {
	switch {
	case strings.HasPrefix(url, "grpc://"), strings.HasPrefix(url, "grpcs://"), strings.HasPrefix(url, "unix://"):
		return func(ctx context.Context) (cache.Tier, *remote.Client, error) {
			c, err := remote.Dial(ctx, url, opts.Remote)
			if err != nil {
				return nil, nil, err
			}
			return c, c, nil
		}, nil
	case strings.HasPrefix(url, "s3://"):
		if _, err := s3cache.ParseURL(url); err != nil {
			return nil, err
		}
		// Unless the bucket must be reachable at start, its check goes
		// out with the first requests rather than a round trip before.
		background := func(o *s3cache.Options) { o.CheckInBackground = !opts.Required }
		return func(ctx context.Context) (cache.Tier, *remote.Client, error) {
			c, err := s3cache.OpenURL(ctx, url, background)
			if err != nil {
				return nil, nil, err
			}
			return c, nil, nil
		}, nil
	}
	return nil, errkind.New(errkind.InvalidArgument, "remote %q: want grpc://, grpcs://, unix:// or s3://", url)
}

// Name is how reports, logs, traces and metrics name the tier url names:
// the URL without the user information a token may have been put in.
func Name(url string) string {
	u, err := neturl.Parse(url)
	if err != nil || u.User == nil {
		return url
	}
	u.User = nil
	return u.String()
}
