package snapshot

import (
	"fmt"
	"math/rand/v2"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/proto/snapshotpb"
)

// slowDecodeTree is the reference: the full protobuf decoder, then
// ChunkedFileFromTree.
func slowDecodeTree(name string, b []byte) (*snapshotpb.ChunkedFile, error) {
	t := &repb.Tree{}
	if err := proto.Unmarshal(b, t); err != nil {
		return nil, err
	}
	return ChunkedFileFromTree(name, t)
}

func testChunkedFile(chunks int, outboards, artifact bool) *snapshotpb.ChunkedFile {
	const cs = 4096000
	cf := &snapshotpb.ChunkedFile{Name: "memory.img", ChunkSize: cs, Size: max(0, int64(chunks)*cs-1000), Artifact: artifact}
	for i := range chunks {
		size := int64(cs)
		if i == chunks-1 {
			size = cs - 1000
		}
		c := &snapshotpb.Chunk{Offset: int64(i) * cs, Digest: digest.Compute(digest.BLAKE3, []byte(fmt.Sprint(i)))}
		c.Digest.SizeBytes = size
		if outboards && i%2 == 0 {
			c.Outboard = digest.Compute(digest.BLAKE3, []byte(fmt.Sprint("ob", i)))
		}
		cf.Chunks = append(cf.Chunks, c)
	}
	return cf
}

// TestDecodeTreeMatchesProtobuf checks the one-pass decoder against the
// full decoder: on the trees save writes (which it must decode itself), on
// trees in other shapes, and on every single-bit corruption of them, the
// two give the same chunked file or both refuse it.
func TestDecodeTreeMatchesProtobuf(t *testing.T) {
	withExtras := func(cf *snapshotpb.ChunkedFile, f func(*repb.Tree)) []byte {
		tr := ChunkedFileTree(cf)
		f(tr)
		b, err := proto.Marshal(tr)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	plain := func(cf *snapshotpb.ChunkedFile) []byte { return withExtras(cf, func(*repb.Tree) {}) }
	cases := []struct {
		name string
		tree []byte
		fast bool // decoded in one pass
	}{
		{"chunks", plain(testChunkedFile(5, false, false)), true},
		{"chunks with outboards", plain(testChunkedFile(5, true, false)), true},
		{"artifact", plain(testChunkedFile(3, false, true)), true},
		{"no chunks", plain(testChunkedFile(0, false, false)), true},
		{"executable bit", withExtras(testChunkedFile(2, false, false), func(tr *repb.Tree) { tr.Root.Files[0].IsExecutable = true }), true},
		{"file mtime", withExtras(testChunkedFile(2, true, false), func(tr *repb.Tree) {
			tr.Root.Files[1].NodeProperties = &repb.NodeProperties{Mtime: timestamppb.New(timestamppb.Now().AsTime())}
		}), false},
		{"child directory", withExtras(testChunkedFile(2, false, false), func(tr *repb.Tree) {
			tr.Children = []*repb.Directory{{Files: []*repb.FileNode{{Name: "x"}}}}
		}), false},
		{"symlink", withExtras(testChunkedFile(2, false, false), func(tr *repb.Tree) {
			tr.Root.Symlinks = []*repb.SymlinkNode{{Name: "l", Target: "t"}}
		}), false},
		{"root in two parts", rootInParts(t, testChunkedFile(3, true, false)), false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			want, werr := slowDecodeTree("memory.img", tc.tree)
			if werr != nil {
				t.Fatalf("reference decoder: %v", werr)
			}
			if _, ok := decodeChunkTree("memory.img", tc.tree); ok != tc.fast {
				t.Errorf("one-pass decoder took it: %v, want %v", ok, tc.fast)
			}
			got, err := decodeTree("memory.img", tc.tree)
			if err != nil || !proto.Equal(got, want) {
				t.Fatalf("decodeTree = %v, %v; want %v", got, err, want)
			}
			// Every single-bit corruption, and random garbage spliced in.
			rng := rand.New(rand.NewPCG(1, 2))
			mutants := 0
			for i := range len(tc.tree) * 8 {
				b := append([]byte(nil), tc.tree...)
				b[i/8] ^= 1 << (i % 8)
				mutants += compareDecoders(t, b)
			}
			for range 200 {
				b := append([]byte(nil), tc.tree...)
				at := rng.IntN(len(b))
				for j := at; j < min(len(b), at+1+rng.IntN(8)); j++ {
					b[j] = byte(rng.Uint32())
				}
				mutants += compareDecoders(t, b)
			}
			t.Logf("%d of the corruptions still decode", mutants)
		})
	}
}

// compareDecoders fails t unless decodeTree and the reference agree on b;
// it returns 1 if b decodes.
func compareDecoders(t *testing.T, b []byte) int {
	t.Helper()
	want, werr := slowDecodeTree("memory.img", b)
	if werr == nil {
		dropUnknown(want.ProtoReflect()) // the one-pass decoder keeps no unknown fields
	}
	got, err := decodeTree("memory.img", b)
	if err == nil {
		dropUnknown(got.ProtoReflect())
	}
	switch {
	case (err == nil) != (werr == nil):
		t.Fatalf("tree %x: decodeTree error %v, reference error %v", b, err, werr)
	case err == nil && !proto.Equal(got, want):
		t.Fatalf("tree %x: decodeTree = %v, reference %v", b, got, want)
	case err == nil:
		return 1
	}
	return 0
}

// rootInParts encodes cf's tree as two Tree messages, the root's properties
// in the first and its files in the second, which protobuf merges.
func rootInParts(t *testing.T, cf *snapshotpb.ChunkedFile) []byte {
	root := ChunkedFileTree(cf).GetRoot()
	a, err := proto.Marshal(&repb.Tree{Root: &repb.Directory{NodeProperties: root.GetNodeProperties()}})
	if err != nil {
		t.Fatal(err)
	}
	b, err := proto.Marshal(&repb.Tree{Root: &repb.Directory{Files: root.GetFiles()}})
	if err != nil {
		t.Fatal(err)
	}
	return append(a, b...)
}

// dropUnknown clears the unknown fields of m and of every message in it.
func dropUnknown(m protoreflect.Message) {
	m.SetUnknown(nil)
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		switch {
		case fd.IsList() && fd.Message() != nil:
			for i := 0; i < v.List().Len(); i++ {
				dropUnknown(v.List().Get(i).Message())
			}
		case fd.Message() != nil && !fd.IsMap():
			dropUnknown(v.Message())
		}
		return true
	})
}
