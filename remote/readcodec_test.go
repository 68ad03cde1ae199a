package remote

import (
	"bytes"
	"testing"

	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

// split is wire as a BufferSlice of pieces of at most piece bytes, as
// gRPC hands over a message received in several frames.
func split(wire []byte, piece int) mem.BufferSlice {
	var s mem.BufferSlice
	for len(wire) > 0 {
		n := min(piece, len(wire))
		s = append(s, mem.SliceBuffer(bytes.Clone(wire[:n])))
		wire = wire[n:]
	}
	return s
}

func TestReadCodec(t *testing.T) {
	data := bytes.Repeat([]byte("snaploader"), 120_000) // 1.2 MB
	plain, err := proto.Marshal(&bspb.ReadResponse{Data: data})
	if err != nil {
		t.Fatal(err)
	}
	// A field this client does not know, before the data.
	unknown := protowire.AppendTag(nil, 3, protowire.VarintType)
	unknown = protowire.AppendVarint(unknown, 7)
	for _, tc := range []struct {
		name  string
		wire  []byte
		piece int
		want  []byte
		bad   bool
	}{
		{"one piece", plain, len(plain), data, false},
		{"many pieces", plain, 16 << 10, data, false},
		{"empty", nil, 1, nil, false},
		{"unknown field", append(bytes.Clone(unknown), plain...), 1000, data, false},
		{"truncated", plain[:len(plain)-1], 1 << 20, nil, true},
		{"bad tag", []byte{0x80}, 1, nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newReadCodec()
			defer c.release()
			var rr bspb.ReadResponse
			err := c.Unmarshal(split(tc.wire, tc.piece), &rr)
			if tc.bad {
				if err == nil {
					t.Fatal("decoded a malformed message")
				}
				return
			}
			if err != nil || !bytes.Equal(rr.Data, tc.want) {
				t.Fatalf("decoded %d bytes (%v), want %d", len(rr.Data), err, len(tc.want))
			}
			// The next message reuses the buffer and decodes as well.
			small, _ := proto.Marshal(&bspb.ReadResponse{Data: []byte("next")})
			var next bspb.ReadResponse
			if err := c.Unmarshal(split(small, 3), &next); err != nil || string(next.Data) != "next" {
				t.Fatalf("next message: %q, %v", next.Data, err)
			}
		})
	}
	// Other messages go through the default codec.
	c := newReadCodec()
	defer c.release()
	req := &bspb.ReadRequest{ResourceName: "blobs/x/1", ReadOffset: 5}
	out, err := c.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	var got bspb.ReadRequest
	if err := c.Unmarshal(out, &got); err != nil || !proto.Equal(&got, req) {
		t.Fatalf("ReadRequest round trip: %v, %v", &got, err)
	}
}
