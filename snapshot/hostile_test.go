package snapshot

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/proto/snapshotpb"
)

func TestHostileManifestsRejected(t *testing.T) {
	ctx := context.Background()
	h := newHost(t, nil, Options{})
	mem, files := vmFiles(t, t.TempDir(), 31, 1<<20)
	ks := h.keys(t, taskOn("main", "", ""))
	key := ks.GetBranchKey()
	h.save(t, key, mem, files, false)
	ns := h.loader.Namespace(key)
	mk, err := LocalManifestKey("", key)
	if err != nil {
		t.Fatal(err)
	}
	good, err := h.local.GetActionResult(ctx, ns, mk)
	if err != nil {
		t.Fatal(err)
	}
	goodTree := &repb.Tree{}
	b, err := os.ReadFile(h.local.Path(ns, good.GetOutputDirectories()[0].GetTreeDigest()))
	if err != nil {
		t.Fatal(err)
	}
	if err := proto.Unmarshal(b, goodTree); err != nil {
		t.Fatal(err)
	}
	// withTree stores a modified tree and points the manifest at it.
	withTree := func(mod func(*repb.Tree)) func(*repb.ActionResult) {
		return func(ar *repb.ActionResult) {
			tr := proto.Clone(goodTree).(*repb.Tree)
			mod(tr)
			tb, err := proto.Marshal(tr)
			if err != nil {
				t.Fatal(err)
			}
			d := digest.Compute(ns.Function, tb)
			if err := h.local.Write(ctx, ns, d, strings.NewReader(string(tb))); err != nil {
				t.Fatal(err)
			}
			ar.OutputDirectories[0].TreeDigest = d
		}
	}
	setProp := func(name, value string) func(*repb.Tree) {
		return func(tr *repb.Tree) {
			for _, p := range tr.Root.NodeProperties.Properties {
				if p.Name == name {
					p.Value = value
				}
			}
		}
	}
	for _, tc := range []struct {
		name string
		mod  func(*repb.ActionResult)
		want string
	}{
		{"file name with slash", func(ar *repb.ActionResult) { ar.OutputFiles[0].Path = "a/b" }, "path separator"},
		{"file name dot-dot", func(ar *repb.ActionResult) { ar.OutputFiles[0].Path = ".." }, "not a file name"},
		{"absolute file name", func(ar *repb.ActionResult) { ar.OutputFiles[0].Path = "/etc/passwd" }, "path separator"},
		{"traversal in chunked name", func(ar *repb.ActionResult) { ar.OutputDirectories[0].Path = "../../x" }, "path separator"},
		{"negative file size", func(ar *repb.ActionResult) { ar.OutputFiles[0].Digest.SizeBytes = -1 }, "negative size"},
		{"absurd file size", func(ar *repb.ActionResult) { ar.OutputFiles[0].Digest.SizeBytes = 1 << 60 }, "absurd size"},
		{"duplicate names", func(ar *repb.ActionResult) { ar.OutputDirectories[0].Path = ar.OutputFiles[0].Path }, "duplicate file name"},
		{"missing metadata", func(ar *repb.ActionResult) { ar.ExecutionMetadata = nil }, "lacks the VM configuration"},
		{"tree without properties", withTree(func(tr *repb.Tree) { tr.Root.NodeProperties = nil }), "lacks the"},
		{"negative size", withTree(setProp(propSize, "-5")), "lacks the"},
		{"absurd size", withTree(setProp(propSize, "1152921504606846976")), "is outside [0,"},
		{"chunk size not page multiple", withTree(setProp(propChunkSize, "1000")), "multiple of 4096"},
		{"unaligned offset", withTree(func(tr *repb.Tree) { tr.Root.Files[0].Name = "4096" }), "not a multiple of the chunk size"},
		{"offset beyond size", withTree(func(tr *repb.Tree) { tr.Root.Files[0].Name = "1099511627776" }), "outside"},
		{"duplicate offsets", withTree(func(tr *repb.Tree) { tr.Root.Files[1].Name = tr.Root.Files[0].Name }), "listed twice"},
		{"non-decimal offset", withTree(func(tr *repb.Tree) { tr.Root.Files[0].Name = "0x10" }), "not a decimal offset"},
		{"chunk digest size wrong", withTree(func(tr *repb.Tree) { tr.Root.Files[0].Digest.SizeBytes = 5 }), "want 65536"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ar := proto.Clone(good).(*repb.ActionResult)
			tc.mod(ar)
			reseal(t, ar) // a hostile writer can compute the seal too
			if err := h.local.UpdateActionResult(ctx, ns, mk, ar); err != nil {
				t.Fatal(err)
			}
			_, err := h.loader.GetSnapshot(ctx, ks, GetOptions{ReadPolicy: LocalOnly})
			if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v, want InvalidArgument containing %q", err, tc.want)
			}
		})
	}

	// An artifact file stored as chunks that declares a huge size and lists
	// no chunk: unpacking it walks the chunks listed, not every offset up
	// to the size (2^31 offsets here), so it ends at once with a sparse file.
	t.Run("huge declared size, no chunks", func(t *testing.T) {
		const huge = 1 << 43
		ar := proto.Clone(good).(*repb.ActionResult)
		withTree(func(tr *repb.Tree) {
			tr.Root.Files = nil
			setProp(propSize, strconv.Itoa(huge))(tr)
			setProp(propChunkSize, "4096")(tr)
			tr.Root.NodeProperties.Properties = append(tr.Root.NodeProperties.Properties, &repb.NodeProperty{Name: propArtifact, Value: "1"})
		})(ar)
		reseal(t, ar)
		if err := h.local.UpdateActionResult(ctx, ns, mk, ar); err != nil {
			t.Fatal(err)
		}
		snap, err := h.loader.GetSnapshot(ctx, ks, GetOptions{ReadPolicy: LocalOnly})
		if err != nil {
			t.Fatal(err)
		}
		// A guard against a hang, not a measurement: the walk over every
		// offset took minutes.
		uctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		defer cancel()
		out := t.TempDir()
		u, err := h.loader.UnpackSnapshot(uctx, snap, out, UnpackOptions{})
		if err != nil {
			t.Fatal(err)
		}
		defer u.Close()
		name := ar.OutputDirectories[0].Path
		fi, err := os.Stat(filepath.Join(out, name))
		if err != nil || fi.Size() != huge {
			t.Fatalf("unpacked %s: %v, %v; want %d bytes", name, fi, err, huge)
		}
	})
}

