package main

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/spf13/cobra"
	"go.opentelemetry.io/otel/trace"

	"github.com/snaploader/snaploader/telemetry"
)

// commandTrace is the tracing of one command: off unless an OTLP endpoint
// is configured (--trace-endpoint or OTEL_EXPORTER_OTLP_ENDPOINT), then one
// root span per command, flushed before the process exits.
type commandTrace struct {
	endpoint string
	span     trace.Span
	shutdown func(context.Context) error
}

func (t *commandTrace) register(root *cobra.Command) {
	root.PersistentFlags().StringVar(&t.endpoint, "trace-endpoint", "", "export OpenTelemetry traces to this OTLP/gRPC endpoint (HOST:PORT or http://HOST:PORT; default $OTEL_EXPORTER_OTLP_ENDPOINT, off when neither is set)")
	root.PersistentPreRunE = func(cmd *cobra.Command, _ []string) error {
		service := "snaploader"
		if cmd.Name() == "serve" {
			service = "snaploader-serve"
		}
		if s := os.Getenv("OTEL_SERVICE_NAME"); s != "" {
			service = s
		}
		shutdown, err := telemetry.Setup(cmd.Context(), telemetry.Options{Endpoint: t.endpoint, Service: service, Command: cmd.CommandPath()})
		if err != nil {
			return err
		}
		t.shutdown = shutdown
		if cmd.Name() == "serve" {
			return nil // each RPC is traced as a child of its caller's span
		}
		ctx, span := telemetry.Start(cmd.Context(), "snaploader "+cmd.Name())
		t.span = span
		cmd.SetContext(ctx)
		return nil
	}
}

// finish ends the command's span and flushes what is to be exported.
func (t *commandTrace) finish(err error) {
	if t.span != nil {
		telemetry.End(t.span, err)
	}
	if t.shutdown != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := t.shutdown(ctx); err != nil {
			fmt.Fprintf(os.Stderr, "snaploader: exporting traces: %v\n", err)
		}
	}
}
