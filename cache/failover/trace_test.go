package failover_test

import (
	"io"
	"testing"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/snaploader/snaploader/cache/failover"
)

// A read's span, and its caller's (a chunk fetch), name the remote that
// served the blob: the second one, the first being down.
func TestReadSpanNamesTheRemote(t *testing.T) {
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	prev := otel.GetTracerProvider()
	otel.SetTracerProvider(tp)
	t.Cleanup(func() { otel.SetTracerProvider(prev) })

	a, b := startRemote(t), startRemote(t)
	ft := newTier(t, failover.Options{RetryFor: 10 * time.Second}, nil, a, b)
	data := randBytes(9, mib)
	d := b.put(t, data)
	a.proxy.Disable()

	ctx, parent := tp.Tracer("test").Start(ctxT(t), "chunk_fetch")
	rc, err := ft.Read(ctx, ns, d)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadAll(rc); err != nil {
		t.Fatal(err)
	}
	rc.Close()
	parent.End()

	attr := func(s sdktrace.ReadOnlySpan, key string) attribute.Value {
		for _, kv := range s.Attributes() {
			if string(kv.Key) == key {
				return kv.Value
			}
		}
		return attribute.Value{}
	}
	var read, caller sdktrace.ReadOnlySpan
	for _, s := range rec.Ended() {
		switch s.Name() {
		case "snaploader.remote_read":
			read = s
		case "chunk_fetch":
			caller = s
		}
	}
	if read == nil || caller == nil {
		t.Fatalf("spans %v: want a remote_read span under the caller's", rec.Ended())
	}
	if read.Parent().SpanID() != caller.SpanContext().SpanID() {
		t.Error("the remote_read span is not a child of the caller's span")
	}
	if got := attr(read, "remote").AsString(); got != b.url {
		t.Errorf("remote_read span: remote = %q, want %q", got, b.url)
	}
	if got := attr(read, "bytes_read").AsInt64(); got != int64(len(data)) {
		t.Errorf("remote_read span: bytes_read = %d, want %d", got, len(data))
	}
	if got := attr(caller, "remote").AsString(); got != b.url {
		t.Errorf("caller's span: remote = %q, want %q", got, b.url)
	}
}
