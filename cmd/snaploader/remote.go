package main

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"strings"
	"time"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/failover"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
	"github.com/snaploader/snaploader/remote"
	"github.com/snaploader/snaploader/tierurl"
)

// remoteOptions are the shared tiers a command uses (--remote and the
// flags that go with it).
type remoteOptions struct {
	URLs                    []string // in order; none: no remote
	RetryFor                time.Duration
	APIKey, APIKeyHeader    string
	BearerToken, CAFile     string
	ClientCert, ClientKey   string
	ReadOnly, NoCompression bool
	Timeout                 time.Duration
	MaxBlobBytes            int64
	// Required: a remote that cannot be reached fails the command
	// (remoteDownError) instead of the command going on locally.
	Required bool
}

// primary is the first remote ("" without one): the one listings, gc and
// reports name.
func (o remoteOptions) primary() string {
	if len(o.URLs) == 0 {
		return ""
	}
	return o.URLs[0]
}

// openedRemote is the tier named by --remote, as a command uses it.
type openedRemote struct {
	tier cache.Tier // nil when there is none
	// fn is the digest function for new snapshots.
	fn digest.Function
	// entryFn is the digest function its version entries live under.
	entryFn digest.Function
	// fns are the digest functions it accepts (nil: any).
	fns []digest.Function
	// maxBlob is the largest blob it accepts (0: no stated limit).
	maxBlob int64
	// writable is false when the remote said this client may not update
	// its action cache (a read-only key).
	writable bool
	closer   io.Closer
	// failover names the remotes that served reads (nil without remote).
	failover *failover.Tier
}

// openRemote opens the tiers o names. A remote that cannot be reached
// (down, or too slow to answer within the call timeout) is not an error
// unless o.Required: the command warns once and goes on with the local
// cache (the tier then fails every call at once), so a host can still
// start the VMs it holds when the shared cache is down. Every tier is
// wrapped in a breaker, so an outage later on costs one timeout, not one
// per call. An endpoint that answers but speaks another protocol (an HTTP
// port, TLS where the URL says plaintext or the reverse) is a
// configuration error, never an outage (remote.Probe).
func openRemote(ctx context.Context, o remoteOptions, fn digest.Function, fnSet bool, log *slog.Logger) (*openedRemote, error) {
	r := &openedRemote{fn: fn, entryFn: digest.BLAKE3, writable: true}
	if len(o.URLs) == 0 {
		return r, nil
	}
	opts := remote.Options{APIKey: o.APIKey, APIKeyHeader: o.APIKeyHeader, BearerToken: o.BearerToken, CAFile: o.CAFile, DisableCompression: o.NoCompression, CallTimeout: o.Timeout,
		ClientCertFile: o.ClientCert, ClientKeyFile: o.ClientKey}
	if fnSet {
		opts.DigestFunction = fn
	}
	t, err := tierurl.Open(ctx, o.URLs, fn, tierurl.Options{Remote: opts, MaxBlobBytes: o.MaxBlobBytes, Required: o.Required, Logger: log, RetryFor: o.RetryFor})
	var de *tierurl.DownError
	switch {
	case errors.As(err, &de):
		return nil, &remoteDownError{url: de.URL, err: de.Err}
	case errkind.Is(err, errkind.InvalidArgument):
		return nil, flagNamed(err)
	case err != nil:
		return nil, err
	}
	r.tier, r.fn, r.entryFn, r.fns, r.maxBlob, r.writable, r.closer = t.Tier, t.Function, t.EntryFunction, t.Functions, t.MaxBlobBytes, t.Writable, t
	r.failover = t.Failover
	return r, nil
}

// flagNamed is err, a refusal of the remote URL, naming the --remote flag.
func flagNamed(err error) error {
	if t := cliText(err); strings.HasPrefix(t, "remote ") {
		return usagef("--%s", t)
	}
	return err
}
