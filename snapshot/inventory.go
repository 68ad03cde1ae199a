package snapshot

import (
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"

	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/proto/snapshotpb"
)

// ManifestInfo is what an inventory or a garbage collector needs of a
// manifest entry: its metadata and the blobs it names directly.
type ManifestInfo struct {
	Config   *snapshotpb.VMConfiguration
	Metadata *snapshotpb.VMMetadata
	// Function is the digest function of every blob the manifest names.
	Function digest.Function
	// Files are the artifact files (whole blobs).
	Files []*repb.OutputFile
	// Trees are the chunked files: name and tree digest. A tree blob lists
	// the file's chunks (DecodeTree).
	Trees []*repb.OutputDirectory
}

// DecodeManifestEntry decodes and validates an action-cache entry as a
// snapshot manifest (seal included). Entries that are not manifests
// (version entries, foreign action results) are an InvalidArgument error;
// a manifest altered since it was sealed is DataLoss.
func DecodeManifestEntry(ar *repb.ActionResult) (*ManifestInfo, error) {
	dm, err := decodeManifest(ar)
	if err != nil {
		return nil, err
	}
	return &ManifestInfo{Config: dm.config, Metadata: dm.metadata, Function: dm.function, Files: dm.files, Trees: dm.trees}, nil
}

// DecodeTree parses and validates the stored tree blob of chunked file
// name.
func DecodeTree(name string, b []byte) (*snapshotpb.ChunkedFile, error) {
	return decodeTree(name, b)
}

// RemoteSnapshotIDManifestKey is the remote action-cache key under which
// the manifest of snapshot id of instance is stored besides its snapshot
// key's: RemoteManifestKey(SnapshotIDKey(instance, id)).
func RemoteSnapshotIDManifestKey(instance, id string) (*repb.Digest, error) {
	return RemoteManifestKey(SnapshotIDKey(instance, id))
}
