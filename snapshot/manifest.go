package snapshot

import (
	"fmt"
	"path/filepath"
	"strconv"
	"strings"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cow"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/internal/fileio"
	"github.com/snaploader/snaploader/proto/snapshotpb"
)

// Tree node property names of a chunked file's root directory.
const (
	propSize      = "size"
	propChunkSize = "chunk_size"
	// propArtifact marks an artifact file stored as chunks ("1").
	propArtifact = "artifact"
	// propOutboard, a chunk FileNode's property, is "<hash>/<size>": the
	// blob of the chunk's BLAKE3 outboard (see snapshotpb.Chunk.outboard).
	propOutboard = "outboard"
)

// maxFileSize bounds sizes a manifest may claim (1 PiB).
const maxFileSize = 1 << 50

func invalidf(format string, args ...any) error {
	return status.Error(codes.InvalidArgument, fmt.Sprintf(format, args...))
}

// MaxNameBytes bounds a snapshot file name, so that a name saved can always
// be restored: NAME_MAX is 255 bytes, and restoring writes through a
// temporary name that adds a suffix to it.
const MaxNameBytes = 200

// ValidateName checks that a file name from a manifest is a plain base name
// that cannot escape the directory it is unpacked into and that any
// filesystem can hold (at most MaxNameBytes bytes).
func ValidateName(name string) error {
	switch {
	case name == "", name == ".", name == "..":
		return invalidf("file name %q is not a file name", name)
	case len(name) > MaxNameBytes:
		return invalidf("file name %.40q... is %d bytes long; names are limited to %d bytes", name, len(name), MaxNameBytes)
	case fileio.IsTempName(name):
		return invalidf("file name %q has the form of a restore's temporary file", name)
	case strings.ContainsAny(name, "/\\\x00"):
		return invalidf("file name %q contains a path separator or NUL", name)
	case strings.ContainsFunc(name, func(r rune) bool { return r < ' ' || r == 0x7f }):
		return invalidf("file name %q contains a control character", name)
	case filepath.IsAbs(name), filepath.Base(name) != name:
		return invalidf("file name %q is not a base name", name)
	}
	return nil
}

// ChunkedFileTree encodes a chunked file as a REAPI Tree: root directory with
// node properties size and chunk_size, one file per stored chunk named by
// its decimal offset.
func ChunkedFileTree(cf *snapshotpb.ChunkedFile) *repb.Tree {
	dir := &repb.Directory{
		NodeProperties: &repb.NodeProperties{Properties: []*repb.NodeProperty{
			{Name: propChunkSize, Value: strconv.FormatInt(cf.GetChunkSize(), 10)},
			{Name: propSize, Value: strconv.FormatInt(cf.GetSize(), 10)},
		}},
	}
	if cf.GetArtifact() {
		dir.NodeProperties.Properties = append(dir.NodeProperties.Properties, &repb.NodeProperty{Name: propArtifact, Value: "1"})
	}
	for _, c := range cf.GetChunks() {
		fn := &repb.FileNode{Name: strconv.FormatInt(c.GetOffset(), 10), Digest: c.GetDigest()}
		if ob := c.GetOutboard(); ob != nil {
			fn.NodeProperties = &repb.NodeProperties{Properties: []*repb.NodeProperty{
				{Name: propOutboard, Value: ob.GetHash() + "/" + strconv.FormatInt(ob.GetSizeBytes(), 10)},
			}}
		}
		dir.Files = append(dir.Files, fn)
	}
	return &repb.Tree{Root: dir}
}

// ChunkedFileFromTree decodes and validates the Tree of chunked file name.
func ChunkedFileFromTree(name string, t *repb.Tree) (*snapshotpb.ChunkedFile, error) {
	root := t.GetRoot()
	if root == nil {
		return nil, invalidf("chunked file %q: tree has no root directory", name)
	}
	cf := &snapshotpb.ChunkedFile{Name: name, Size: -1, ChunkSize: -1}
	for _, p := range root.GetNodeProperties().GetProperties() {
		if err := setDirProperty(cf, p.GetName(), p.GetValue()); err != nil {
			return nil, err
		}
	}
	if cf.Size < 0 || cf.ChunkSize < 0 {
		return nil, invalidf("chunked file %q: tree lacks the %q and %q properties or they are negative", name, propSize, propChunkSize)
	}
	for _, f := range root.GetFiles() {
		off, err := chunkOffset(name, f.GetName())
		if err != nil {
			return nil, err
		}
		c := &snapshotpb.Chunk{Offset: off, Digest: f.GetDigest()}
		for _, p := range f.GetNodeProperties().GetProperties() {
			if p.GetName() != propOutboard {
				continue
			}
			ob, err := parseOutboard(p.GetValue())
			if err != nil {
				return nil, invalidf("chunked file %q: chunk at offset %d: property %s=%q: %v", name, off, propOutboard, p.GetValue(), err)
			}
			c.Outboard = ob
		}
		cf.Chunks = append(cf.Chunks, c)
	}
	if err := cow.ValidateChunkedFile(cf); err != nil {
		return nil, err
	}
	return cf, nil
}

