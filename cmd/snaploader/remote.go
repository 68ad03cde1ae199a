package main

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/failover"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
	"github.com/snaploader/snaploader/remote"
	"github.com/snaploader/snaploader/tierurl"
)

// remoteFlags select the shared tier.
type remoteFlags struct {
	urls       []string // --remote, in order
	retryFor   time.Duration
	apiKey     string
	bearer     string
	caFile     string
	clientCert string
	clientKey  string
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
	fl.StringArrayVar(&f.urls, "remote", nil, "shared tier: grpc://HOST:PORT, grpcs://HOST:PORT, unix:///PATH (REAPI cache) or s3://BUCKET[/PREFIX]?endpoint=HOST:PORT&secure=false (credentials from the standard AWS chain: environment, shared files with ?profile=, web identity, container or instance role); repeat it for ordered remotes (a regional serve, then the bucket): reads try them in order, saves publish to the first writable one")
	fl.DurationVar(&f.retryFor, "remote-retry-for", failover.DefaultRetryFor, "how long a blob fetch of a restore or of a running VM retries a remote that fails (restarts, resets, stalls), across the remotes, before it fails")
	fl.StringVar(&f.apiKey, "api-key", "", "API key sent to the REAPI remote (default $SNAPLOADER_API_KEY)")
	fl.StringVar(&f.apiKeyHdr, "api-key-header", "x-api-key", "metadata header carrying --api-key")
	fl.StringVar(&f.bearer, "bearer-token", "", "bearer token sent to the REAPI remote")
	fl.StringVar(&f.caFile, "ca-file", "", "PEM CA bundle trusted for grpcs:// instead of the system roots")
	fl.StringVar(&f.clientCert, "tls-client-cert", "", "PEM certificate this host presents to a grpcs:// remote that requires one (mutual TLS; with --tls-client-key)")
	fl.StringVar(&f.clientKey, "tls-client-key", "", "PEM key of --tls-client-cert")
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
	// failover names the remotes that served reads (nil without remote).
	failover *failover.Tier
}

// open opens the tier named by --remote. A remote that cannot be reached
// (down, or too slow to answer within --remote-timeout) is not an error
// unless --remote-required: the command warns once and goes on with the
// local cache (the tier then fails every call at once), so a host can
// still start the VMs it holds when the shared cache is down. Every tier
// is wrapped in a breaker, so an outage later on costs one timeout, not
// one per call. An endpoint that answers but speaks another protocol (an
// HTTP port, TLS where the URL says plaintext or the reverse) is a
// configuration error, never an outage (remote.Probe).
func (f *remoteFlags) open(ctx context.Context, fn digest.Function, fnSet bool, log *slog.Logger) (*openedRemote, error) {
	r := &openedRemote{fn: fn, entryFn: digest.BLAKE3, writable: true}
	if len(f.urls) == 0 {
		return r, nil
	}
	if (f.clientCert == "") != (f.clientKey == "") {
		return nil, usagef("--tls-client-cert and --tls-client-key go together")
	}
	opts := remote.Options{APIKey: f.apiKey, APIKeyHeader: f.apiKeyHdr, BearerToken: f.bearer, CAFile: f.caFile, DisableCompression: f.noCompress, CallTimeout: f.timeout,
		ClientCertFile: f.clientCert, ClientKeyFile: f.clientKey}
	if fnSet {
		opts.DigestFunction = fn
	}
	o, err := tierurl.Open(ctx, f.urls, fn, tierurl.Options{Remote: opts, MaxBlobBytes: f.maxBlob, Required: f.required, Logger: log, RetryFor: f.retryFor})
	var de *tierurl.DownError
	switch {
	case errors.As(err, &de):
		return nil, &remoteDownError{url: de.URL, err: de.Err}
	case errkind.Is(err, errkind.InvalidArgument):
		return nil, flagNamed(err)
	case err != nil:
		return nil, err
	}
	r.tier, r.fn, r.entryFn, r.fns, r.maxBlob, r.writable, r.closer = o.Tier, o.Function, o.EntryFunction, o.Functions, o.MaxBlobBytes, o.Writable, o
	r.failover = o.Failover
	return r, nil
}

// flagNamed is err, a refusal of the remote URL, naming the --remote flag.
func flagNamed(err error) error {
	if t := cliText(err); strings.HasPrefix(t, "remote ") {
		return usagef("--%s", t)
	}
	return err
}

// primary is the first --remote ("" without one): the one listings, gc
// and reports name.
func (f *remoteFlags) primary() string {
	if len(f.urls) == 0 {
		return ""
	}
	return f.urls[0]
}
