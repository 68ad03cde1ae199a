// Package remote is a client for REAPI v2 caches: the action cache, the CAS
// (FindMissingBlobs, batch reads and updates for small blobs, ByteStream
// for large ones, with resumable writes and zstd compressed-blobs when the
// server offers them), per-call deadlines, retries with jittered backoff on
// UNAVAILABLE and RESOURCE_EXHAUSTED, API-key and bearer-token credentials
// and TLS. *Client implements cache.Cache.
package remote

import (
	"context"
	crand "crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/internal/fileio"
	"github.com/snaploader/snaploader/telemetry"
)

// Options configures a Client.
type Options struct {
	// Instance is the REAPI instance name; a non-empty Namespace.Instance
	// overrides it per call.
	Instance string
	// APIKey is sent in the APIKeyHeader metadata entry when non-empty.
	APIKey string
	// APIKeyHeader defaults to "x-api-key".
	APIKeyHeader string
	// BearerToken is sent as "authorization: Bearer TOKEN" when non-empty.
	BearerToken string
	// CAFile is a PEM file of CAs trusted for grpcs:// targets instead of
	// the system roots.
	CAFile string
	// ClientCertFile and ClientKeyFile are a PEM certificate and key this
	// client presents to grpcs:// servers that require one (mutual TLS).
	ClientCertFile, ClientKeyFile string
	// CallTimeout bounds each RPC attempt (default 60s); a ByteStream
	// transfer gets an extra second per 8 MiB it moves.
	CallTimeout time.Duration
	// MaxRetries is how many times an UNAVAILABLE or RESOURCE_EXHAUSTED
	// call is retried (default 4; negative means none).
	MaxRetries int
	// RetryBackoff is the first retry's maximum delay (default 100ms); it
	// doubles per attempt up to 5s, and each delay is jittered.
	RetryBackoff time.Duration
	// DigestFunction forces a digest function; 0 chooses from the server's
	// capabilities: BLAKE3 where offered, else SHA-256.
	DigestFunction digest.Function
	// DisableCompression turns off zstd compressed-blobs, which are used by
	// default for ByteStream transfers when the server offers them.
	DisableCompression bool
	// MaxBatchBytes caps the blob bytes sent in one batch call; larger
	// blobs use ByteStream (default and upper bound: the server's limit,
	// or 4 MiB less 64 KiB when it states none).
	MaxBatchBytes int64
	// FindMissingBatch is the most digests per FindMissingBlobs call
	// (default 10000, about 1 MB).
	FindMissingBatch int
	// Connections is how many connections ByteStream reads are spread
	// over, round robin (default 1; other calls use the first). Each
	// connection is one TCP stream with its own flow-control windows and
	// its own reader goroutine on each side.
	Connections int
	// SharedFaultLane sends reads of part of a blob and batch reads of
	// small blobs over the same connections as whole-blob transfers. By
	// default they have a connection of their own (the fault lane, dialled
	// on first use), so that a page fault's few KiB never queue behind the
	// megabytes of read-ahead already in flight on a connection.
	SharedFaultLane bool
}

// Client talks to one REAPI cache.
type Client struct {
	target   string
	conn     *grpc.ClientConn
	opts     Options
	cas      repb.ContentAddressableStorageClient
	ac       repb.ActionCacheClient
	bs       bspb.ByteStreamClient
	readers  []bspb.ByteStreamClient // ByteStream reads, round robin
	extra    []*grpc.ClientConn      // connections beyond conn
	lane     faultLane               // ranged and small reads (conn.go)
	next     atomic.Uint32
	fn       digest.Function
	fns      []digest.Function
	zstd     bool
	maxBatch int64
	canWrite bool
	maxBlob  int64 // largest blob the server takes, 0 when it states none
	ranges   *rangeSupport
}

var _ cache.Cache = (*Client)(nil)

const defaultMaxBatch = 4<<20 - 64<<10

// flowWindow is the HTTP/2 flow-control window of each stream.
const flowWindow = 16 << 20

