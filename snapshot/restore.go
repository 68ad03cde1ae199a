package snapshot

import (
	"context"
	"fmt"
	"path/filepath"
)

// RestoreOptions configure Restore.
type RestoreOptions struct {
	UnpackOptions
	// Progress, when set, is told of the bytes of every chunk written.
	Progress func(n int64)
}

// Restored is what Restore wrote.
type Restored struct {
	// Files maps every file of the snapshot to its path.
	Files map[string]string
	// Others are the entries dir held besides the snapshot's own files
	// (only with UnpackOptions.Replace).
	Others []string
	// ChunkSize is the chunked files' chunk size and ChunksTotal how many
	// chunks they list.
	ChunkSize   int64
	ChunksTotal int
}

// Restore writes snap's files into dir as regular files: artifact files
// as they are, chunked files (guest memory, disks) as sparse files read
// through the lazy store, chunks in the local cache copied in the kernel.
// dir must not exist or be an empty directory unless opts.Replace (see
// CheckUnpackDir). Every file is written under a temporary name and
// renamed into place when complete.
func (l *Loader) Restore(ctx context.Context, snap *Snapshot, dir string, opts RestoreOptions) (*Restored, error) {
	u, err := l.UnpackSnapshot(ctx, snap, dir, opts.UnpackOptions)
	if err != nil {
		return nil, err
	}
	defer u.Close()
	r := &Restored{Files: u.Files, Others: append([]string{}, u.Others...)}
	for _, cf := range snap.Manifest.GetChunkedFiles() {
		s := u.Stores[cf.GetName()]
		if s == nil {
			continue // an artifact file stored as chunks, unpacked as a file
		}
		path := filepath.Join(dir, cf.GetName())
		if err := WriteStore(ctx, s, path, opts.Progress); err != nil {
			return nil, fmt.Errorf("writing chunked file %q: %w", cf.GetName(), err)
		}
		r.Files[cf.GetName()] = path
		r.ChunkSize = cf.GetChunkSize()
		r.ChunksTotal += len(cf.GetChunks())
	}
	return r, nil
}

// ChunkedBytes is the bytes of stored chunks snap's chunked files list:
// what Restore writes of them, at most.
func ChunkedBytes(snap *Snapshot) int64 {
	var n int64
	for _, cf := range snap.Manifest.GetChunkedFiles() {
		for _, c := range cf.GetChunks() {
			n += c.GetDigest().GetSizeBytes()
		}
	}
	return n
}
