// Package server is an REAPI v2 cache server (Capabilities, ActionCache,
// ContentAddressableStorage and ByteStream, including zstd compressed-blobs)
// over any cache.Backend.
//
// API keys map requests to groups (cache.Namespace.Group), so tenants never
// see each other's action-cache entries; a key may be read-only. Every blob
// written is verified against its digest before the backend keeps it, and an
// action-cache entry is only returned while every blob it references (output
// files, stdout/stderr, output directory trees and every file in them) is
// still present. Requests, bytes, latencies and action-cache hits are
// exported as Prometheus metrics.
package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	smpb "github.com/bazelbuild/remote-apis/build/bazel/semver"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/gc"
	"github.com/snaploader/snaploader/proto/inventorypb"
	"github.com/snaploader/snaploader/statuspage"
	"github.com/snaploader/snaploader/telemetry"
)

// APIKey is what an API key grants.
type APIKey struct {
	// Group is the tenant the key's requests act for.
	Group string
	// ReadOnly keys may read but every write is PermissionDenied.
	ReadOnly bool
}

// DefaultMaxBatchBytes is the default limit on the blob bytes of one batch
// request or response; it leaves room for the envelope under gRPC's default
// 4 MiB message limit.
const DefaultMaxBatchBytes = 4<<20 - 64<<10

// Options configures a Server.
type Options struct {
	// APIKeys maps API keys to what they grant. When empty, every request is
	// anonymous (group "") with full access; otherwise a request without a
	// known key is Unauthenticated.
	APIKeys map[string]APIKey
	// APIKeyHeader is the metadata key carrying the API key (default
	// "x-api-key"). "authorization: Bearer KEY" is accepted as well.
	APIKeyHeader string
	// Registry receives the server's metrics; nil means a private registry.
	Registry prometheus.Registerer
	// Gatherer serves /metrics; nil means Registry when it is a Gatherer,
	// else the private registry.
	Gatherer prometheus.Gatherer
	// MaxBatchBytes bounds the blob bytes of one batch call (default
	// DefaultMaxBatchBytes). Serve raises gRPC's message limit to fit.
	MaxBatchBytes int64
	// DigestFunctions offered (default BLAKE3 and SHA-256).
	DigestFunctions []digest.Function
	// TempDir holds ByteStream uploads in flight (default os.TempDir()).
	// With a local-cache backend it should be the cache's TempDir: a
	// verified upload is then renamed into the cache, not copied.
	TempDir string
	// UploadTTL is how long an interrupted upload is kept, after its last
	// message, for the client to resume it (default DefaultUploadTTL).
	UploadTTL time.Duration
	// IdleTimeout aborts a write stream that sends no message for this
	// long and frees what it held (default DefaultIdleTimeout).
	IdleTimeout time.Duration
	// MaxBlobBytes is the largest blob a write may claim; a larger claim is
	// refused at the first message. Default: a quarter of the backend's
	// bound when it has one (the local cache), else DefaultMaxBlobBytes.
	MaxBlobBytes int64
	// MaxScratchBytes bounds the disk space of uploads in flight when the
	// backend does not count it against its own bound (S3); default
	// DefaultMaxScratchBytes. With the local cache, uploads in flight are
	// reserved against the cache's bound instead, together with its
	// entries.
	MaxScratchBytes int64
	// MaxUploadMemory bounds the memory all uploads in flight may hold at
	// once, across all streams (default DefaultMaxUploadMemory). An upload
	// that finds it in use waits for up to IdleTimeout, then is
	// ResourceExhausted.
	MaxUploadMemory int64
	// MaxReadMemory bounds the memory all reads in flight may hold at once
	// (ByteStream reads and batch reads; default DefaultMaxReadMemory). A
	// read that finds it in use waits for up to IdleTimeout, then is
	// ResourceExhausted.
	MaxReadMemory int64
	// Logger receives server-side failures whose details are withheld
	// from clients (default slog.Default()).
	Logger *slog.Logger
	// Inventory is the Store a group's listing (ListSnapshots, the status
	// page) reads, over the backend (gc.LocalCache or gc.S3Group of it);
	// nil: listing is Unimplemented.
	Inventory func(group string) gc.Store
	// Retention is the retention the status page judges snapshots' states
	// by (default gc.DefaultRetention).
	Retention time.Duration
	// AccessLog logs one line per RPC at info level on Logger: method,
	// instance, digest (or the number of blobs a batch names), message
	// bytes in and out, duration, status code, the caller's group and
	// address.
	AccessLog bool
	// ReadyTimeout bounds the readiness probe (Ready; default
	// DefaultReadyTimeout).
	ReadyTimeout time.Duration
	// HealthInterval is how often the gRPC health service's status is
	// set from the readiness probe while serving (default
	// DefaultHealthInterval).
	HealthInterval time.Duration
}