// setDirProperty applies a property of a chunk tree's root directory to cf.
func setDirProperty(cf *snapshotpb.ChunkedFile, name, value string) error {
	if name == propArtifact {
		cf.Artifact = value == "1"
		return nil
	}
	v, err := strconv.ParseInt(value, 10, 64)
	if err != nil {
		return invalidf("chunked file %q: property %s=%q is not an integer", cf.GetName(), name, value)
	}
	switch name {
	case propSize:
		cf.Size = v
	case propChunkSize:
		cf.ChunkSize = v
	}
	return nil
}

// chunkOffset parses the name of a chunk's FileNode, its decimal offset.
func chunkOffset(file, name string) (int64, error) {
	off, err := strconv.ParseInt(name, 10, 64)
	if err != nil || strconv.FormatInt(off, 10) != name {
		return 0, invalidf("chunked file %q: chunk name %q is not a decimal offset", file, name)
	}
	return off, nil
}

// parseOutboard parses an outboard property value, "<hash>/<size>".
func parseOutboard(v string) (*repb.Digest, error) {
	h, sz, ok := strings.Cut(v, "/")
	n, err := strconv.ParseInt(sz, 10, 64)
	if !ok || err != nil || strconv.FormatInt(n, 10) != sz {
		return nil, fmt.Errorf("not <hash>/<size>")
	}
	d := &repb.Digest{Hash: h, SizeBytes: n}
	if err := digest.Validate(d); err != nil {
		return nil, err
	}
	return d, nil
}

// ManifestActionResult encodes a manifest as an ActionResult: auxiliary
// metadata = [VM configuration, VM metadata, copies of small blobs (when
// inline is given), seal]; output files = artifact files; output
// directories = chunked files (path = name, tree digest). treeDigests maps
// chunked file names to their stored tree digests.
func ManifestActionResult(m *snapshotpb.SnapshotManifest, treeDigests map[string]*repb.Digest, inline ...*snapshotpb.InlineBlob) (*repb.ActionResult, error) {
	cfg, err := anypb.New(m.GetVmConfiguration())
	if err != nil {
		return nil, fmt.Errorf("encoding VM configuration: %w", err)
	}
	vm := proto.Clone(m.GetVmMetadata()).(*snapshotpb.VMMetadata)
	vm.Format = sealedFormat
	md, err := anypb.New(vm)
	if err != nil {
		return nil, fmt.Errorf("encoding VM metadata: %w", err)
	}
	ar := &repb.ActionResult{
		OutputFiles:       m.GetFiles(),
		ExecutionMetadata: &repb.ExecutedActionMetadata{AuxiliaryMetadata: []*anypb.Any{cfg, md}},
	}
	for _, cf := range m.GetChunkedFiles() {
		td, ok := treeDigests[cf.GetName()]
		if !ok {
			return nil, fmt.Errorf("chunked file %q has no stored tree", cf.GetName())
		}
		ar.OutputDirectories = append(ar.OutputDirectories, &repb.OutputDirectory{Path: cf.GetName(), TreeDigest: td})
	}
	if len(inline) > 0 {
		blobs, err := anypb.New(&snapshotpb.InlineBlobs{Blobs: inline})
		if err != nil {
			return nil, fmt.Errorf("encoding inline blobs: %w", err)
		}
		ar.ExecutionMetadata.AuxiliaryMetadata = append(ar.ExecutionMetadata.AuxiliaryMetadata, blobs)
	}
	seal, err := anypb.New(&snapshotpb.ManifestSeal{Sha256: sealHash(ar)})
	if err != nil {
		return nil, fmt.Errorf("encoding manifest seal: %w", err)
	}
	ar.ExecutionMetadata.AuxiliaryMetadata = append(ar.ExecutionMetadata.AuxiliaryMetadata, seal)
	return ar, nil
}

// sealedFormat is VMMetadata.format of manifests that carry a ManifestSeal.
const sealedFormat = 2

// sealHash is the integrity hash of a manifest ActionResult: H over every
// auxiliary metadata entry but the seal (type URL and value bytes, which
// caches keep verbatim) and the path, digest and executable bit of every
// output file and directory. It covers what a restore uses and nothing a
// cache may legitimately add or re-encode.
func sealHash(ar *repb.ActionResult) string {
	parts := []string{"snaploader manifest seal v1"}
	for _, a := range ar.GetExecutionMetadata().GetAuxiliaryMetadata() {
		if a.MessageIs((*snapshotpb.ManifestSeal)(nil)) {
			continue
		}
		parts = append(parts, "aux", a.GetTypeUrl(), string(a.GetValue()))
	}
	for _, f := range ar.GetOutputFiles() {
		parts = append(parts, "file", f.GetPath(), digest.String(f.GetDigest()), strconv.FormatBool(f.GetIsExecutable()))
	}
	for _, d := range ar.GetOutputDirectories() {
		parts = append(parts, "dir", d.GetPath(), digest.String(d.GetTreeDigest()))
	}
	return digest.StringListHash(parts...)
}

