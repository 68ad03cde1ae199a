package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/encrypted"
	"github.com/snaploader/snaploader/cache/failover"
	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/clientmetrics"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/snapshot"
)

// cacheOptions are the caches a command opens: the local cache and the
// remotes behind it.
type cacheOptions struct {
	// Dir is the local cache directory, MaxBytes its bound, and Compress
	// stores its new blobs compressed.
	Dir      string
	MaxBytes int64
	Compress bool
	// Group owns the local manifests.
	Group string
	// Function is the digest function of new snapshots; FunctionSet says
	// it was asked for (a REAPI remote's offer is not taken then).
	Function    digest.Function
	FunctionSet bool
	// Verbose logs debug messages.
	Verbose bool
	// KeyFile holds the group keys encrypting what the remote stores.
	KeyFile string
	// MetricsFile and MetricsAddr: where the host's metrics go.
	MetricsFile, MetricsAddr string
	Remote                   remoteOptions
}

// env is what a command needs: the caches and the loader over them.
type env struct {
	local  *localcache.Cache
	remote cache.Tier
	// remoteWritable is false when the remote refuses this client's
	// action-cache updates (a read-only key).
	remoteWritable bool
	metrics        *clientmetrics.Metrics
	metricsFile    string
	loader         *snapshot.Loader
	log            *slog.Logger
	closer         io.Closer
	// remoteURL is the primary remote, and remoteRequired --remote-required.
	remoteURL      string
	remoteRequired bool
	// failover is the remotes' tier, which names those that served reads
	// (nil without --remote).
	failover *failover.Tier
}

// openEnv opens the caches o names and the loader over them; the caller
// closes the env.
func openEnv(ctx context.Context, o cacheOptions) (*env, error) {
	level := slog.LevelWarn
	if o.Verbose {
		level = slog.LevelDebug
	}
	log := newLogger(os.Stderr, level)
	r, err := openRemote(ctx, o.Remote, o.Function, o.FunctionSet, log)
	if err != nil {
		return nil, err
	}
	local, err := localcache.New(o.Dir, localcache.Options{MaxBytes: o.MaxBytes, Compression: o.Compress})
	if err != nil {
		if r.closer != nil {
			r.closer.Close()
		}
		return nil, wrapOnce(err, "opening local cache %s", o.Dir)
	}
	if o.KeyFile != "" {
		if r.tier, err = encryptTier(r.tier, o.KeyFile, local.TempDir(), log); err != nil {
			local.Close()
			if r.closer != nil {
				r.closer.Close()
			}
			return nil, err
		}
	}
	e := &env{local: local, remote: r.tier, remoteWritable: r.writable, log: log, closer: r.closer, metrics: clientmetrics.New(), metricsFile: o.MetricsFile,
		remoteURL: o.Remote.primary(), remoteRequired: o.Remote.Required, failover: r.failover}
	if r.failover != nil {
		e.metrics.WatchRemotes(r.failover.Stats)
	}
	if o.MetricsAddr != "" {
		addr, err := e.metrics.Serve(ctx, o.MetricsAddr)
		if err != nil {
			e.Close()
			return nil, err
		}
		log.Info("serving metrics", "url", "http://"+addr+"/metrics")
	}
	e.loader, err = snapshot.New(local, r.tier, snapshot.Options{Group: o.Group, Function: r.fn, Logger: log, RemoteReadOnly: o.Remote.ReadOnly, RemoteEntryFunction: r.entryFn, RemoteFunctions: r.fns, RemoteMaxBlobBytes: r.maxBlob})
	if err != nil {
		e.Close()
		return nil, err
	}
	return e, nil
}

// remotesServed names the remotes that delivered blob bytes so far, in
// their order; [] when none did.
func (e *env) remotesServed() []string {
	out := []string{}
	if e.failover == nil {
		return out
	}
	for _, s := range e.failover.Stats() {
		if s.ReadBytes > 0 {
			out = append(out, s.Name)
		}
	}
	return out
}

// remoteCheck fails with a remoteDownError when the remote is required
// (--remote-required) and failed during the command, which then went on
// with the local cache. Commands call it before printing their result;
// Close records it for main otherwise.
func (e *env) remoteCheck() error {
	if !e.remoteRequired || e.loader == nil {
		return nil
	}
	if err := e.loader.RemoteDown(); err != nil {
		return &remoteDownError{url: e.remoteURL, err: err}
	}
	return nil
}

func (e *env) Close() error {
	if e.loader != nil && e.loader.RemoteDown() != nil {
		e.metrics.RemoteUnavailable()
	}
	if err := e.remoteCheck(); err != nil && runState.remoteDown == nil {
		runState.remoteDown = err
	}
	if e.metricsFile != "" {
		if err := e.metrics.WriteTextfile(e.metricsFile); err != nil {
			e.log.Warn("writing metrics", "err", err)
		}
	}
	if e.closer != nil {
		e.closer.Close()
	}
	return e.local.Close()
}

// encryptTier wraps the remote tier in client-side encryption with the
// group keys in keyFile; the local cache stays in the clear.
func encryptTier(remote cache.Tier, keyFile, tempDir string, log *slog.Logger) (cache.Tier, error) {
	keys, err := encrypted.ReadKeyFile(keyFile)
	if err != nil {
		return nil, err
	}
	if remote == nil {
		log.Warn("--encryption-key-file has no effect without --remote: the local cache stays in the clear")
		return nil, nil
	}
	c, err := encrypted.New(remote, encrypted.Options{Keys: keys, TempDir: tempDir})
	if err != nil {
		return nil, err
	}
	return cache.Verifying(c), nil
}

// wrapOnce prefixes err with what was being done, unless its message
// already starts with it (a callee that said so itself).
func wrapOnce(err error, format string, args ...any) error {
	what := fmt.Sprintf(format, args...)
	if strings.HasPrefix(err.Error(), what+": ") {
		return err
	}
	return fmt.Errorf("%s: %w", what, err)
}
