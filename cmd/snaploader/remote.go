package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/s3cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
	"github.com/snaploader/snaploader/remote"
)

// remoteFlags select the shared tier.
type remoteFlags struct {
	url        string
	apiKey     string
	bearer     string
	caFile     string
	readOnly   bool
	noCompress bool
	apiKeyHdr  string
	timeout    time.Duration
	maxBlob    int64
	// required: a remote that cannot be reached fails the command
	// (remoteDownError) instead of the command going on locally.
	required bool
}

func (f *remoteFlags) register(cmd *cobra.Command) {
	fl := cmd.Flags()
	fl.StringVar(&f.url, "remote", "", "shared tier: grpc://HOST:PORT, grpcs://HOST:PORT (REAPI cache) or s3://BUCKET[/PREFIX]?endpoint=HOST:PORT&secure=false (credentials from the standard AWS chain: environment, shared files with ?profile=, web identity, container or instance role)")
	fl.StringVar(&f.apiKey, "api-key", "", "API key sent to the REAPI remote (default $SNAPLOADER_API_KEY)")
	fl.StringVar(&f.apiKeyHdr, "api-key-header", "x-api-key", "metadata header carrying --api-key")
	fl.StringVar(&f.bearer, "bearer-token", "", "bearer token sent to the REAPI remote")
	fl.StringVar(&f.caFile, "ca-file", "", "PEM CA bundle trusted for grpcs:// instead of the system roots")
	fl.BoolVar(&f.readOnly, "remote-read-only", false, "load from the remote but never publish to it")
	fl.BoolVar(&f.noCompress, "no-compression", false, "do not use zstd compressed-blobs with the REAPI remote")
	fl.DurationVar(&f.timeout, "remote-timeout", 60*time.Second, "deadline of each call to the REAPI remote (retried calls get a fresh one)")
	sizeFlag(cmd, &f.maxBlob, "remote-max-blob-bytes", 0, "largest blob the remote takes, for caches that do not say so (bytes, or KiB/MiB/GiB/TiB; default: what its capabilities say); larger artifact files are stored as chunks")
	fl.BoolVar(&f.required, "remote-required", false, "fail (exit 4) when --remote cannot be reached, at the start or during the command, instead of going on with the local cache")
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
}

// open opens the tier named by --remote. A remote that cannot be reached
// (down, or too slow to answer within --remote-timeout) is not an error
// unless --remote-required: the command warns once and goes on with the
// local cache (the tier then fails every call at once), so a host can
// still start the VMs it holds when the shared cache is down. Every tier
// is wrapped in a breaker, so an outage later on costs one timeout, not
// one per call. An endpoint that answers but speaks another protocol (an
// HTTP port, TLS where the URL says plaintext or the reverse) is a
// configuration error, never an outage (probeProtocol).
func (f *remoteFlags) open(ctx context.Context, fn digest.Function, fnSet bool, log *slog.Logger) (*openedRemote, error) {
	r := &openedRemote{fn: fn, entryFn: digest.BLAKE3, writable: true}
	switch {
	case f.url == "":
		return r, nil
	case strings.HasPrefix(f.url, "grpc://"), strings.HasPrefix(f.url, "grpcs://"), strings.HasPrefix(f.url, "unix://"):
		opts := remote.Options{APIKey: f.apiKey, APIKeyHeader: f.apiKeyHdr, BearerToken: f.bearer, CAFile: f.caFile, DisableCompression: f.noCompress, CallTimeout: f.timeout}
		if fnSet {
			opts.DigestFunction = fn
		}
		c, err := dialREAPI(ctx, f.url, f.caFile, opts)
		if err != nil {
			if ctx.Err() == nil && cache.IsOutage(err) && !errkind.Is(err, errkind.InvalidArgument) {
				if f.required {
					return nil, &remoteDownError{url: f.url, err: err}
				}
				log.Warn("remote tier unavailable; continuing with the local cache", "remote", f.url, "err", cliText(err))
				r.tier = cache.Unreachable(f.url, err)
				return r, nil
			}
			return nil, err
		}
		r.tier = cache.Verifying(c)
		r.fn, r.entryFn, r.writable, r.closer = c.DigestFunction(), c.EntryFunction(), c.CanUpdateActionCache(), c
		r.fns, r.maxBlob = c.Functions(), c.MaxBlobBytes()
	case strings.HasPrefix(f.url, "s3://"):
		opts, err := s3cache.ParseURL(f.url)
		if err != nil {
			return nil, err
		}
		c, err := s3cache.New(ctx, opts)
		if err != nil {
			if ctx.Err() == nil && cache.IsOutage(err) {
				if f.required {
					return nil, &remoteDownError{url: f.url, err: err}
				}
				log.Warn("remote tier unavailable; continuing with the local cache", "remote", f.url, "err", cliText(err))
				r.tier = cache.Unreachable(f.url, err)
				return r, nil
			}
			return nil, fmt.Errorf("opening S3 remote %s: %w", f.url, err)
		}
		r.tier = cache.Verifying(c)
	default:
		return nil, usagef("--remote %q: want grpc://, grpcs://, unix:// or s3://", f.url)
	}
	if f.maxBlob > 0 {
		r.maxBlob = f.maxBlob
	}
	r.tier = cache.WithBreaker(r.tier, cache.BreakerOptions{Name: f.url, Logger: log})
	return r, nil
}

// dialREAPI connects to a REAPI remote (remote.Dial, which asks its
// capabilities). When that fails as an outage would, the endpoint is
// probed: one that answers another protocol is a usage error saying so.
func dialREAPI(ctx context.Context, url, caFile string, opts remote.Options) (*remote.Client, error) {
	c, err := remote.Dial(ctx, url, opts)
	if err == nil {
		return c, nil
	}
	if ctx.Err() == nil && cache.IsOutage(err) && !errors.Is(err, context.DeadlineExceeded) && status.Code(err) != codes.DeadlineExceeded {
		if perr := probeProtocol(ctx, url, caFile); perr != nil {
			return nil, perr
		}
	}
	if strings.Contains(err.Error(), url) {
		return nil, err
	}
	return nil, fmt.Errorf("connecting to remote %s: %w", url, err)
}