// checkSeal verifies a manifest's seal: a sealed manifest must match it, a
// manifest whose metadata says it is sealed must carry one, and an older
// manifest without one is accepted as it is.
func checkSeal(ar *repb.ActionResult, md *snapshotpb.VMMetadata) error {
	var seals []*snapshotpb.ManifestSeal
	for _, a := range ar.GetExecutionMetadata().GetAuxiliaryMetadata() {
		s := &snapshotpb.ManifestSeal{}
		if a.MessageIs(s) {
			if err := a.UnmarshalTo(s); err != nil {
				return cache.Corruptf("manifest: decoding its seal: %v", err)
			}
			seals = append(seals, s)
		}
	}
	switch {
	case len(seals) > 1:
		return cache.Corruptf("manifest has %d seals", len(seals))
	case len(seals) == 0 && md.GetFormat() >= sealedFormat:
		return cache.Corruptf("manifest of format %d has no seal: the entry was altered", md.GetFormat())
	case len(seals) == 0:
		return nil
	case seals[0].GetSha256() != sealHash(ar):
		return cache.Corruptf("manifest does not match its seal: the entry was altered or corrupted")
	}
	return nil
}

// decodedManifest is a manifest ActionResult whose trees are not yet read.
type decodedManifest struct {
	config   *snapshotpb.VMConfiguration
	metadata *snapshotpb.VMMetadata
	files    []*repb.OutputFile
	trees    []*repb.OutputDirectory
	function digest.Function
}

// decodeManifest validates a manifest ActionResult's own fields.
func decodeManifest(ar *repb.ActionResult) (*decodedManifest, error) {
	aux := ar.GetExecutionMetadata().GetAuxiliaryMetadata()
	dm := &decodedManifest{config: &snapshotpb.VMConfiguration{}, metadata: &snapshotpb.VMMetadata{}}
	var haveCfg, haveMD bool
	for _, a := range aux {
		switch {
		case a.MessageIs(dm.config):
			if err := a.UnmarshalTo(dm.config); err != nil {
				return nil, invalidf("manifest: decoding VM configuration: %v", err)
			}
			haveCfg = true
		case a.MessageIs(dm.metadata):
			if err := a.UnmarshalTo(dm.metadata); err != nil {
				return nil, invalidf("manifest: decoding VM metadata: %v", err)
			}
			haveMD = true
		}
	}
	if !haveCfg || !haveMD {
		for _, a := range aux {
			se := &snapshotpb.SealedEntry{}
			if a.MessageIs(se) && a.UnmarshalTo(se) == nil {
				return nil, status.Errorf(codes.FailedPrecondition, "manifest is encrypted under key id %s: pass --encryption-key-file with a key file holding it", se.GetKeyId())
			}
		}
		return nil, invalidf("manifest: auxiliary metadata lacks the VM configuration or metadata")
	}
	if err := checkSeal(ar, dm.metadata); err != nil {
		return nil, err
	}
	fn, err := digest.ParseFunction(dm.metadata.GetDigestFunction())
	if err != nil {
		return nil, invalidf("manifest: %v", err)
	}
	dm.function = fn
	names := map[string]bool{}
	for _, f := range ar.GetOutputFiles() {
		if err := ValidateName(f.GetPath()); err != nil {
			return nil, fmt.Errorf("manifest artifact file: %w", err)
		}
		if err := digest.Validate(f.GetDigest()); err != nil {
			return nil, invalidf("manifest artifact file %q: %v", f.GetPath(), err)
		}
		if f.GetDigest().GetSizeBytes() > maxFileSize {
			return nil, invalidf("manifest artifact file %q: absurd size %d", f.GetPath(), f.GetDigest().GetSizeBytes())
		}
		if names[f.GetPath()] {
			return nil, invalidf("manifest: duplicate file name %q", f.GetPath())
		}
		names[f.GetPath()] = true
		dm.files = append(dm.files, f)
	}
	for _, d := range ar.GetOutputDirectories() {
		if err := ValidateName(d.GetPath()); err != nil {
			return nil, fmt.Errorf("manifest chunked file: %w", err)
		}
		if err := digest.Validate(d.GetTreeDigest()); err != nil {
			return nil, invalidf("manifest chunked file %q: tree %v", d.GetPath(), err)
		}
		if d.GetTreeDigest().GetSizeBytes() > 256<<20 {
			return nil, invalidf("manifest chunked file %q: tree of %d bytes is absurd", d.GetPath(), d.GetTreeDigest().GetSizeBytes())
		}
		if names[d.GetPath()] {
			return nil, invalidf("manifest: duplicate file name %q", d.GetPath())
		}
		names[d.GetPath()] = true
		dm.trees = append(dm.trees, d)
	}
	return dm, nil
}
