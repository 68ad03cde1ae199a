package server

import (
	"context"
	"log/slog"
	"strings"
	"sync"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/snaploader/snaploader/digest"
)

// rpcLog is what the access log says about one RPC. A stream's fields
// are set under loggedStream.mu: a handler may return while a goroutine
// of its own still receives.
type rpcLog struct {
	method   string
	instance string
	digest   *repb.Digest
	blobs    int // digests named by a batch or lookup
	in, out  int64
}

// describe fills in what a request message names.
func (l *rpcLog) describe(m any) {
	if r, ok := m.(interface{ GetInstanceName() string }); ok && l.instance == "" {
		l.instance = r.GetInstanceName()
	}
	switch r := m.(type) {
	case *repb.GetActionResultRequest:
		l.digest = r.GetActionDigest()
	case *repb.UpdateActionResultRequest:
		l.digest = r.GetActionDigest()
	case *repb.FindMissingBlobsRequest:
		l.one(r.GetBlobDigests())
	case *repb.BatchReadBlobsRequest:
		l.one(r.GetDigests())
	case *repb.BatchUpdateBlobsRequest:
		ds := make([]*repb.Digest, len(r.GetRequests()))
		for i, q := range r.GetRequests() {
			ds[i] = q.GetDigest()
		}
		l.one(ds)
	case *bspb.ReadRequest:
		if res, err := parseRead(r.GetResourceName()); err == nil {
			l.instance, l.digest = res.instance, res.d
		}
	case *bspb.WriteRequest:
		if l.digest != nil || r.GetResourceName() == "" {
			return
		}
		if res, _, err := parseWrite(r.GetResourceName()); err == nil {
			l.instance, l.digest = res.instance, res.d
		}
	}
}

// one records how many digests a call names, and the digest when it is
// one.
func (l *rpcLog) one(ds []*repb.Digest) {
	l.blobs = len(ds)
	if len(ds) == 1 {
		l.digest = ds[0]
	}
}

// shortMethod is "Service/Method" of "/package.Service/Method".
func shortMethod(full string) string {
	full = strings.TrimPrefix(full, "/")
	svc, m, ok := strings.Cut(full, "/")
	if !ok {
		return full
	}
	return svc[strings.LastIndex(svc, ".")+1:] + "/" + m
}

// logRPC writes the access-log line of a finished RPC. Health checks are
// logged at debug level only: load balancers poll them.
func (s *Server) logRPC(ctx context.Context, l *rpcLog, start time.Time, err error) {
	level := slog.LevelInfo
	if strings.HasPrefix(l.method, "Health/") {
		level = slog.LevelDebug
	}
	if !s.log.Enabled(ctx, level) {
		return
	}
	attrs := []slog.Attr{
		slog.String("method", l.method),
		slog.String("code", status.Code(err).String()),
		slog.Float64("duration_ms", float64(time.Since(start).Microseconds())/1e3),
		slog.Int64("bytes_in", l.in),
		slog.Int64("bytes_out", l.out),
	}
	if c, aerr := s.authenticate(ctx); aerr == nil && len(s.opts.APIKeys) > 0 {
		attrs = append(attrs, slog.String("group", c.group))
	}
	if l.instance != "" {
		attrs = append(attrs, slog.String("instance", l.instance))
	}
	if l.digest != nil {
		attrs = append(attrs, slog.String("digest", digest.String(l.digest)))
	}
	if l.blobs > 0 {
		attrs = append(attrs, slog.Int("blobs", l.blobs))
	}
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		attrs = append(attrs, slog.String("peer", p.Addr.String()))
	}
	s.log.LogAttrs(ctx, level, "rpc", attrs...)
}

func msgSize(m any) int64 {
	if pm, ok := m.(proto.Message); ok {
		return int64(proto.Size(pm))
	}
	return 0
}

// accessUnary logs every unary RPC (Options.AccessLog).
func (s *Server) accessUnary(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	start := time.Now()
	l := &rpcLog{method: shortMethod(info.FullMethod), in: msgSize(req)}
	l.describe(req)
	resp, err := h(ctx, req)
	if err == nil {
		l.out = msgSize(resp)
	}
	s.logRPC(ctx, l, start, err)
	return resp, err
}

// accessStream logs every streaming RPC (Options.AccessLog).
func (s *Server) accessStream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	start := time.Now()
	w := &loggedStream{ServerStream: ss, l: &rpcLog{method: shortMethod(info.FullMethod)}}
	err := h(srv, w)
	w.mu.Lock()
	l := *w.l
	w.mu.Unlock()
	s.logRPC(ss.Context(), &l, start, err)
	return err
}

// loggedStream counts a stream's message bytes and notes what its
// requests name.
type loggedStream struct {
	grpc.ServerStream
	mu sync.Mutex
	l  *rpcLog
}

func (w *loggedStream) RecvMsg(m any) error {
	err := w.ServerStream.RecvMsg(m)
	if err == nil {
		n := msgSize(m)
		w.mu.Lock()
		w.l.in += n
		w.l.describe(m)
		w.mu.Unlock()
	}
	return err
}

func (w *loggedStream) SendMsg(m any) error {
	err := w.ServerStream.SendMsg(m)
	if err == nil {
		n := msgSize(m)
		w.mu.Lock()
		w.l.out += n
		w.mu.Unlock()
	}
	return err
}
