package tierurl

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
	"github.com/snaploader/snaploader/remote"
)

// refused is a grpc:// URL where nothing listens.
func refused(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return "grpc://" + addr
}

func TestOpen(t *testing.T) {
	ctx := context.Background()
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	down := refused(t)
	opts := Options{Remote: remote.Options{CallTimeout: 2 * time.Second, MaxRetries: -1}, Logger: quiet, RetryFor: time.Second}
	for _, tc := range []struct {
		name     string
		urls     []string
		required bool
		kind     errkind.Kind // of Open's error; 0: none
		downErr  bool         // a *DownError
		down     bool         // Opened.Down set
	}{
		{"unknown scheme", []string{"http://x:1"}, false, errkind.InvalidArgument, false, false},
		{"malformed s3 URL", []string{"s3://b?nope=1"}, false, errkind.InvalidArgument, false, false},
		{"down, not required", []string{down}, false, 0, false, true},
		{"down, required", []string{down}, true, errkind.Unavailable, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := opts
			o.Required = tc.required
			got, err := Open(ctx, tc.urls, digest.BLAKE3, o)
			var de *DownError
			switch {
			case tc.kind == 0 && err != nil:
				t.Fatalf("Open: %v", err)
			case tc.kind != 0 && !errkind.Is(err, tc.kind):
				t.Fatalf("Open: %v (kind %v), want %v", err, errkind.Of(err), tc.kind)
			case tc.downErr != errors.As(err, &de):
				t.Fatalf("Open: %v; a DownError: %v, want %v", err, !tc.downErr, tc.downErr)
			}
			if err != nil {
				return
			}
			defer got.Close()
			if (got.Down != nil) != tc.down || got.Tier == nil {
				t.Fatalf("Opened %+v: want Down set %v and a tier", got, tc.down)
			}
			// A tier down at start fails a lookup after one pass, at once.
			if _, err := got.Tier.GetActionResult(ctx, cache.Namespace{}, digest.Compute(digest.BLAKE3, []byte(fmt.Sprint(tc.name)))); !errkind.Is(err, errkind.Unavailable) {
				t.Errorf("lookup through a tier that is down: %v, want Unavailable", err)
			}
		})
	}
}

// Remotes are named by their URL without user information (where a token
// may have been put), in reports, traces and metrics alike.
func TestName(t *testing.T) {
	for _, tc := range []struct{ url, want string }{
		{"grpc://cache:8980", "grpc://cache:8980"},
		{"grpcs://token@cache:443", "grpcs://cache:443"},
		{"grpcs://user:secret@cache:443", "grpcs://cache:443"},
		{"unix:///run/snaploader/serve.sock", "unix:///run/snaploader/serve.sock"},
		{"s3://snaps/prefix?endpoint=minio:9000&secure=false", "s3://snaps/prefix?endpoint=minio:9000&secure=false"},
		{"%%", "%%"}, // unparsable: as given (Open refuses it)
	} {
		if got := Name(tc.url); got != tc.want {
			t.Errorf("Name(%q) = %q, want %q", tc.url, got, tc.want)
		}
	}
}
