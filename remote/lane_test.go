package remote_test

import (
	"bytes"
	"context"
	"io"
	"sync"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/stats"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/remote"
	"github.com/snaploader/snaploader/server"
)

// connOfCall records, for each RPC method the server sees, the client
// address of the connection it arrived on.
type connOfCall struct {
	mu    sync.Mutex
	conns map[string]map[string]bool // method -> remote addresses
}

type connKey struct{}

func (c *connOfCall) TagConn(ctx context.Context, info *stats.ConnTagInfo) context.Context {
	return context.WithValue(ctx, connKey{}, info.RemoteAddr.String())
}
func (c *connOfCall) HandleConn(context.Context, stats.ConnStats) {}
func (c *connOfCall) TagRPC(ctx context.Context, info *stats.RPCTagInfo) context.Context {
	addr, _ := ctx.Value(connKey{}).(string)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.conns[info.FullMethodName] == nil {
		c.conns[info.FullMethodName] = map[string]bool{}
	}
	c.conns[info.FullMethodName][addr] = true
	return ctx
}
func (c *connOfCall) HandleRPC(context.Context, stats.RPCStats) {}

func (c *connOfCall) of(method string) map[string]bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.conns[method]
}

// Reads of part of a blob and batch reads of small blobs (what a page
// fault waits for) use a connection that whole-blob transfers never use,
// however many connections those are spread over; SharedFaultLane puts
// them back on the first connection.
func TestFaultLane(t *testing.T) {
	const (
		read  = "/google.bytestream.ByteStream/Read"
		batch = "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchReadBlobs"
	)
	for _, tc := range []struct {
		name         string
		opts         remote.Options
		wholeConns   int
		separateLane bool
	}{
		{"own lane", remote.Options{}, 1, true},
		{"own lane, three bulk connections", remote.Options{Connections: 3}, 3, true},
		{"shared", remote.Options{SharedFaultLane: true}, 1, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			whole := &connOfCall{conns: map[string]map[string]bool{}}
			e := start(t, server.Options{}, grpc.StatsHandler(whole))
			c := e.dial(t, tc.opts)
			big, small := blob(2<<20, 1), blob(16<<10, 2)
			bd, sd := digest.Compute(c.DigestFunction(), big), digest.Compute(c.DigestFunction(), small)
			for _, data := range [][]byte{big, small} {
				d := digest.Compute(c.DigestFunction(), data)
				if err := c.Write(ctx, cache.Namespace{}, d, bytes.NewReader(data)); err != nil {
					t.Fatal(err)
				}
			}
			// Whole-blob reads first: their connections are known before
			// any range read.
			for range 6 {
				got, err := cache.ReadAll(ctx, c, cache.Namespace{}, bd)
				if err != nil || !bytes.Equal(got, big) {
					t.Fatalf("whole read of %s: %d bytes, %v", digest.String(bd), len(got), err)
				}
			}
			bulk := map[string]bool{}
			for a := range whole.of(read) {
				bulk[a] = true
			}
			if len(bulk) != tc.wholeConns {
				t.Fatalf("whole-blob reads used %d connections, want %d", len(bulk), tc.wholeConns)
			}
			rc, err := c.ReadRange(ctx, cache.Namespace{}, bd, 1<<20, 16<<10)
			if err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(rc)
			rc.Close()
			if err != nil || !bytes.Equal(got, big[1<<20:1<<20+16<<10]) {
				t.Fatalf("range read: %d bytes, %v", len(got), err)
			}
			got, err = cache.ReadAll(ctx, c, cache.Namespace{}, sd)
			if err != nil || !bytes.Equal(got, small) {
				t.Fatalf("small read: %d bytes, %v", len(got), err)
			}
			lane := map[string]bool{}
			for a := range whole.of(read) {
				if !bulk[a] {
					lane[a] = true
				}
			}
			batches := whole.of(batch)
			if len(batches) != 1 {
				t.Fatalf("batch reads used %d connections, want 1", len(batches))
			}
			for a := range batches {
				if bulk[a] == tc.separateLane {
					t.Errorf("batch read on connection %s; whole-blob connections %v, separate lane wanted: %v", a, bulk, tc.separateLane)
				}
				if tc.separateLane && !lane[a] {
					t.Errorf("range read and batch read on different connections: range %v, batch %s", lane, a)
				}
			}
			if tc.separateLane && len(lane) != 1 {
				t.Errorf("range read on %d connections beside the whole-blob ones, want 1", len(lane))
			}
		})
	}
}
