package main

import (
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/snaploader/snaploader/cache/failover"
	"github.com/snaploader/snaploader/server"
)

// serveFlags are serve's flags.
type serveFlags struct {
	// flags are the command's, to tell the flags given from defaults.
	flags       *pflag.FlagSet
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
}

func newServeCmd() *cobra.Command {
	var f serveFlags
	return f.command()
}

// command defines the command, its flags read into f.
func (f *serveFlags) command() *cobra.Command {
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
		RunE: runE(f.options, runServe),
	}
	f.flags = cmd.Flags()
	fl := cmd.Flags()
	fl.StringVar(&f.listen, "listen", "127.0.0.1:8980", "gRPC listen address: HOST:PORT, or unix:///PATH for a Unix socket (a stale socket there is replaced)")
	fl.StringVar(&f.cacheDir, "cache-dir", "", "local disk backend directory (default: the user cache directory's snaploader-server/)")
	sizeFlag(cmd, &f.maxBytes, "max-bytes", DefaultCacheBytes, "bound of the local disk backend (bytes, or KiB/MiB/GiB/TiB)")
	fl.StringVar(&f.upstream, "upstream", "", "with --cache-dir: serve a bounded disk cache in front of another REAPI cache (grpc://HOST:PORT, grpcs://HOST:PORT, unix:///PATH), the source of truth: reads fill the disk, writes go through")
	fl.StringVar(&f.upAPIKey, "upstream-api-key", "", "API key this serve sends to --upstream")
	fl.StringVar(&f.upCAFile, "upstream-ca-file", "", "PEM CA bundle trusted for a grpcs:// --upstream")
	fl.DurationVar(&f.upRetryFor, "upstream-retry-for", failover.DefaultRetryFor, "how long a read from the upstream rides out its restarts, resets and stalls before it fails")
	fl.StringVar(&f.s3URL, "s3", "", "S3 backend: s3://BUCKET[/PREFIX]?endpoint=HOST:PORT&secure=false (credentials from the standard AWS chain: environment, shared files with ?profile=, web identity, container or instance role)")
	fl.StringArrayVar(&f.apiKeys, "api-key", nil, "KEY=GROUP[:ro] (repeatable); when given, requests without a known key are rejected")
	fl.StringVar(&f.metricsAddr, "metrics-addr", "", "serve Prometheus metrics at http://ADDR/metrics")
	fl.StringVar(&f.debugAddr, "debug-addr", "", "serve Go profiles at http://ADDR/debug/pprof/ (keep it on loopback)")
	sizeFlag(cmd, &f.maxBlob, "max-blob-bytes", 0, "largest blob a write may claim (bytes, or KiB/MiB/GiB; default: a quarter of --max-bytes; with --s3, 2 GiB)")
	sizeFlag(cmd, &f.maxScratch, "max-scratch-bytes", server.DefaultMaxScratchBytes, "with --s3: disk space of uploads in flight (bytes, or KiB/MiB/GiB/TiB)")
	sizeFlag(cmd, &f.maxUpMem, "max-upload-memory", server.DefaultMaxUploadMemory, "memory of all uploads in flight together (bytes, or KiB/MiB/GiB)")
	sizeFlag(cmd, &f.maxReadMem, "max-read-memory", server.DefaultMaxReadMemory, "memory of all reads in flight together (bytes, or KiB/MiB/GiB)")
	fl.DurationVar(&f.uploadTTL, "upload-ttl", server.DefaultUploadTTL, "how long an interrupted upload is kept for resumption after its last message")
	fl.DurationVar(&f.idleTimeout, "idle-timeout", server.DefaultIdleTimeout, "abort a write stream that sends nothing for this long")
	fl.DurationVar(&f.gcInterval, "gc-interval", 0, "with --s3: collect the bucket's garbage (as snaploader gc) this often; 0: never")
	fl.StringVar(&f.retention, "retention", "7d", "how long a snapshot that is no longer the newest under its key is kept by --gc-interval collections, and judged live on the status page")
	fl.StringVar(&f.grace, "grace", "1h", "with --gc-interval: unreferenced blobs younger than this are kept; longer than any save")
	fl.DurationVar(&f.gcSkew, "gc-clock-offset", 0, "added to the collector's clock (tests)")
	_ = fl.MarkHidden("gc-clock-offset")
	fl.BoolVar(&f.compression, "compression", true, "store blobs zstd-compressed at rest when that shrinks them, and answer compressed-blobs reads with the stored frames")
	f.ops.register(cmd)
	return cmd
}