// Defaults of the resource bounds.
const (
	DefaultUploadTTL       = time.Minute
	DefaultIdleTimeout     = 30 * time.Second
	DefaultMaxBlobBytes    = 2 << 30
	DefaultMaxScratchBytes = 8 << 30
	DefaultMaxUploadMemory = 256 << 20
	DefaultMaxReadMemory   = 64 << 20
)

// streamWindow is the HTTP/2 flow-control window of each stream: what the
// transport may buffer for an upload its handler has not read yet.
const streamWindow = 4 << 20

// Server implements the REAPI cache services over a cache.Cache.
type Server struct {
	backend  cache.Backend
	opts     Options
	fns      map[digest.Function]bool
	m        *metrics
	gatherer prometheus.Gatherer
	uploads  *uploads
	mem      *memBudget // uploads
	readMem  *memBudget
	scratch  *scratchBudget
	log      *slog.Logger
	san      *sanitizer
	// reads is when each action-cache entry was last returned.
	reads reads
	// collector runs CollectEvery.
	collector collector
	// started is when New returned; draining is set once Serve begins
	// to stop; serving counts the Serve calls running.
	started  time.Time
	draining atomic.Bool
	serving  atomic.Int32
	health   *health.Server

	repb.UnimplementedCapabilitiesServer
	repb.UnimplementedActionCacheServer
	repb.UnimplementedContentAddressableStorageServer
	bspb.UnimplementedByteStreamServer
	inventorypb.UnimplementedInventoryServer
}

