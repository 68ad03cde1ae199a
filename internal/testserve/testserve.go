// Package testserve runs a snaploader server over a backend on loopback
// for the tests of the packages that talk to one (tiers, clients, the
// failover and regional tiers, end-to-end tests).
package testserve

import (
	"context"
	"log/slog"
	"net"
	"testing"

	"google.golang.org/grpc"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/server"
)

// Serve serves backend with opts on a free 127.0.0.1 port until the test
// ends, and returns the address ("127.0.0.1:PORT"). A nil opts.Logger
// discards the server's log; an error of Serve is a test failure. extra
// gRPC options (e.g. interceptors making the server behave like another
// cache) are added to the server's own.
func Serve(t testing.TB, backend cache.Backend, opts server.Options, extra ...grpc.ServerOption) string {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	srv, err := server.New(backend, opts)
	if err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, lis, extra...) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serving %s: %v", backend.Traits().Description, err)
		}
	})
	return lis.Addr().String()
}
