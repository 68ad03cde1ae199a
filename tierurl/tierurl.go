// Package tierurl opens the shared tier a URL names, as every command of
// snaploader does: a REAPI cache (grpc://HOST:PORT, grpcs://HOST:PORT,
// unix:///PATH) or an S3 bucket (s3://BUCKET[/PREFIX]?...). The tier comes
// verified (a REAPI client and the S3 tier verify what they read) and
// behind a breaker, with what the cache said of itself: the digest
// function for new snapshots, its largest blob, whether this client may
// publish.
package tierurl

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"strings"

	"github.com/snaploader/snaploader/cache"
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
	// Down is why the tier could not be reached (it then fails every
	// call), nil when it was.
	Down error

	closer io.Closer
}

// Close releases the tier's connections.
func (o *Opened) Close() error {
	if o.closer == nil {
		return nil
	}
	return o.closer.Close()
}

// DownError is a tier that could not be reached when Options.Required.
type DownError struct {
	URL string
	Err error
}

func (e *DownError) Error() string {
	return fmt.Sprintf("remote %s is unavailable: %s", e.URL, errkind.Text(e.Err))
}

// Unwrap returns the cause.
func (e *DownError) Unwrap() error { return e.Err }

// Open opens the tier url names. fn is the digest function for new
// snapshots when the tier does not choose one. A tier that cannot be
// reached (down, or too slow to answer) is not an error unless
// opts.Required: Open logs a warning and returns a tier that fails every
// call at once (Opened.Down says why). An endpoint that answers another
// protocol, or a malformed URL, is InvalidArgument.
func Open(ctx context.Context, url string, fn digest.Function, opts Options) (*Opened, error) {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	o := &Opened{Function: fn, EntryFunction: digest.BLAKE3, Writable: true}
	down := func(err error) (*Opened, error) {
		if opts.Required {
			return nil, &DownError{URL: url, Err: err}
		}
		opts.Logger.Warn("remote tier unavailable; continuing with the local cache", "remote", url, "err", errkind.Text(err))
		o.Tier, o.Down = cache.Unreachable(url, err), err
		return o, nil
	}
	switch {
	case strings.HasPrefix(url, "grpc://"), strings.HasPrefix(url, "grpcs://"), strings.HasPrefix(url, "unix://"):
		c, err := remote.Dial(ctx, url, opts.Remote)
		if err != nil {
			if ctx.Err() == nil && cache.IsOutage(err) && !errkind.Is(err, errkind.InvalidArgument) {
				return down(err)
			}
			return nil, err
		}
		o.Tier, o.closer = cache.Verifying(c), c
		o.Function, o.EntryFunction, o.Writable = c.DigestFunction(), c.EntryFunction(), c.CanUpdateActionCache()
		o.Functions, o.MaxBlobBytes = c.Functions(), c.MaxBlobBytes()
	case strings.HasPrefix(url, "s3://"):
		c, err := s3cache.OpenURL(ctx, url)
		if err != nil {
			if ctx.Err() == nil && cache.IsOutage(err) {
				return down(err)
			}
			return nil, err
		}
		o.Tier = cache.Verifying(c)
	default:
		return nil, errkind.New(errkind.InvalidArgument, "remote %q: want grpc://, grpcs://, unix:// or s3://", url)
	}
	if opts.MaxBlobBytes > 0 {
		o.MaxBlobBytes = opts.MaxBlobBytes
	}
	o.Tier = cache.WithBreaker(o.Tier, cache.BreakerOptions{Name: url, Logger: opts.Logger})
	return o, nil
}
