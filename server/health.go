package server

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
)

// Defaults of the health checks.
const (
	DefaultReadyTimeout   = 2 * time.Second
	DefaultHealthInterval = 5 * time.Second
)

// errDraining is the readiness of a server that is shutting down.
var errDraining = errors.New("draining: the server is shutting down")

// probeDigest is the blob the readiness probe asks the backend about:
// whether it is there does not matter, only that the backend answers (the
// empty blob would not do, backends answer for it without a lookup).
var probeDigest = digest.Compute(digest.SHA256, []byte("snaploader readiness probe\n"))

// Ready reports whether the server can serve: it is not shutting down and
// its backend answers a lookup within Options.ReadyTimeout.
func (s *Server) Ready(ctx context.Context) error {
	if s.draining.Load() {
		return errDraining
	}
	ctx, cancel := context.WithTimeout(ctx, s.opts.ReadyTimeout)
	defer cancel()
	if _, err := s.backend.FindMissing(ctx, cache.Namespace{Function: digest.SHA256}, []*repb.Digest{probeDigest}); err != nil {
		return fmt.Errorf("the backend (%s) does not answer: %w", s.describe(), s.san.clean(err))
	}
	return nil
}

// healthServices are the names the gRPC health service reports on: the
// whole server ("") and each service it offers.
var healthServices = []string{"",
	repb.Capabilities_ServiceDesc.ServiceName, repb.ActionCache_ServiceDesc.ServiceName,
	repb.ContentAddressableStorage_ServiceDesc.ServiceName, "google.bytestream.ByteStream",
}

// newHealth is the gRPC health service, NOT_SERVING until the first
// readiness probe passes.
func newHealth() *health.Server {
	h := health.NewServer()
	for _, n := range healthServices {
		h.SetServingStatus(n, healthpb.HealthCheckResponse_NOT_SERVING)
	}
	return h
}

// watchHealth sets the gRPC health service's status from the readiness
// probe every Options.HealthInterval until ctx is done.
func (s *Server) watchHealth(ctx context.Context) {
	t := time.NewTicker(s.opts.HealthInterval)
	defer t.Stop()
	last := healthpb.HealthCheckResponse_UNKNOWN
	for {
		st, err := healthpb.HealthCheckResponse_SERVING, s.Ready(ctx)
		if err != nil {
			st = healthpb.HealthCheckResponse_NOT_SERVING
		}
		if ctx.Err() != nil {
			return
		}
		if st != last {
			if err != nil {
				s.log.Warn("not ready", "err", err)
			} else if last != healthpb.HealthCheckResponse_UNKNOWN {
				s.log.Info("ready again")
			}
			for _, n := range healthServices {
				s.health.SetServingStatus(n, st)
			}
			last = st
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// healthz answers while the process is up.
func healthz(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	fmt.Fprintln(w, "ok")
}

// readyz answers 200 while the server is ready (Ready), else 503 with the
// reason.
func (s *Server) readyz(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	if err := s.Ready(r.Context()); err != nil {
		w.WriteHeader(http.StatusServiceUnavailable)
		fmt.Fprintln(w, "not ready:", err)
		return
	}
	fmt.Fprintln(w, "ready")
}