// Dial connects to target ("grpc://HOST:PORT", "grpcs://HOST:PORT" or
// "unix:///PATH") and reads the server's capabilities. An endpoint that
// cannot be reached is Unavailable; one that answers another protocol (an
// HTTP port, TLS where the URL says plaintext or the reverse) is
// InvalidArgument, saying what it answered (see Probe).
func Dial(ctx context.Context, target string, opts Options) (*Client, error) {
	if opts.APIKeyHeader == "" {
		opts.APIKeyHeader = "x-api-key"
	}
	opts.APIKeyHeader = strings.ToLower(opts.APIKeyHeader)
	if opts.CallTimeout <= 0 {
		opts.CallTimeout = 60 * time.Second
	}
	if opts.MaxRetries == 0 {
		opts.MaxRetries = 4
	}
	if opts.MaxRetries < 0 {
		opts.MaxRetries = 0
	}
	if opts.RetryBackoff <= 0 {
		opts.RetryBackoff = 100 * time.Millisecond
	}
	if opts.FindMissingBatch <= 0 {
		opts.FindMissingBatch = 10000
	}
	addr, creds, err := parseTarget(target, opts.CAFile, opts.ClientCertFile, opts.ClientKeyFile)
	if err != nil {
		return nil, err
	}
	var md []string
	if opts.APIKey != "" {
		md = append(md, opts.APIKeyHeader, opts.APIKey)
	}
	if opts.BearerToken != "" {
		md = append(md, "authorization", "Bearer "+opts.BearerToken)
	}
	dopts := []grpc.DialOption{
		grpc.WithTransportCredentials(creds),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64 << 20)),
		grpc.WithReadBufferSize(256 << 10),
		grpc.WithWriteBufferSize(256 << 10),
		// Windows large enough for several 4 MB chunks in flight: the
		// defaults stall a blob stream on every 64 KiB round trip.
		grpc.WithInitialWindowSize(flowWindow),
		grpc.WithInitialConnWindowSize(4 * flowWindow),
		// Calls are traced and carry the caller's trace context to the
		// server (a no-op unless tracing is on).
		grpc.WithStatsHandler(telemetry.GRPCClientHandler()),
	}
	if len(md) > 0 {
		dopts = append(dopts,
			grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, o ...grpc.CallOption) error {
				return invoker(metadata.AppendToOutgoingContext(ctx, md...), method, req, reply, cc, o...)
			}),
			grpc.WithChainStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, o ...grpc.CallOption) (grpc.ClientStream, error) {
				return streamer(metadata.AppendToOutgoingContext(ctx, md...), desc, cc, method, o...)
			}))
	}
	conn, err := grpc.NewClient(addr, dopts...)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "remote cache %s: %v", target, err)
	}
	c := &Client{
		target: target, conn: conn, opts: opts,
		cas:    repb.NewContentAddressableStorageClient(conn),
		ac:     repb.NewActionCacheClient(conn),
		bs:     bspb.NewByteStreamClient(conn),
		ranges: newRangeSupport(),
	}
	c.readers = []bspb.ByteStreamClient{c.bs}
	if err := c.dialLane(addr, dopts); err != nil {
		c.Close()
		return nil, status.Errorf(codes.InvalidArgument, "remote cache %s: %v", target, err)
	}
	for range max(1, opts.Connections) - 1 {
		cc, err := grpc.NewClient(addr, dopts...)
		if err != nil {
			c.Close()
			return nil, status.Errorf(codes.InvalidArgument, "remote cache %s: %v", target, err)
		}
		c.extra = append(c.extra, cc)
		c.readers = append(c.readers, bspb.NewByteStreamClient(cc))
	}
	if err := c.capabilities(ctx); err != nil {
		c.Close()
		// An endpoint that answers another protocol is a configuration
		// error, not an outage: say what it answered.
		if ctx.Err() == nil && cache.IsOutage(err) && !errors.Is(err, context.DeadlineExceeded) && status.Code(err) != codes.DeadlineExceeded {
			if perr := Probe(ctx, target, opts.CAFile); perr != nil {
				return nil, perr
			}
		}
		return nil, err
	}
	return c, nil
}

