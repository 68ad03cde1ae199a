package main

import (
	"context"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/s3cache"
	"github.com/snaploader/snaploader/digest"
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
}

func (f *remoteFlags) register(cmd *cobra.Command) {
	fl := cmd.Flags()
	fl.StringVar(&f.url, "remote", "", "shared tier: grpc://HOST:PORT, grpcs://HOST:PORT (REAPI cache) or s3://BUCKET[/PREFIX]?endpoint=HOST:PORT&secure=false (credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")
	fl.StringVar(&f.apiKey, "api-key", "", "API key sent to the REAPI remote (default $SNAPLOADER_API_KEY)")
	fl.StringVar(&f.apiKeyHdr, "api-key-header", "x-api-key", "metadata header carrying --api-key")
	fl.StringVar(&f.bearer, "bearer-token", "", "bearer token sent to the REAPI remote")
	fl.StringVar(&f.caFile, "ca-file", "", "PEM CA bundle trusted for grpcs:// instead of the system roots")
	fl.BoolVar(&f.readOnly, "remote-read-only", false, "load from the remote but never publish to it")
	fl.BoolVar(&f.noCompress, "no-compression", false, "do not use zstd compressed-blobs with the REAPI remote")
	fl.DurationVar(&f.timeout, "remote-timeout", 60*time.Second, "deadline of each call to the REAPI remote (retried calls get a fresh one)")
}

// openRemote opens the tier named by --remote; nil when none.
func (f *remoteFlags) open(ctx context.Context, fn digest.Function, fnSet bool) (cache.Cache, digest.Function, io.Closer, error) {
	switch {
	case f.url == "":
		return nil, fn, nil, nil
	case strings.HasPrefix(f.url, "grpc://"), strings.HasPrefix(f.url, "grpcs://"), strings.HasPrefix(f.url, "unix://"):
		opts := remote.Options{APIKey: f.apiKey, APIKeyHeader: f.apiKeyHdr, BearerToken: f.bearer, CAFile: f.caFile, DisableCompression: f.noCompress, CallTimeout: f.timeout}
		if fnSet {
			opts.DigestFunction = fn
		}
		c, err := remote.Dial(ctx, f.url, opts)
		if err != nil {
			return nil, fn, nil, fmt.Errorf("connecting to remote %s: %w", f.url, err)
		}
		return cache.Verifying(c), c.DigestFunction(), c, nil
	case strings.HasPrefix(f.url, "s3://"):
		opts, err := s3cache.ParseURL(f.url)
		if err != nil {
			return nil, fn, nil, err
		}
		c, err := s3cache.New(ctx, opts)
		if err != nil {
			return nil, fn, nil, fmt.Errorf("opening S3 remote %s: %w", f.url, err)
		}
		return cache.Verifying(c), fn, nil, nil
	}
	return nil, fn, nil, fmt.Errorf("--remote %q: want grpc://, grpcs://, unix:// or s3://", f.url)
}