// options checks serve's flags, after the environment and --config filled
// in those not given: the logger, API keys and TLS are set up, bounds and
// durations checked, and the backends' combination refused unless it is
// one serve runs. Nothing is opened or listened on.
func (f *serveFlags) options() (serveOptions, error) {
	var o serveOptions
	var err error
	if o.Logger, err = f.ops.logger(); err != nil {
		return o, err
	}
	if o.APIKeys, err = f.ops.apiKeys(f.apiKeys); err != nil {
		return o, err
	}
	if o.Creds, o.Transport, err = f.ops.grpcOptions(); err != nil {
		return o, err
	}
	if f.gcInterval < 0 {
		return o, usagef("--gc-interval %s: want a positive duration, or 0 for no collection", f.gcInterval)
	}
	for _, b := range []struct {
		flag string
		bad  bool
	}{
		{"max-bytes", f.maxBytes <= 0},
		{"max-blob-bytes", f.maxBlob < 0 || (f.flags.Changed("max-blob-bytes") && f.maxBlob == 0)},
		{"max-scratch-bytes", f.maxScratch <= 0},
		{"max-upload-memory", f.maxUpMem <= 0},
		{"max-read-memory", f.maxReadMem <= 0},
		{"upload-ttl", f.uploadTTL <= 0},
		{"idle-timeout", f.idleTimeout <= 0},
	} {
		if b.bad {
			return o, usagef("--%s %s: want a positive value", b.flag, f.flags.Lookup(b.flag).Value)
		}
	}
	if o.Retention, err = parseDuration(f.retention); err != nil || o.Retention <= 0 {
		return o, usagef("--retention %q: want a positive duration such as 7d or 36h", f.retention)
	}
	if o.Grace, err = parseDuration(f.grace); err != nil || o.Grace <= 0 {
		return o, usagef("--grace %q: want a positive duration such as 1h", f.grace)
	}
	o.Regional = f.flags.Changed("cache-dir") && (f.s3URL != "" || f.upstream != "")
	switch {
	case f.s3URL != "" && f.upstream != "":
		return o, usagef("give either --s3 or --upstream, not both: the upstream is the one source of truth")
	case f.upstream != "" && !o.Regional:
		return o, usagef("--upstream needs --cache-dir: the disk cache this serve keeps in front of it")
	case f.s3URL == "" && f.gcInterval > 0:
		return o, usagef("--gc-interval needs --s3: the disk backend (--cache-dir) collects nothing, it evicts least recently used entries to stay under --max-bytes")
	}
	o.Listen, o.CacheDir, o.MaxBytes, o.S3URL = f.listen, f.cacheDir, f.maxBytes, f.s3URL
	o.Upstream, o.UpstreamAPIKey, o.UpstreamCAFile, o.UpstreamRetryFor = f.upstream, f.upAPIKey, f.upCAFile, f.upRetryFor
	o.MetricsAddr, o.DebugAddr = f.metricsAddr, f.debugAddr
	o.MaxBlobBytes, o.MaxScratchBytes, o.MaxUploadMemory, o.MaxReadMemory = f.maxBlob, f.maxScratch, f.maxUpMem, f.maxReadMem
	o.UploadTTL, o.IdleTimeout, o.GCInterval, o.GCClockOffset = f.uploadTTL, f.idleTimeout, f.gcInterval, f.gcSkew
	o.Compression, o.CompressionSet, o.AccessLog = f.compression, f.flags.Changed("compression"), f.ops.accessLog
	return o, nil
}