// hostPort checks the HOST:PORT of a target: a port in 1-65535 and a host
// without spaces or control characters. It returns the host.
func hostPort(target, hp string) (string, error) {
	host, port, err := net.SplitHostPort(hp)
	if err != nil {
		return "", status.Errorf(codes.InvalidArgument, "remote cache target %q: %v", target, err)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return "", status.Errorf(codes.InvalidArgument, "remote cache target %q: port %q is not a number in 1-65535", target, port)
	}
	if host == "" || strings.ContainsFunc(host, func(r rune) bool { return r <= ' ' || r == 0x7f }) {
		return "", status.Errorf(codes.InvalidArgument, "remote cache target %q: host %q is not a host name or address", target, host)
	}
	return host, nil
}

// readCAFile reads a PEM file (a CA bundle, a client certificate or key)
// without blocking on a FIFO or reading a device.
func readCAFile(path string) ([]byte, error) { return readPEMFile(path, "CA file") }

func readPEMFile(path, what string) ([]byte, error) {
	f, err := fileio.OpenRegular(path)
	if err != nil {
		return nil, fmt.Errorf("remote cache %s: %w", what, err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, 16<<20))
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "remote cache %s %s: %v", what, path, err)
	}
	return b, nil
}

func parseTarget(target, caFile, certFile, keyFile string) (string, credentials.TransportCredentials, error) {
	scheme, rest, ok := strings.Cut(target, "://")
	if !ok || rest == "" {
		return "", nil, status.Errorf(codes.InvalidArgument, "remote cache target %q: want grpc://HOST:PORT, grpcs://HOST:PORT or unix:///PATH", target)
	}
	switch scheme {
	case "grpc":
		if _, err := hostPort(target, rest); err != nil {
			return "", nil, err
		}
		return "passthrough:///" + rest, insecure.NewCredentials(), nil
	case "grpcs":
		host, err := hostPort(target, rest)
		if err != nil {
			return "", nil, err
		}
		cfg := &tls.Config{ServerName: host, MinVersion: tls.VersionTLS12}
		if caFile != "" {
			pem, err := readCAFile(caFile)
			if err != nil {
				return "", nil, err
			}
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(pem) {
				return "", nil, status.Errorf(codes.InvalidArgument, "remote cache CA file %s: no PEM certificates", caFile)
			}
			cfg.RootCAs = pool
		}
		if certFile != "" || keyFile != "" {
			if certFile == "" || keyFile == "" {
				return "", nil, status.Errorf(codes.InvalidArgument, "remote cache client certificate: give both the certificate and its key")
			}
			certPEM, err := readPEMFile(certFile, "client certificate")
			if err != nil {
				return "", nil, err
			}
			keyPEM, err := readPEMFile(keyFile, "client key")
			if err != nil {
				return "", nil, err
			}
			cert, err := tls.X509KeyPair(certPEM, keyPEM)
			if err != nil {
				return "", nil, status.Errorf(codes.InvalidArgument, "remote cache client certificate %s and key %s: %v", certFile, keyFile, err)
			}
			cfg.Certificates = []tls.Certificate{cert}
		}
		return "dns:///" + rest, credentials.NewTLS(cfg), nil
	case "unix":
		return target, insecure.NewCredentials(), nil
	}
	return "", nil, status.Errorf(codes.InvalidArgument, "remote cache target %q: unknown scheme %q", target, scheme)
}

