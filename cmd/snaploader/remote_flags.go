package main

import (
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/snaploader/snaploader/cache/failover"
)

// remoteFlags select the shared tier.
type remoteFlags struct {
	urls     []string // --remote, in order
	retryFor time.Duration
	apiKey   string
	bearer   string
	// tls are the client's certificate and key (mutual TLS) and the CA
	// bundle trusted for grpcs://.
	tls        tlsFiles
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
	f.tls.register(fl,
		tlsFlag{"tls-client-cert", "PEM certificate this host presents to a grpcs:// remote that requires one (mutual TLS; with --tls-client-key)"},
		tlsFlag{"tls-client-key", "PEM key of --tls-client-cert"},
		tlsFlag{"ca-file", "PEM CA bundle trusted for grpcs:// instead of the system roots"})
	fl.BoolVar(&f.readOnly, "remote-read-only", false, "load from the remote but never publish to it")
	fl.BoolVar(&f.noCompress, "no-compression", false, "do not use zstd compressed-blobs with the REAPI remote")
	fl.DurationVar(&f.timeout, "remote-timeout", 60*time.Second, "deadline of each call to the REAPI remote (retried calls get a fresh one)")
	sizeFlag(cmd, &f.maxBlob, "remote-max-blob-bytes", 0, "largest blob the remote takes, for caches that do not say so (bytes, or KiB/MiB/GiB/TiB; default: what its capabilities say); larger artifact files are stored as chunks")
	fl.BoolVar(&f.required, "remote-required", false, "fail (exit 4) when --remote cannot be reached, at the start or during the command, instead of going on with the local cache")
}

// options are the remotes the flags name, checked: the client
// certificate and key go together when there is a remote.
func (f *remoteFlags) options() (remoteOptions, error) {
	o := f.values()
	if f.timeout <= 0 {
		return o, usagef("--remote-timeout %s: want a positive duration", f.timeout)
	}
	if f.maxBlob < 0 {
		return o, usagef("--remote-max-blob-bytes %d: want a positive number of bytes", f.maxBlob)
	}
	if len(f.urls) > 0 && (f.tls.cert == "") != (f.tls.key == "") {
		return o, usagef("--tls-client-cert and --tls-client-key go together")
	}
	return o, nil
}

// values are the flags as they are, unchecked (ls --remote dials a
// server with them), with the API key taken from $SNAPLOADER_API_KEY when
// --api-key is not given.
func (f *remoteFlags) values() remoteOptions {
	o := remoteOptions{
		URLs: f.urls, RetryFor: f.retryFor, APIKey: f.apiKey, APIKeyHeader: f.apiKeyHdr, BearerToken: f.bearer, CAFile: f.tls.ca,
		ClientCert: f.tls.cert, ClientKey: f.tls.key, ReadOnly: f.readOnly, NoCompression: f.noCompress, Timeout: f.timeout,
		MaxBlobBytes: f.maxBlob, Required: f.required,
	}
	if o.APIKey == "" {
		o.APIKey = os.Getenv("SNAPLOADER_API_KEY")
	}
	return o
}
