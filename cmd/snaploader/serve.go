package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"runtime/debug"
	"time"

	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/cache/regional"
	"github.com/snaploader/snaploader/cache/s3cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/gc"
	"github.com/snaploader/snaploader/remote"
	"github.com/snaploader/snaploader/server"
	"github.com/snaploader/snaploader/tierurl"
)

// serveOptions are what serve runs: its backends, bounds, listeners and
// collection.
type serveOptions struct {
	Logger    *slog.Logger
	APIKeys   map[string]server.APIKey
	Creds     []grpc.ServerOption
	Transport string // plaintext, TLS or mutual TLS
	Listen    string
	// CacheDir is the disk backend ("": the default), bounded by MaxBytes;
	// S3URL the bucket backend; Upstream another REAPI cache. Regional: a
	// disk cache in front of the bucket or the upstream.
	CacheDir         string
	MaxBytes         int64
	S3URL            string
	Upstream         string
	UpstreamAPIKey   string
	UpstreamCAFile   string
	UpstreamRetryFor time.Duration
	Regional         bool
	// Compression stores blobs compressed at rest; CompressionSet says it
	// was given (a bucket's own default holds otherwise).
	Compression, CompressionSet bool
	MetricsAddr, DebugAddr      string
	MaxBlobBytes                int64
	MaxScratchBytes             int64
	MaxUploadMemory             int64
	MaxReadMemory               int64
	UploadTTL, IdleTimeout      time.Duration
	// GCInterval collects the bucket this often (0: never), with
	// Retention and Grace; GCClockOffset is added to the collector's clock.
	GCInterval       time.Duration
	Retention, Grace time.Duration
	GCClockOffset    time.Duration
	AccessLog        bool
}

// runServe runs the REAPI cache server o describes until ctx is done; it
// logs with o.Logger.
func runServe(ctx context.Context, o serveOptions, _ streams) error {
	log := o.Logger
	var backend cache.Backend
	var inventory func(group string) gc.Store
	var where, tempDir string
	var collect func(context.Context, *server.Server) error
	var up cache.Tier // the source of truth behind a regional tier
	if o.S3URL != "" {
		c, err := s3cache.OpenURL(ctx, o.S3URL, func(so *s3cache.Options) {
			so.CreateBucket = true
			if o.CompressionSet {
				so.DisableCompression = !o.Compression
			}
		})
		if err != nil {
			return err
		}
		up, backend, where = c, c, c.Traits().Description
		inventory = func(group string) gc.Store { return gc.S3Group(c, group) }
		if o.GCInterval > 0 {
			gopts := gc.Options{Retention: o.Retention, Grace: o.Grace, Logger: log}
			if o.GCClockOffset != 0 {
				gopts.Now = func() time.Time { return time.Now().Add(o.GCClockOffset) }
			}
			collect = func(ctx context.Context, srv *server.Server) error {
				return srv.CollectEvery(ctx, gc.S3(c), o.GCInterval, gopts)
			}
		}
	}
	if o.Upstream != "" {
		t, err := tierurl.Open(ctx, []string{o.Upstream}, digest.BLAKE3, tierurl.Options{
			Remote: remote.Options{APIKey: o.UpstreamAPIKey, CAFile: o.UpstreamCAFile}, RetryFor: o.UpstreamRetryFor, Logger: log,
		})
		if err != nil {
			return fmt.Errorf("--upstream %s: %w", o.Upstream, err)
		}
		defer t.Close()
		up, where = t.Tier, t.Tier.Traits().Description
	}
	if o.S3URL == "" || o.Regional {
		dir := o.CacheDir
		if dir == "" {
			var err error
			if dir, err = defaultCacheDir(); err != nil {
				return err
			}
			dir += "-server"
		}
		c, err := localcache.New(dir, localcache.Options{MaxBytes: o.MaxBytes, Compression: o.Compression})
		if err != nil {
			return fmt.Errorf("opening cache %s: %w", dir, err)
		}
		defer c.Close()
		tempDir = c.TempDir()
		if o.Regional {
			// A bounded disk cache in front of the source of truth:
			// reads fill it, writes go through, version entries are
			// always read through.
			r := regional.New(c, up, regional.Options{StallTimeout: o.UpstreamRetryFor + 30*time.Second, Logger: log})
			defer r.Close()
			backend, where = r, "directory "+dir+" in front of "+where
			if o.S3URL == "" {
				inventory = nil // another cache lists its own contents
			}
		} else {
			backend, where = c, "directory "+dir
			inventory = func(group string) gc.Store { return gc.LocalCache(c, group) }
		}
	}
	if os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(o.MaxUploadMemory + o.MaxReadMemory + 128<<20)
	}
	srv, err := server.New(backend, server.Options{
		APIKeys: o.APIKeys, TempDir: tempDir, Logger: log,
		MaxBlobBytes: o.MaxBlobBytes, MaxScratchBytes: o.MaxScratchBytes, MaxUploadMemory: o.MaxUploadMemory, MaxReadMemory: o.MaxReadMemory,
		UploadTTL: o.UploadTTL, IdleTimeout: o.IdleTimeout, Retention: o.Retention, Inventory: inventory,
		AccessLog: o.AccessLog,
	})
	if err != nil {
		return err
	}
	// Every address is listened on before any is served, so that
	// once the gRPC address accepts, the others do too.
	var ml, dl net.Listener
	if o.MetricsAddr != "" {
		if ml, err = net.Listen("tcp", o.MetricsAddr); err != nil {
			return fmt.Errorf("listening on %s: %w", o.MetricsAddr, err)
		}
	}
	if o.DebugAddr != "" {
		if dl, err = net.Listen("tcp", o.DebugAddr); err != nil {
			if ml != nil {
				ml.Close()
			}
			return fmt.Errorf("listening on %s: %w", o.DebugAddr, err)
		}
	}
	lis, err := server.Listen(o.Listen)
	if err != nil {
		for _, l := range []net.Listener{ml, dl} {
			if l != nil {
				l.Close()
			}
		}
		return err
	}
	g, gctx := errgroup.WithContext(ctx)
	if ml != nil {
		g.Go(func() error { return srv.ServeMetrics(gctx, ml) })
		log.Info("serving metrics", "addr", ml.Addr().String())
	}
	if dl != nil {
		g.Go(func() error { return serveDebug(gctx, dl) })
	}
	g.Go(func() error { return srv.Serve(gctx, lis, o.Creds...) })
	if collect != nil {
		g.Go(func() error { return collect(gctx, srv) })
		log.Info("collecting the bucket periodically", "every", o.GCInterval, "retention", o.Retention, "grace", o.Grace)
	}
	log.Info("serving REAPI cache", "addr", lis.Addr().String(), "transport", o.Transport, "backend", where, "api_keys", len(o.APIKeys), "version", server.Build().Version, "revision", server.Build().Revision)
	return g.Wait()
}

// serveDebug serves net/http/pprof on lis until ctx is done.
func serveDebug(ctx context.Context, lis net.Listener) error {
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	hs := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		hs.Close()
	}()
	if err := hs.Serve(lis); err != nil && ctx.Err() == nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