func (c *Client) capabilities(ctx context.Context) error {
	var caps *repb.ServerCapabilities
	err := c.retry(ctx, func(ctx context.Context) (err error) {
		caps, err = repb.NewCapabilitiesClient(c.conn).GetCapabilities(ctx, &repb.GetCapabilitiesRequest{InstanceName: c.opts.Instance})
		return err
	})
	if err != nil {
		return fmt.Errorf("getting capabilities of remote cache %s: %w", c.target, err)
	}
	cc := caps.GetCacheCapabilities()
	if cc == nil {
		return status.Errorf(codes.Unavailable, "remote cache %s has no cache capabilities", c.target)
	}
	c.fns = cc.DigestFunctions
	if len(c.fns) == 0 {
		c.fns = []digest.Function{digest.SHA256}
	}
	switch {
	case c.opts.DigestFunction != repb.DigestFunction_UNKNOWN:
		if !slices.Contains(c.fns, c.opts.DigestFunction) {
			return status.Errorf(codes.InvalidArgument, "remote cache %s does not offer digest function %v (offers %v)", c.target, c.opts.DigestFunction, c.fns)
		}
		c.fn = c.opts.DigestFunction
	case slices.Contains(c.fns, digest.BLAKE3):
		c.fn = digest.BLAKE3
	case slices.Contains(c.fns, digest.SHA256):
		c.fn = digest.SHA256
	default:
		return status.Errorf(codes.InvalidArgument, "remote cache %s offers neither BLAKE3 nor SHA-256 (offers %v)", c.target, c.fns)
	}
	c.zstd = !c.opts.DisableCompression && slices.Contains(cc.SupportedCompressors, repb.Compressor_ZSTD)
	c.maxBatch = defaultMaxBatch
	if m := cc.MaxBatchTotalSizeBytes; m > 0 && m < c.maxBatch {
		c.maxBatch = m
	}
	if m := c.opts.MaxBatchBytes; m > 0 && m < c.maxBatch {
		c.maxBatch = m
	}
	c.canWrite = cc.ActionCacheUpdateCapabilities.GetUpdateEnabled()
	c.maxBlob = cc.GetMaxCasBlobSizeBytes()
	return nil
}

// DigestFunction is the digest function chosen for this server.
func (c *Client) DigestFunction() digest.Function { return c.fn }

// Compression reports whether ByteStream transfers use zstd.
func (c *Client) Compression() bool { return c.zstd }

// UpdateEnabled reports whether the server's capabilities let this client
// write (cache_capabilities.action_cache_update_capabilities.update_enabled):
// false for a read-only API key, so a save can stop before uploading
// anything instead of failing at its manifest.
func (c *Client) UpdateEnabled() bool { return c.canWrite }

// CanUpdateActionCache is UpdateEnabled.
func (c *Client) CanUpdateActionCache() bool { return c.canWrite }

// Close closes the connections.
func (c *Client) Close() error {
	errs := []error{c.conn.Close()}
	if c.lane.conn != nil {
		errs = append(errs, c.lane.conn.Close())
	}
	for _, cc := range c.extra {
		errs = append(errs, cc.Close())
	}
	return errors.Join(errs...)
}

// reader returns the ByteStream client of the next connection.
func (c *Client) reader() bspb.ByteStreamClient {
	return c.readers[int(c.next.Add(1))%len(c.readers)]
}

// String names the target.
func (c *Client) String() string { return c.target }

// ns resolves the instance and digest function of a call.
func (c *Client) ns(ns cache.Namespace) (string, digest.Function, error) {
	inst := c.opts.Instance
	if ns.Instance != "" {
		inst = ns.Instance
	}
	fn := ns.Function
	if fn == repb.DigestFunction_UNKNOWN {
		fn = c.fn
	} else if !slices.Contains(c.fns, fn) {
		return "", fn, status.Errorf(codes.InvalidArgument, "remote cache %s does not offer digest function %v", c.target, fn)
	}
	return inst, fn, nil
}

func retryable(err error) bool {
	switch status.Code(err) {
	case codes.Unavailable, codes.ResourceExhausted:
		return true
	}
	return false
}

// retry runs call with a CallTimeout deadline, retrying retryable errors
// with jittered exponential backoff.
func (c *Client) retry(ctx context.Context, call func(ctx context.Context) error) error {
	for attempt := 0; ; attempt++ {
		cctx, cancel := context.WithTimeout(ctx, c.opts.CallTimeout)
		err := call(cctx)
		cancel()
		if err == nil || !retryable(err) || attempt >= c.opts.MaxRetries {
			return err
		}
		if err := c.backoff(ctx, attempt); err != nil {
			return err
		}
	}
}

func (c *Client) backoff(ctx context.Context, attempt int) error {
	limit := min(c.opts.RetryBackoff<<attempt, 5*time.Second)
	d := limit/2 + rand.N(limit/2+1)
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return status.FromContextError(ctx.Err()).Err()
	case <-t.C:
		return nil
	}
}

func newUUID() string {
	var b [16]byte
	crand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}
