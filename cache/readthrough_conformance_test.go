package cache_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/cachetest"
	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/remote"
	"github.com/snaploader/snaploader/server"
)

// readThroughTier is the read-through of a restore as a tier: blobs are
// read through the local tier, which fills from the remote; they are
// written to the remote, as a save publishes them; FindMissing and the
// action cache are the remote's.
type readThroughTier struct {
	*cache.ReadThrough
	remote cache.Cache
}

func (r readThroughTier) FindMissing(ctx context.Context, ns cache.Namespace, ds []*repb.Digest) ([]*repb.Digest, error) {
	return r.remote.FindMissing(ctx, ns, ds)
}

func (r readThroughTier) Write(ctx context.Context, ns cache.Namespace, d *repb.Digest, rd io.Reader) error {
	return r.remote.Write(ctx, ns, d, rd)
}

func (r readThroughTier) GetActionResult(ctx context.Context, ns cache.Namespace, key *repb.Digest) (*repb.ActionResult, error) {
	return r.remote.GetActionResult(ctx, ns, key)
}

func (r readThroughTier) UpdateActionResult(ctx context.Context, ns cache.Namespace, key *repb.Digest, ar *repb.ActionResult) error {
	return r.remote.UpdateActionResult(ctx, ns, key, ar)
}

// TestReadThroughConformance runs the tier suite on a read-through over a
// local cache and a remote client of a server on a loopback port (over a
// local cache of its own).
func TestReadThroughConformance(t *testing.T) {
	cachetest.Run(t, cachetest.Harness{
		GroupFromCredentials: true,
		New: func(t *testing.T) cachetest.Tier {
			localDir := t.TempDir()
			served := newLocal(t, "")
			rc := serveRemote(t, served)
			boots := 0
			open := func(t *testing.T, boot string) cache.Cache {
				local := newLocalBoot(t, localDir, boot)
				return readThroughTier{cache.NewReadThrough(local, rc), rc}
			}
			return cachetest.Tier{
				Cache: open(t, ""),
				// A restarted process: a local tier that verifies again.
				Reopen: func(t *testing.T) cache.Cache {
					boots++
					return open(t, fmt.Sprintf("reopened-%d", boots))
				},
				// The remote's copy is damaged (the local tier holds none
				// before the blob is read).
				Corrupt: func(t *testing.T, ns cache.Namespace, d *repb.Digest, damage func([]byte) []byte) {
					cachetest.DamageFile(t, served.Path(ns, d), damage)
				},
				Leftovers: func(t *testing.T) []string {
					var dirs []string
					for _, dir := range []string{localDir, served.Dir()} {
						dirs = append(dirs, filepath.Join(dir, "tmp"), filepath.Join(dir, "cas"), filepath.Join(dir, "scratch"))
					}
					deadline := time.Now().Add(5 * time.Second)
					for {
						// The server keeps an interrupted upload for a
						// moment for its client to resume it.
						l := cachetest.FilesUnder(t, dirs...)
						if len(l) == 0 || time.Now().After(deadline) {
							return l
						}
						time.Sleep(20 * time.Millisecond)
					}
				},
				Exhaust: cachetest.ExhaustDescriptors,
			}
		},
	})
}

// serveRemote serves lc on a loopback port and returns a client of it.
func serveRemote(t *testing.T, lc *localcache.Cache) *remote.Client {
	t.Helper()
	srv, err := server.New(lc, server.Options{TempDir: lc.TempDir(), UploadTTL: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer(srv.GRPCServerOptions()...)
	srv.Register(gs)
	go gs.Serve(lis)
	t.Cleanup(gs.Stop)
	c, err := remote.Dial(context.Background(), "grpc://"+lis.Addr().String(), remote.Options{RetryBackoff: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}
