package remote

import (
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"
)

// Conn is the client's connection, for services beside the REAPI ones
// (e.g. the listing service of snaploader serve); calls on it carry the
// client's credentials.
func (c *Client) Conn() grpc.ClientConnInterface { return c.conn }

// faultLane is where the reads a waiting reader needs at once go: reads of
// part of a blob (a page fault's range) and batch reads of small blobs (an
// outboard). grpc-go sends the DATA frames of a connection's streams in
// turn and honours no HTTP/2 priorities, and the megabytes of whole-chunk
// transfers already written to a connection's socket are ahead of any new
// stream's bytes: on a 1 Gbit/s link one 4 MB chunk is 32 ms of queue. A
// connection of its own (one TCP stream, its own flow-control windows)
// keeps the few KiB of a fault out of that queue. Whole blobs never use it.
type faultLane struct {
	conn *grpc.ClientConn // nil when shared (Options.SharedFaultLane)
	cas  repb.ContentAddressableStorageClient
	bs   bspb.ByteStreamClient
}

// dialLane sets up the fault lane: its own connection unless
// Options.SharedFaultLane, else the first connection. grpc.NewClient
// connects on first use, so a client that never reads a range or a small
// blob opens no extra connection.
func (c *Client) dialLane(addr string, dopts []grpc.DialOption) error {
	if c.opts.SharedFaultLane {
		c.lane = faultLane{cas: c.cas, bs: c.bs}
		return nil
	}
	cc, err := grpc.NewClient(addr, dopts...)
	if err != nil {
		return err
	}
	c.lane = faultLane{conn: cc, cas: repb.NewContentAddressableStorageClient(cc), bs: bspb.NewByteStreamClient(cc)}
	return nil
}

// faults is the lane a fault's read takes now: the fault lane, unless its
// connection is failing (it was first dialled while the server could not
// accept, say, and waits out its reconnect backoff), in which case the
// first connection serves faults as it did before there was a lane.
func (c *Client) faults() (repb.ContentAddressableStorageClient, bspb.ByteStreamClient) {
	if c.lane.conn != nil && c.lane.conn.GetState() == connectivity.TransientFailure {
		return c.cas, c.bs
	}
	return c.lane.cas, c.lane.bs
}
