package snapshot

import (
	"bytes"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/protobuf/proto"

	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/proto/snapshotpb"
)

func TestChunkTreeOutboards(t *testing.T) {
	d := func(s string, n int64) *repb.Digest {
		return digest.Compute(digest.BLAKE3, bytes.Repeat([]byte(s), int(n)))
	}
	enc := func(cf *snapshotpb.ChunkedFile) []byte {
		b, err := proto.MarshalOptions{Deterministic: true}.Marshal(ChunkedFileTree(cf))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	old := &snapshotpb.ChunkedFile{Name: "memory.img", Size: 3 * 4096, ChunkSize: 4096, Chunks: []*snapshotpb.Chunk{
		{Offset: 0, Digest: d("a", 4096)}, {Offset: 8192, Digest: d("b", 4096)},
	}}
	// A tree saved without outboards decodes and encodes to the same bytes
	// (so to the same tree digest).
	b := enc(old)
	got, err := decodeTree("memory.img", b)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(enc(got), b) {
		t.Fatal("a tree without outboards changed when read back")
	}
	withOB := proto.Clone(old).(*snapshotpb.ChunkedFile)
	withOB.Chunks[1].Outboard = d("o", 200)
	got, err = decodeTree("memory.img", enc(withOB))
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(got, withOB) {
		t.Fatalf("outboards lost: got %v, want %v", got, withOB)
	}
	tr := ChunkedFileTree(withOB)
	tr.Root.Files[1].NodeProperties.Properties[0].Value = "zz/12"
	tb, _ := proto.Marshal(tr)
	if _, err := decodeTree("memory.img", tb); err == nil {
		t.Fatal("a malformed outboard property was accepted")
	}
}
