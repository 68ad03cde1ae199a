// Package telemetry turns on OpenTelemetry tracing for a snaploader
// process. It is off by default: nothing is exported, and no connection is
// made, unless an OTLP endpoint is configured, by the standard
// OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
// variables or by the --trace-endpoint flag. The W3C trace context is
// propagated over gRPC (see GRPCClientHandler and GRPCServerHandler), so one
// trace shows a restore on one host and the `serve` work it caused.
package telemetry

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strings"
	"time"

	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	otelcodes "go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.26.0"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"
)

// Name is the instrumentation scope of snaploader's spans.
const Name = "github.com/snaploader/snaploader"

// Options configure Setup.
type Options struct {
	// Endpoint is an OTLP/gRPC endpoint (host:port, or an http:// or
	// https:// URL). Empty: the standard environment variables decide.
	Endpoint string
	// Service is the service.name of this process's spans.
	Service string
	// Command names what the process does (e.g. "restore"), as the
	// process.command attribute.
	Command string
}

// Enabled reports whether opts (or the environment) asks for tracing.
func (o Options) Enabled() bool { return o.endpoint() != "" }

func (o Options) endpoint() string {
	for _, e := range []string{o.Endpoint, os.Getenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"), os.Getenv("OTEL_EXPORTER_OTLP_ENDPOINT")} {
		if e != "" {
			return e
		}
	}
	return ""
}

// Setup installs a tracer provider exporting to the configured endpoint
// and returns a function that flushes and stops it. When tracing is off it
// installs nothing and the returned function does nothing.
func Setup(ctx context.Context, opts Options) (shutdown func(context.Context) error, err error) {
	noop := func(context.Context) error { return nil }
	ep := opts.endpoint()
	if ep == "" || os.Getenv("OTEL_SDK_DISABLED") == "true" {
		return noop, nil
	}
	var eopts []otlptracegrpc.Option
	hostport, insecure := ep, true
	if strings.Contains(ep, "://") {
		u, err := url.Parse(ep)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") {
			return noop, status.Errorf(codes.InvalidArgument, "trace endpoint %q: want HOST:PORT, http://HOST:PORT or https://HOST:PORT", ep)
		}
		hostport, insecure = u.Host, u.Scheme == "http"
	}
	if h, p, err := net.SplitHostPort(hostport); err != nil || h == "" || p == "" {
		return noop, status.Errorf(codes.InvalidArgument, "trace endpoint %q: want HOST:PORT, http://HOST:PORT or https://HOST:PORT", ep)
	}
	eopts = append(eopts, otlptracegrpc.WithEndpoint(hostport))
	if insecure {
		eopts = append(eopts, otlptracegrpc.WithInsecure())
	}
	exp, err := otlptracegrpc.New(ctx, eopts...)
	if err != nil {
		return noop, fmt.Errorf("trace exporter for %s: %w", ep, err)
	}
	res, err := resource.Merge(resource.Default(), resource.NewSchemaless(
		semconv.ServiceName(opts.Service), attribute.String("process.command", opts.Command), semconv.ProcessPID(os.Getpid())))
	if err != nil {
		return noop, fmt.Errorf("trace resource: %w", err)
	}
	tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exp, sdktrace.WithBatchTimeout(time.Second)), sdktrace.WithResource(res))
	otel.SetTracerProvider(tp)
	otel.SetTextMapPropagator(propagation.NewCompositeTextMapPropagator(propagation.TraceContext{}, propagation.Baggage{}))
	return func(ctx context.Context) error {
		return errors.Join(tp.ForceFlush(ctx), tp.Shutdown(ctx))
	}, nil
}

// Tracer is snaploader's tracer from the installed provider (a no-op one
// when tracing is off).
func Tracer() trace.Tracer { return otel.Tracer(Name) }

// Start starts a span named name as a child of ctx's.
func Start(ctx context.Context, name string, attrs ...attribute.KeyValue) (context.Context, trace.Span) {
	return Tracer().Start(ctx, name, trace.WithAttributes(attrs...))
}

// End ends span, recording err (nil for success) as its status.
func End(span trace.Span, err error) {
	if err != nil {
		span.RecordError(err)
		span.SetStatus(otelcodes.Error, err.Error())
	}
	span.End()
}

// GRPCClientHandler traces a gRPC client's calls and propagates the trace
// context to the server.
func GRPCClientHandler() stats.Handler { return otelgrpc.NewClientHandler() }

// GRPCServerHandler traces a gRPC server's calls as children of the
// callers' spans.
func GRPCServerHandler() stats.Handler { return otelgrpc.NewServerHandler() }
