package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"runtime/debug"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/failover"
	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/cache/regional"
	"github.com/snaploader/snaploader/cache/s3cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/gc"
	"github.com/snaploader/snaploader/remote"
	"github.com/snaploader/snaploader/server"
	"github.com/snaploader/snaploader/tierurl"
)

func newServeCmd() *cobra.Command {
	var (
		listen      string
		cacheDir    string
		maxBytes    int64
		s3URL       string
		upstream    string
		upAPIKey    string
		upCAFile    string
		upRetryFor  time.Duration
		apiKeys     []string
		metricsAddr string
		debugAddr   string
		maxBlob     int64
		maxScratch  int64
		maxUpMem    int64
		maxReadMem  int64
		uploadTTL   time.Duration
		idleTimeout time.Duration
		compression bool
		gcInterval  time.Duration
		retention   string
		grace       string
		gcSkew      time.Duration
		ops         serveOps
	)
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run an REAPI cache server (CAS, ActionCache, ByteStream) over a local disk cache or an S3 bucket",
		Long: `serve runs a Remote Execution API cache so a fleet can share snapshots with nothing else installed.
Backed by --cache-dir (a byte-bounded local cache), by --s3 (stateless: several servers over one
bucket serve the same data), or, as a regional tier of a fleet, by --cache-dir in front of --s3 or of
--upstream (another REAPI cache): a bounded disk LRU that reads fill, writes go through to the source
of truth, version entries are always read from it (an invalidation reaches every host at once) and
manifests are kept at most 5 seconds. With --api-key, every request must carry a known key (x-api-key header
or "authorization: Bearer KEY"); each key maps to a group, whose action-cache entries no other group
sees, and may be read-only.

Resource bounds (all the server's own, never a client's claim):
  --max-bytes              disk: stored blobs and entries plus the uploads in flight (their claimed
                           sizes are reserved before data is taken, evicting LRU entries; when the
                           reservations alone would exceed it, an upload is RESOURCE_EXHAUSTED)
  --max-blob-bytes         the largest blob a write may claim, refused at its first message
                           (default: a quarter of --max-bytes; with --s3, 2 GiB)
  --max-scratch-bytes      with --s3: disk of the uploads in flight in the scratch directory
  --max-upload-memory      memory of all uploads in flight together (receive windows, messages,
                           zstd decoders with at most 8 MiB windows); an upload waits up to
                           --idle-timeout for it, then is RESOURCE_EXHAUSTED
  --max-read-memory        memory of all reads in flight together (3 MiB each: copy buffer, message,
                           its encoding); a read waits up to --idle-timeout for it, then is
                           RESOURCE_EXHAUSTED. The Go runtime's soft memory limit is set to the two
                           memory budgets plus 128 MiB unless GOMEMLIMIT is set.
  --idle-timeout           a write stream that sends nothing this long is aborted and freed
  --upload-ttl             an interrupted upload is kept this long after its last message for the
                           client to resume, then deleted (a stream failing for any reason a
                           resumption cannot help deletes it at once)
Every blob served is hashed as it streams; a corrupt one fails the read naming its digest and is
dropped, so FindMissingBlobs reports it missing and the next upload repairs it.

Compression at rest (--compression, default true): each blob of 8 KiB or more is stored
zstd-compressed when that saves at least a sixteenth of its space, raw otherwise; a zstd upload's
frames are stored as they came (decoded only to verify them). compressed-blobs reads of a blob
stored compressed are answered with the stored frames, checked against the hash recorded when
they were verified, without decoding; plain reads decode. Blobs stored raw (by older versions, or
with --compression=false) are read as before. With --s3, --compression=false stores new objects raw.

Garbage collection (--s3 only; --gc-interval, off by default): every interval (the first one after
one interval) the server collects the bucket as snaploader gc does, with --retention and --grace;
runs never overlap, each report is logged and the last few are on the status page. The disk
backend needs none: it evicts least recently used entries under --max-bytes.

With --metrics-addr, http://ADDR/status is a status page (snapshots by group, instance, key and ref
with sizes, ages, last reads and states; hit rates; disk use against the bound, evictions and the
memory budgets in use; recent collections; version and uptime), as JSON with ?format=json;
http://ADDR/healthz answers while the process is up and http://ADDR/readyz while the backend
answers and the server is not shutting down (the gRPC health service says the same).

Deployment: --listen unix:///PATH serves on a Unix socket; --tls-cert/--tls-key serve TLS
(--tls-client-ca requires client certificates); API keys may come from --api-key-file (mode 0600)
or $SNAPLOADER_API_KEYS so they are not on the command line; --log-format json and --access-log
(one line per RPC) for log collectors. Every flag may be set in a YAML --config file or a
SNAPLOADER_<FLAG> environment variable (--max-bytes: SNAPLOADER_MAX_BYTES); the command line wins,
then the environment, then the file.`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			log, err := ops.logger()
			if err != nil {
				return err
			}
			keys, err := ops.apiKeys(apiKeys)
			if err != nil {
				return err
			}
			creds, transport, err := ops.grpcOptions()
			if err != nil {
				return err
			}
			var backend cache.Backend
			var inventory func(group string) gc.Store
			var where, tempDir string
			var collect func(context.Context, *server.Server) error
			if gcInterval < 0 {
				return usagef("--gc-interval %s: want a positive duration, or 0 for no collection", gcInterval)
			}
			for _, b := range []struct {
				flag string
				bad  bool
			}{
				{"max-bytes", maxBytes <= 0},
				{"max-blob-bytes", maxBlob < 0 || (cmd.Flags().Changed("max-blob-bytes") && maxBlob == 0)},
				{"max-scratch-bytes", maxScratch <= 0},
				{"max-upload-memory", maxUpMem <= 0},
				{"max-read-memory", maxReadMem <= 0},
				{"upload-ttl", uploadTTL <= 0},
				{"idle-timeout", idleTimeout <= 0},
			} {
				if b.bad {
					return usagef("--%s %s: want a positive value", b.flag, cmd.Flags().Lookup(b.flag).Value)
				}
			}
			ret, err := parseDuration(retention)
			if err != nil || ret <= 0 {
				return usagef("--retention %q: want a positive duration such as 7d or 36h", retention)
			}
			gr, err := parseDuration(grace)
			if err != nil || gr <= 0 {
				return usagef("--grace %q: want a positive duration such as 1h", grace)
			}
			regionalTier := cmd.Flags().Changed("cache-dir") && (s3URL != "" || upstream != "")
			switch {
			case s3URL != "" && upstream != "":
				return usagef("give either --s3 or --upstream, not both: the upstream is the one source of truth")
			case upstream != "" && !regionalTier:
				return usagef("--upstream needs --cache-dir: the disk cache this serve keeps in front of it")
			case s3URL == "" && gcInterval > 0:
				return usagef("--gc-interval needs --s3: the disk backend (--cache-dir) collects nothing, it evicts least recently used entries to stay under --max-bytes")
			}
			var up cache.Tier // the source of truth behind a regional tier
			if s3URL != "" {
				c, err := s3cache.OpenURL(ctx, s3URL, func(o *s3cache.Options) {
					o.CreateBucket = true
					if cmd.Flags().Changed("compression") {
						o.DisableCompression = !compression
					}
				})
				if err != nil {
					return err
				}
				up, backend, where = c, c, c.Traits().Description
				inventory = func(group string) gc.Store { return gc.S3Group(c, group) }
				if gcInterval > 0 {
					gopts := gc.Options{Retention: ret, Grace: gr, Logger: log}
					if gcSkew != 0 {
						gopts.Now = func() time.Time { return time.Now().Add(gcSkew) }
					}
					collect = func(ctx context.Context, srv *server.Server) error {
						return srv.CollectEvery(ctx, gc.S3(c), gcInterval, gopts)
					}
				}
			}
			if upstream != "" {
				o, err := tierurl.Open(ctx, []string{upstream}, digest.BLAKE3, tierurl.Options{
					Remote: remote.Options{APIKey: upAPIKey, CAFile: upCAFile}, RetryFor: upRetryFor, Logger: log,
				})
				if err != nil {
					return fmt.Errorf("--upstream %s: %w", upstream, err)
				}
				defer o.Close()
				up, where = o.Tier, o.Tier.Traits().Description
			}
			if s3URL == "" || regionalTier {
				dir := cacheDir
				if dir == "" {
					var err error
					if dir, err = defaultCacheDir(); err != nil {
						return err
					}
					dir += "-server"
				}
				c, err := localcache.New(dir, localcache.Options{MaxBytes: maxBytes, Compression: compression})
				if err != nil {
					return fmt.Errorf("opening cache %s: %w", dir, err)
				}
				defer c.Close()
				tempDir = c.TempDir()
				if regionalTier {
					// A bounded disk cache in front of the source of truth:
					// reads fill it, writes go through, version entries are
					// always read through.
					r := regional.New(c, up, regional.Options{StallTimeout: upRetryFor + 30*time.Second, Logger: log})
					defer r.Close()
					backend, where = r, "directory "+dir+" in front of "+where
					if s3URL == "" {
						inventory = nil // another cache lists its own contents
					}
				} else {
					backend, where = c, "directory "+dir
					inventory = func(group string) gc.Store { return gc.LocalCache(c, group) }
				}
			}
			if os.Getenv("GOMEMLIMIT") == "" {
				debug.SetMemoryLimit(maxUpMem + maxReadMem + 128<<20)
			}
			srv, err := server.New(backend, server.Options{
				APIKeys: keys, TempDir: tempDir, Logger: log,
				MaxBlobBytes: maxBlob, MaxScratchBytes: maxScratch, MaxUploadMemory: maxUpMem, MaxReadMemory: maxReadMem,
				UploadTTL: uploadTTL, IdleTimeout: idleTimeout, Retention: ret, Inventory: inventory,
				AccessLog: ops.accessLog,
			})
			if err != nil {
				return err
			}
			// Every address is listened on before any is served, so that
			// once the gRPC address accepts, the others do too.
			var ml, dl net.Listener
			if metricsAddr != "" {
				if ml, err = net.Listen("tcp", metricsAddr); err != nil {
					return fmt.Errorf("listening on %s: %w", metricsAddr, err)
				}
			}
			if debugAddr != "" {
				if dl, err = net.Listen("tcp", debugAddr); err != nil {
					if ml != nil {
						ml.Close()
					}
					return fmt.Errorf("listening on %s: %w", debugAddr, err)
				}
			}
			lis, err := server.Listen(listen)
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
			g.Go(func() error { return srv.Serve(gctx, lis, creds...) })
			if collect != nil {
				g.Go(func() error { return collect(gctx, srv) })
				log.Info("collecting the bucket periodically", "every", gcInterval, "retention", ret, "grace", gr)
			}
			log.Info("serving REAPI cache", "addr", lis.Addr().String(), "transport", transport, "backend", where, "api_keys", len(keys), "version", server.Build().Version, "revision", server.Build().Revision)
			return g.Wait()
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&listen, "listen", "127.0.0.1:8980", "gRPC listen address: HOST:PORT, or unix:///PATH for a Unix socket (a stale socket there is replaced)")
	fl.StringVar(&cacheDir, "cache-dir", "", "local disk backend directory (default: the user cache directory's snaploader-server/)")
	sizeFlag(cmd, &maxBytes, "max-bytes", DefaultCacheBytes, "bound of the local disk backend (bytes, or KiB/MiB/GiB/TiB)")
	fl.StringVar(&upstream, "upstream", "", "with --cache-dir: serve a bounded disk cache in front of another REAPI cache (grpc://HOST:PORT, grpcs://HOST:PORT, unix:///PATH), the source of truth: reads fill the disk, writes go through")
	fl.StringVar(&upAPIKey, "upstream-api-key", "", "API key this serve sends to --upstream")
	fl.StringVar(&upCAFile, "upstream-ca-file", "", "PEM CA bundle trusted for a grpcs:// --upstream")
	fl.DurationVar(&upRetryFor, "upstream-retry-for", failover.DefaultRetryFor, "how long a read from the upstream rides out its restarts, resets and stalls before it fails")
	fl.StringVar(&s3URL, "s3", "", "S3 backend: s3://BUCKET[/PREFIX]?endpoint=HOST:PORT&secure=false (credentials from the standard AWS chain: environment, shared files with ?profile=, web identity, container or instance role)")
	fl.StringArrayVar(&apiKeys, "api-key", nil, "KEY=GROUP[:ro] (repeatable); when given, requests without a known key are rejected")
	fl.StringVar(&metricsAddr, "metrics-addr", "", "serve Prometheus metrics at http://ADDR/metrics")
	fl.StringVar(&debugAddr, "debug-addr", "", "serve Go profiles at http://ADDR/debug/pprof/ (keep it on loopback)")
	sizeFlag(cmd, &maxBlob, "max-blob-bytes", 0, "largest blob a write may claim (bytes, or KiB/MiB/GiB; default: a quarter of --max-bytes; with --s3, 2 GiB)")
	sizeFlag(cmd, &maxScratch, "max-scratch-bytes", server.DefaultMaxScratchBytes, "with --s3: disk space of uploads in flight (bytes, or KiB/MiB/GiB/TiB)")
	sizeFlag(cmd, &maxUpMem, "max-upload-memory", server.DefaultMaxUploadMemory, "memory of all uploads in flight together (bytes, or KiB/MiB/GiB)")
	sizeFlag(cmd, &maxReadMem, "max-read-memory", server.DefaultMaxReadMemory, "memory of all reads in flight together (bytes, or KiB/MiB/GiB)")
	fl.DurationVar(&uploadTTL, "upload-ttl", server.DefaultUploadTTL, "how long an interrupted upload is kept for resumption after its last message")
	fl.DurationVar(&idleTimeout, "idle-timeout", server.DefaultIdleTimeout, "abort a write stream that sends nothing for this long")
	fl.DurationVar(&gcInterval, "gc-interval", 0, "with --s3: collect the bucket's garbage (as snaploader gc) this often; 0: never")
	fl.StringVar(&retention, "retention", "7d", "how long a snapshot that is no longer the newest under its key is kept by --gc-interval collections, and judged live on the status page")
	fl.StringVar(&grace, "grace", "1h", "with --gc-interval: unreferenced blobs younger than this are kept; longer than any save")
	fl.DurationVar(&gcSkew, "gc-clock-offset", 0, "added to the collector's clock (tests)")
	_ = fl.MarkHidden("gc-clock-offset")
	fl.BoolVar(&compression, "compression", true, "store blobs zstd-compressed at rest when that shrinks them, and answer compressed-blobs reads with the stored frames")
	ops.register(cmd)
	return cmd
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
