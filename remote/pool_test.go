package remote_test

import (
	"bytes"
	"context"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/stats"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/remote"
	"github.com/snaploader/snaploader/server"
)

// connCounter counts the server's connections begun and ended.
type connCounter struct{ begun, ended atomic.Int64 }

func (c *connCounter) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context   { return ctx }
func (c *connCounter) HandleRPC(context.Context, stats.RPCStats)                         {}
func (c *connCounter) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context { return ctx }
func (c *connCounter) HandleConn(_ context.Context, s stats.ConnStats) {
	switch s.(type) {
	case *stats.ConnBegin:
		c.begun.Add(1)
	case *stats.ConnEnd:
		c.ended.Add(1)
	}
}

// With Connections: 3, ByteStream reads are spread over three connections,
// each read is whole and verified, and Close closes them all.
func TestConnectionPool(t *testing.T) {
	cc := &connCounter{}
	e := start(t, server.Options{}, grpc.StatsHandler(cc))
	c, err := remote.Dial(context.Background(), e.target, remote.Options{Connections: 3, MaxBatchBytes: 1 << 20, RetryBackoff: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for i := range 6 {
		data := blob(2<<20+i, uint64(40+i))
		d := digest.Compute(c.DigestFunction(), data)
		if err := c.Write(ctx, cache.Namespace{}, d, bytes.NewReader(data)); err != nil {
			t.Fatal(err)
		}
		got, err := cache.ReadAll(ctx, c, cache.Namespace{}, d)
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("read %d of blob %s: %v", len(got), d.Hash, err)
		}
	}
	if n := cc.begun.Load(); n != 3 {
		t.Errorf("server saw %d connections, want 3", n)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(5 * time.Second); cc.ended.Load() < cc.begun.Load() && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	if cc.ended.Load() != cc.begun.Load() {
		t.Errorf("after Close %d of %d connections ended", cc.ended.Load(), cc.begun.Load())
	}
}