// New returns a Server over backend.
func New(backend cache.Backend, opts Options) (*Server, error) {
	if backend == nil {
		return nil, fmt.Errorf("server: nil backend")
	}
	if opts.APIKeyHeader == "" {
		opts.APIKeyHeader = "x-api-key"
	}
	opts.APIKeyHeader = strings.ToLower(opts.APIKeyHeader)
	if opts.MaxBatchBytes <= 0 {
		opts.MaxBatchBytes = DefaultMaxBatchBytes
	}
	if len(opts.DigestFunctions) == 0 {
		opts.DigestFunctions = []digest.Function{digest.BLAKE3, digest.SHA256}
	}
	if opts.TempDir == "" {
		opts.TempDir = os.TempDir()
	}
	if opts.UploadTTL <= 0 {
		opts.UploadTTL = DefaultUploadTTL
	}
	if opts.IdleTimeout <= 0 {
		opts.IdleTimeout = DefaultIdleTimeout
	}
	if opts.MaxBlobBytes <= 0 {
		opts.MaxBlobBytes = DefaultMaxBlobBytes
		if mb := backend.Traits().MaxBytes; mb > 0 {
			opts.MaxBlobBytes = max(mb/4, 1)
		}
	}
	if opts.MaxScratchBytes <= 0 {
		opts.MaxScratchBytes = DefaultMaxScratchBytes
	}
	if opts.MaxUploadMemory <= 0 {
		opts.MaxUploadMemory = DefaultMaxUploadMemory
	}
	if least := uploadCharge(0, false); opts.MaxUploadMemory < least {
		return nil, fmt.Errorf("server: upload memory budget of %d bytes is below the %d one upload needs", opts.MaxUploadMemory, least)
	}
	if opts.MaxReadMemory <= 0 {
		opts.MaxReadMemory = DefaultMaxReadMemory
	}
	if opts.MaxReadMemory < readCharge {
		return nil, fmt.Errorf("server: read memory budget of %d bytes is below the %d one read needs", opts.MaxReadMemory, readCharge)
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.ReadyTimeout <= 0 {
		opts.ReadyTimeout = DefaultReadyTimeout
	}
	if opts.HealthInterval <= 0 {
		opts.HealthInterval = DefaultHealthInterval
	}
	s := &Server{backend: backend, opts: opts, fns: map[digest.Function]bool{},
		mem: newMemBudget("upload", opts.MaxUploadMemory), readMem: newMemBudget("read", opts.MaxReadMemory),
		scratch: &scratchBudget{max: opts.MaxScratchBytes}, log: opts.Logger,
		started: time.Now(), health: newHealth()}
	var dirs []string
	if abs, err := filepath.Abs(opts.TempDir); err == nil {
		dirs = append(dirs, abs, filepath.Clean(opts.TempDir))
	}
	if d := backend.Traits().Dir; d != "" {
		dirs = append(dirs, d)
	}
	s.san = newSanitizer(dirs...)
	for _, fn := range opts.DigestFunctions {
		if _, err := digest.New(fn); err != nil {
			return nil, fmt.Errorf("server: %w", err)
		}
		s.fns[fn] = true
	}
	for k, v := range opts.APIKeys {
		if k == "" {
			return nil, fmt.Errorf("server: empty API key (group %q)", v.Group)
		}
	}
	reg := opts.Registry
	s.gatherer = opts.Gatherer
	if reg == nil {
		r := prometheus.NewRegistry()
		reg = r
		if s.gatherer == nil {
			s.gatherer = r
		}
	}
	if s.gatherer == nil {
		if g, ok := reg.(prometheus.Gatherer); ok {
			s.gatherer = g
		} else {
			s.gatherer = prometheus.DefaultGatherer
		}
	}
	m, err := newMetrics(reg, backend, func() float64 { return float64(s.mem.inUse()) })
	if err != nil {
		return nil, err
	}
	s.m = m
	s.uploads = newUploads(opts.TempDir, opts.UploadTTL, s.log)
	s.uploads.cleanStale()
	return s, nil
}

// Register adds the Capabilities, ActionCache, ContentAddressableStorage,
// ByteStream, Inventory and gRPC health services to gs. gs should accept messages of at least
// MaxBatchBytes plus 64 KiB (grpc.MaxRecvMsgSize); Serve does that.
func (s *Server) Register(gs *grpc.Server) {
	repb.RegisterCapabilitiesServer(gs, s)
	repb.RegisterActionCacheServer(gs, s)
	repb.RegisterContentAddressableStorageServer(gs, s)
	bspb.RegisterByteStreamServer(gs, s)
	inventorypb.RegisterInventoryServer(gs, s)
	healthpb.RegisterHealthServer(gs, s.health)
}

// MetricsHandler serves the metrics in the Prometheus text format.
func (s *Server) MetricsHandler() http.Handler {
	return promhttp.HandlerFor(s.gatherer, promhttp.HandlerOpts{})
}

// GRPCServerOptions are the options a grpc.Server hosting s needs.
func (s *Server) GRPCServerOptions() []grpc.ServerOption {
	unary := []grpc.UnaryServerInterceptor{s.san.unary}
	stream := []grpc.StreamServerInterceptor{s.san.stream}
	if s.opts.AccessLog {
		// Outermost: the whole call is timed, and its code is the one
		// the client gets.
		unary = append([]grpc.UnaryServerInterceptor{s.accessUnary}, unary...)
		stream = append([]grpc.StreamServerInterceptor{s.accessStream}, stream...)
	}
	return []grpc.ServerOption{
		grpc.MaxRecvMsgSize(int(s.opts.MaxBatchBytes) + 1<<20),
		// Fewer, larger socket reads and writes for blob streams.
		grpc.ReadBufferSize(256 << 10),
		grpc.WriteBufferSize(256 << 10),
		// Fixed flow-control windows, large enough to keep blob uploads
		// streaming, bound what the transport buffers for each stream; an
		// upload's window is charged to the upload memory budget.
		grpc.InitialWindowSize(streamWindow),
		grpc.InitialConnWindowSize(4 * streamWindow),
		grpc.ChainUnaryInterceptor(unary...),
		grpc.ChainStreamInterceptor(stream...),
		// Every RPC is traced as a child of its caller's span (a no-op
		// unless tracing is on).
		grpc.StatsHandler(telemetry.GRPCServerHandler()),
	}
}

// Serve serves the REAPI services on lis until ctx is done, then stops
// gracefully: it drains (Ready fails, the gRPC health service says
// NOT_SERVING, new connections are refused) and returns once the calls in
// flight have finished. extra options (e.g. grpc.Creds for TLS) are added
// to GRPCServerOptions.
func (s *Server) Serve(ctx context.Context, lis net.Listener, extra ...grpc.ServerOption) error {
	s.serving.Add(1)
	defer s.serving.Add(-1)
	gs := grpc.NewServer(append(s.GRPCServerOptions(), extra...)...)
	s.Register(gs)
	stopped := make(chan struct{})
	go func() {
		select {
		case <-ctx.Done():
			s.draining.Store(true)
			s.health.Shutdown()
			gs.GracefulStop()
		case <-stopped:
		}
	}()
	go s.watchHealth(ctx)
	err := gs.Serve(lis)
	close(stopped)
	s.uploads.closeAll()
	if ctx.Err() != nil {
		return nil
	}
	return err
}

// ServeMetrics serves MetricsHandler at /metrics, the status page
// (package statuspage) at /status, /healthz (200 while the process is up)
// and /readyz (200 while Ready, else 503 and the reason) on lis until ctx
// is done and no Serve call is still draining, so that /readyz reports
// the drain.
func (s *Server) ServeMetrics(ctx context.Context, lis net.Listener) error {
	mux := http.NewServeMux()
	mux.Handle("/metrics", s.MetricsHandler())
	page := statuspage.Handler(s)
	mux.Handle("/status", page)
	mux.Handle("/status/snapshot", page)
	mux.HandleFunc("/healthz", healthz)
	mux.HandleFunc("/readyz", s.readyz)
	hs := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		for s.serving.Load() > 0 {
			time.Sleep(20 * time.Millisecond)
		}
		hs.Close()
	}()
	err := hs.Serve(lis)
	if ctx.Err() != nil || errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

// caller is the authenticated principal of a request.
type caller struct {
	group    string
	readOnly bool
}

// authenticate maps the request's credentials to a caller.
func (s *Server) authenticate(ctx context.Context) (caller, error) {
	if len(s.opts.APIKeys) == 0 {
		return caller{}, nil
	}
	md, _ := metadata.FromIncomingContext(ctx)
	var keys []string
	keys = append(keys, md.Get(s.opts.APIKeyHeader)...)
	for _, v := range md.Get("authorization") {
		if tok, ok := strings.CutPrefix(v, "Bearer "); ok {
			keys = append(keys, strings.TrimSpace(tok))
		}
	}
	if len(keys) == 0 {
		return caller{}, status.Error(codes.Unauthenticated, "no API key: send it in the "+s.opts.APIKeyHeader+" header or as a bearer token")
	}
	for _, k := range keys {
		if g, ok := s.opts.APIKeys[k]; ok {
			return caller{group: g.Group, readOnly: g.ReadOnly}, nil
		}
	}
	return caller{}, status.Error(codes.Unauthenticated, "unknown API key")
}

func (c caller) checkWrite(what string) error {
	if c.readOnly {
		return status.Errorf(codes.PermissionDenied, "%s: the API key is read-only", what)
	}
	return nil
}

// function resolves a request's digest function (unset means SHA-256).
func (s *Server) function(fn digest.Function) (digest.Function, error) {
	if fn == repb.DigestFunction_UNKNOWN {
		fn = digest.SHA256
	}
	if !s.fns[fn] {
		return fn, status.Errorf(codes.InvalidArgument, "digest function %v is not supported", fn)
	}
	return fn, nil
}

// namespace authenticates ctx and builds the namespace of a request.
func (s *Server) namespace(ctx context.Context, instance string, fn digest.Function) (cache.Namespace, caller, error) {
	c, err := s.authenticate(ctx)
	if err != nil {
		return cache.Namespace{}, c, err
	}
	if err := checkInstance(instance); err != nil {
		return cache.Namespace{}, c, status.Error(codes.InvalidArgument, err.Error())
	}
	fn, err = s.function(fn)
	if err != nil {
		return cache.Namespace{}, c, err
	}
	return cache.Namespace{Group: c.group, Instance: instance, Function: fn}, c, nil
}

// GetCapabilities describes what the server offers.
func (s *Server) GetCapabilities(ctx context.Context, req *repb.GetCapabilitiesRequest) (_ *repb.ServerCapabilities, err error) {
	defer s.m.observe("GetCapabilities", time.Now(), &err)
	c, err := s.authenticate(ctx)
	if err != nil {
		return nil, err
	}
	if err := checkInstance(req.InstanceName); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	return &repb.ServerCapabilities{
		CacheCapabilities: &repb.CacheCapabilities{
			DigestFunctions:                 s.opts.DigestFunctions,
			ActionCacheUpdateCapabilities:   &repb.ActionCacheUpdateCapabilities{UpdateEnabled: !c.readOnly},
			MaxBatchTotalSizeBytes:          s.opts.MaxBatchBytes,
			MaxCasBlobSizeBytes:             s.opts.MaxBlobBytes,
			SymlinkAbsolutePathStrategy:     repb.SymlinkAbsolutePathStrategy_DISALLOWED,
			SupportedCompressors:            []repb.Compressor_Value{repb.Compressor_ZSTD},
			SupportedBatchUpdateCompressors: nil,
		},
		LowApiVersion:  &smpb.SemVer{Major: 2},
		HighApiVersion: &smpb.SemVer{Major: 2, Minor: 3},
	}, nil
}
