package remote

import (
	"fmt"
	"sync"

	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
)

// readCodec is the codec of one ByteStream read: it decodes each
// ReadResponse with one copy, from gRPC's receive buffers into a buffer of
// its own that the next message reuses, where the default codec copies the
// message out of those buffers and then the data out of the message into
// a freshly allocated slice. A response's Data is valid until the next
// message is received: the stream's reader consumes it before that. Other
// messages go through the default codec.
type readCodec struct {
	buf *[]byte // from msgBufs; nil once released
}

// msgBufs hold received ReadResponses: a server's messages carry up to
// about a MiB of data.
var msgBufs = sync.Pool{New: func() any { b := make([]byte, 0, chunkBytes+4<<10); return &b }}

func newReadCodec() *readCodec { return &readCodec{buf: msgBufs.Get().(*[]byte)} }

// release returns the buffer; the codec must not decode afterwards.
func (c *readCodec) release() {
	if c.buf != nil {
		msgBufs.Put(c.buf)
		c.buf = nil
	}
}

func (c *readCodec) Name() string { return "proto" }

func (c *readCodec) Marshal(v any) (mem.BufferSlice, error) {
	return encoding.GetCodecV2("proto").Marshal(v)
}

func (c *readCodec) Unmarshal(data mem.BufferSlice, v any) error {
	rr, ok := v.(*bspb.ReadResponse)
	if !ok || c.buf == nil {
		return encoding.GetCodecV2("proto").Unmarshal(data, v)
	}
	n := data.Len()
	if cap(*c.buf) < n {
		*c.buf = make([]byte, 0, n)
	}
	b := (*c.buf)[:n]
	data.CopyTo(b)
	rr.Reset()
	for len(b) > 0 {
		num, typ, k := protowire.ConsumeTag(b)
		if k < 0 {
			return fmt.Errorf("decoding a ByteStream read response: %w", protowire.ParseError(k))
		}
		b = b[k:]
		if num == 10 && typ == protowire.BytesType { // data
			val, k := protowire.ConsumeBytes(b)
			if k < 0 {
				return fmt.Errorf("decoding the data of a ByteStream read response: %w", protowire.ParseError(k))
			}
			rr.Data, b = val, b[k:]
			continue
		}
		k = protowire.ConsumeFieldValue(num, typ, b)
		if k < 0 {
			return fmt.Errorf("decoding field %d of a ByteStream read response: %w", num, protowire.ParseError(k))
		}
		b = b[k:]
	}
	return nil
}