func TestCorruptChunkDetected(t *testing.T) {
	ctx := context.Background()
	h := newHost(t, nil, Options{})
	mem, files := vmFiles(t, t.TempDir(), 32, 1<<20)
	ks := h.keys(t, taskOn("main", "", ""))
	res := h.save(t, ks.GetBranchKey(), mem, files, false)
	ns := h.loader.Namespace(ks.GetBranchKey())
	c := res.Manifest.GetChunkedFiles()[0].GetChunks()[0]
	p := h.local.Path(ns, c.GetDigest())
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	b[100] ^= 0xff
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	// A fresh process's view of the cache after a crash tore the file.
	h2 := reopenBoot(t, h, "after-a-crash")
	snap, err := h2.loader.GetSnapshot(ctx, ks, GetOptions{ReadPolicy: LocalOnly})
	if err != nil {
		t.Fatal(err)
	}
	u, err := h2.loader.UnpackSnapshot(ctx, snap, t.TempDir(), UnpackOptions{ReadAhead: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	buf := make([]byte, 10)
	_, err = u.Stores["memory.img"].ReadAt(buf, c.GetOffset())
	if err == nil || !strings.Contains(err.Error(), c.GetDigest().GetHash()) {
		t.Errorf("reading a corrupt chunk: got %v, want an error naming digest %s", err, c.GetDigest().GetHash())
	}
}

// reseal replaces a manifest's seal with one matching its contents.
func reseal(t *testing.T, ar *repb.ActionResult) {
	t.Helper()
	if ar.ExecutionMetadata == nil {
		return
	}
	aux := ar.ExecutionMetadata.AuxiliaryMetadata[:0]
	for _, a := range ar.ExecutionMetadata.AuxiliaryMetadata {
		if !a.MessageIs((*snapshotpb.ManifestSeal)(nil)) {
			aux = append(aux, a)
		}
	}
	ar.ExecutionMetadata.AuxiliaryMetadata = aux
	seal, err := anypb.New(&snapshotpb.ManifestSeal{Sha256: sealHash(ar)})
	if err != nil {
		t.Fatal(err)
	}
	ar.ExecutionMetadata.AuxiliaryMetadata = append(aux, seal)
}

// Every single-bit flip in an encoded manifest, wherever it is stored, is
// either rejected or decodes to exactly the same manifest.
func TestManifestBitFlipsAreDetected(t *testing.T) {
	m := &snapshotpb.SnapshotManifest{
		VmConfiguration: &snapshotpb.VMConfiguration{Vcpus: 2, MemoryBytes: 1 << 30},
		VmMetadata:      &snapshotpb.VMMetadata{SnapshotId: "snap", DigestFunction: "blake3", LastExecutedTask: &snapshotpb.VMTask{TaskId: "t"}},
		Files:           []*repb.OutputFile{{Path: "art", Digest: digest.Compute(digest.BLAKE3, []byte("art"))}},
		ChunkedFiles:    []*snapshotpb.ChunkedFile{{Name: "mem", Size: 1 << 20, ChunkSize: 1 << 16}},
	}
	tree := digest.Compute(digest.BLAKE3, []byte("tree"))
	ar, err := ManifestActionResult(m, map[string]*repb.Digest{"mem": tree})
	if err != nil {
		t.Fatal(err)
	}
	want, err := decodeManifest(ar)
	if err != nil {
		t.Fatal(err)
	}
	enc, err := proto.Marshal(ar)
	if err != nil {
		t.Fatal(err)
	}
	same := func(a, b *decodedManifest) bool {
		if !proto.Equal(a.config, b.config) || !proto.Equal(a.metadata, b.metadata) || a.function != b.function || len(a.files) != len(b.files) || len(a.trees) != len(b.trees) {
			return false
		}
		for i := range a.files {
			if !proto.Equal(a.files[i], b.files[i]) {
				return false
			}
		}
		for i := range a.trees {
			if !proto.Equal(a.trees[i], b.trees[i]) {
				return false
			}
		}
		return true
	}
	undetected := 0
	for bit := 0; bit < len(enc)*8; bit++ {
		b := append([]byte(nil), enc...)
		b[bit/8] ^= 1 << (bit % 8)
		got := &repb.ActionResult{}
		if proto.Unmarshal(b, got) != nil {
			continue
		}
		dm, err := decodeManifest(got)
		if err == nil && !same(dm, want) {
			undetected++
			t.Errorf("bit %d flipped: decoded a different manifest without error", bit)
		}
	}
	if undetected > 0 {
		t.Fatalf("%d of %d bit flips changed the manifest undetected", undetected, len(enc)*8)
	}
}

// A manifest without a seal, written before seals existed, still loads;
// one that claims the sealed format and lacks a seal does not.
func TestManifestSealFormats(t *testing.T) {
	m := &snapshotpb.SnapshotManifest{VmConfiguration: &snapshotpb.VMConfiguration{}, VmMetadata: &snapshotpb.VMMetadata{DigestFunction: "blake3"}}
	ar, err := ManifestActionResult(m, nil)
	if err != nil {
		t.Fatal(err)
	}
	strip := func(ar *repb.ActionResult) *repb.ActionResult {
		ar = proto.Clone(ar).(*repb.ActionResult)
		ar.ExecutionMetadata.AuxiliaryMetadata = ar.ExecutionMetadata.AuxiliaryMetadata[:2]
		return ar
	}
	old := strip(ar)
	md := &snapshotpb.VMMetadata{}
	if err := old.ExecutionMetadata.AuxiliaryMetadata[1].UnmarshalTo(md); err != nil {
		t.Fatal(err)
	}
	md.Format = 0
	a, _ := anypb.New(md)
	old.ExecutionMetadata.AuxiliaryMetadata[1] = a
	for _, tc := range []struct {
		name string
		ar   *repb.ActionResult
		ok   bool
	}{
		{"sealed", ar, true},
		{"written before seals", old, true},
		{"sealed format without its seal", strip(ar), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := decodeManifest(tc.ar)
			if (err == nil) != tc.ok {
				t.Fatalf("decodeManifest: %v, want ok=%v", err, tc.ok)
			}
			if err != nil && status.Code(err) != codes.DataLoss {
				t.Fatalf("got %v, want Internal (corrupt)", err)
			}
		})
	}
}
