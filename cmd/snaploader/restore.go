package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cow"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/internal/fileio"
	"github.com/snaploader/snaploader/snapshot"
)

// getFlags choose how a snapshot is looked up.
type getFlags struct {
	policy   string
	maxStale string
}

func (f *getFlags) register(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.policy, "read-policy", "local-first", "newest, local-first or local-only")
	cmd.Flags().StringVar(&f.maxStale, "max-stale", "24h", "maximum age of a fallback key's local snapshot (Go duration or days, e.g. 1d)")
}

func (f *getFlags) options() (snapshot.GetOptions, error) {
	p, err := snapshot.ParseReadPolicy(f.policy)
	if err != nil {
		return snapshot.GetOptions{}, err
	}
	d, err := parseDuration(f.maxStale)
	if err != nil {
		return snapshot.GetOptions{}, usagef("--max-stale: %w", err)
	}
	if d <= 0 {
		return snapshot.GetOptions{}, usagef("--max-stale %s: want a positive duration", f.maxStale)
	}
	return snapshot.GetOptions{ReadPolicy: p, MaxStaleFallbackAge: d}, nil
}

// restoreReplaceHint says what --replace does, for restore and pager.
const restoreReplaceHint = "pass --replace to write the snapshot's files into it anyway (files of the same names are replaced, all others left as they are)"

func newRestoreCmd() *cobra.Command {
	var (
		sf      snapshotFlags
		out     string
		replace bool
		asJSON  bool
	)
	cmd := &cobra.Command{
		Use:   "restore",
		Short: "Restore the newest usable snapshot of the task's key set into a directory",
		Long: `restore writes the files of the key set's newest usable snapshot into --out.
--out must not exist (it is created) or be an empty directory: a directory that
holds anything is refused before a byte is written, naming what it holds. With
--replace, restore writes into it anyway: files with the snapshot's file names
are replaced, every other entry is left as it is and listed (on stderr, and as
"other_files" with --json).`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			start := time.Now()
			if out == "" {
				return usagef("--out is required")
			}
			// Before the cache is opened or a snapshot looked up.
			if err := checkOutDir("--out", out, replace, restoreReplaceHint); err != nil {
				return err
			}
			e, snap, err := sf.open(ctx)
			if err != nil {
				return err
			}
			defer e.Close()
			rep, err := restoreTo(ctx, e, snap, out, restoreOptions{replace: replace, progress: !asJSON && stderrIsTerminal()})
			if err != nil {
				return outDirError("--out", err, restoreReplaceHint)
			}
			rep.DurationMS = time.Since(start).Milliseconds()
			if err := e.remoteCheck(); err != nil {
				return err
			}
			if err := e.loader.RemoteDown(); err != nil {
				rep.RemoteError = cliText(err)
			}
			if asJSON {
				return printJSON(os.Stdout, rep)
			}
			fmt.Printf("restored snapshot %s from the %s cache (key ref %q, fallback %d) into %s in %s\n",
				rep.SnapshotID, rep.Source, snap.Key.GetRef(), rep.FallbackIndex, out, time.Duration(rep.DurationMS)*time.Millisecond)
			reportOthers(out, rep.OtherFiles)
			return nil
		},
	}
	sf.register(cmd, "restore this exact snapshot instead of the key set's newest")
	cmd.Flags().StringVar(&out, "out", "", "directory to write the snapshot's files into: created if missing, else it must be empty (see --replace)")
	cmd.Flags().BoolVar(&replace, "replace", false, "write into an --out directory that already holds files: those with the snapshot's file names are replaced, all others are left as they are and listed")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print one JSON object")
	return cmd
}

// restoreReport is the --json output of restore.
type restoreReport struct {
	snapshotReport
	// Files maps each file of the snapshot to the path it was written to.
	Files map[string]string `json:"files"`
	// OtherFiles are the entries --out held that are not the snapshot's
	// files, left as they were (only --replace lets there be any); always
	// present, empty when none.
	OtherFiles []string `json:"other_files"`
}

// restoreOptions configure restoreTo.
type restoreOptions struct {
	// replace lets out hold entries already (snapshot.UnpackOptions.Replace).
	replace bool
	// progress draws a progress bar on stderr.
	progress bool
}

// restoreTo unpacks snap into out and writes every chunked file as a
// regular file (sparse where holes), reading through the lazy store.
// out must be missing or empty unless opts.replace. Unpacking first
// removes the temporary files that killed restores left in out (those no
// live process holds locked); every file is written under a temporary
// name of fileio.TempNameLen bytes whatever its own name, and renamed into
// place when complete.
func restoreTo(ctx context.Context, e *env, snap *snapshot.Snapshot, out string, opts restoreOptions) (*restoreReport, error) {
	u, err := e.loader.UnpackSnapshot(ctx, snap, out, snapshot.UnpackOptions{OnFetch: e.metrics.Fetched, Replace: opts.replace})
	if err != nil {
		return nil, err
	}
	defer u.Close()
	rep := &restoreReport{
		snapshotReport: snapshotReport{
			SnapshotID:     snap.Manifest.GetVmMetadata().GetSnapshotId(),
			Key:            keyJSON(snap.Key),
			ManifestDigest: snap.ManifestKey.GetHash(),
			Source:         string(snap.Source),
			FallbackIndex:  snap.FallbackIndex,
		},
		Files:      u.Files,
		OtherFiles: append([]string{}, u.Others...),
	}
	if rep.Files == nil {
		rep.Files = map[string]string{}
	}
	var total int64
	for _, cf := range snap.Manifest.GetChunkedFiles() {
		for _, c := range cf.GetChunks() {
			total += c.GetDigest().GetSizeBytes()
		}
	}
	bar := newProgress(opts.progress, total, "restoring")
	defer bar.Finish()
	for _, cf := range snap.Manifest.GetChunkedFiles() {
		s := u.Stores[cf.GetName()]
		if s == nil {
			continue // an artifact file stored as chunks, unpacked as a file
		}
		path := filepath.Join(out, cf.GetName())
		if err := writeStore(ctx, s, path, bar.Add); err != nil {
			return nil, fmt.Errorf("writing chunked file %q: %w", cf.GetName(), err)
		}
		rep.Files[cf.GetName()] = path
		rep.ChunkSize = cf.GetChunkSize()
		rep.ChunksTotal += len(cf.GetChunks())
	}
	return rep, nil
}

// writeStore copies a store into a sparse regular file, with a few chunks
// in flight so fetching and writing overlap. Holes stay holes, and so do
// zero runs inside chunks: a chunk whose blob is a file of the local cache
// is copied in the kernel (FICLONERANGE where the filesystem shares
// blocks, else copy_file_range of its data regions, found with
// SEEK_DATA/SEEK_HOLE); a chunk in memory (just fetched, or a private
// copy) is written without its zero pages.
func writeStore(ctx context.Context, s *cow.Store, path string, progress func(int64)) error {
	// A fresh temporary name (never a file the snapshot unpacked, nor a
	// link planted at a predictable name), locked while this process
	// writes it: if the process is killed, the next restore into the
	// directory finds it unlocked and removes it.
	f, err := fileio.CreateTemp(filepath.Dir(path))
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	defer f.Close()
	if err := f.Chmod(0o644); err != nil {
		return err
	}
	if err := f.Truncate(s.Size()); err != nil {
		return err
	}
	w := &chunkWriter{dst: f}
	w.clone.Store(true)
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(writeParallelism)
	bufs := sync.Pool{New: func() any { b := make([]byte, s.ChunkSize()); return &b }}
	for _, c := range s.ChunkedFile().GetChunks() {
		g.Go(func() error {
			if err := gctx.Err(); err != nil {
				return err
			}
			bp := bufs.Get().(*[]byte)
			defer bufs.Put(bp)
			off, n := c.GetOffset(), c.GetDigest().GetSizeBytes()
			done, err := s.WithCleanChunk(off, func(b cache.Blob) error { return w.copyBlob(b, off, n, (*bp)[:n]) })
			if err != nil {
				return err
			}
			if !done {
				if _, err := s.ReadAt((*bp)[:n], off); err != nil {
					return err
				}
				if err := w.writeData((*bp)[:n], off); err != nil {
					return err
				}
			}
			progress(n)
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// writeParallelism is how many chunks writeStore has in flight.
const writeParallelism = 4

// chunkWriter writes chunks into dst at their offsets.
type chunkWriter struct {
	dst *os.File
	// clone is cleared once the filesystem refuses FICLONERANGE, and
	// copied is once copy_file_range is refused: later chunks go the
	// next way down at once.
	clone  atomic.Bool
	nocopy atomic.Bool
}

// rawFiler is a blob whose raw content is an open file (the local cache's).
type rawFiler interface{ File() *os.File }

// storedBlob is a blob served from memory that may be stored in the local
// cache by now (cache.ReadThrough's fetched blobs).
type storedBlob interface{ Stored() cache.Blob }

// copyBlob writes the n bytes of b (a chunk's clean blob) at off, with an
// in-kernel copy when b is a file of the local cache; buf holds n bytes.
func (w *chunkWriter) copyBlob(b cache.Blob, off, n int64, buf []byte) error {
	if sb, ok := b.(storedBlob); ok {
		if st := sb.Stored(); st != nil {
			b = st
		}
	}
	if rf, ok := b.(rawFiler); ok && !w.nocopy.Load() {
		return w.copyFile(rf.File(), off, n, buf)
	}
	if _, err := b.ReadAt(buf, 0); err != nil && err != io.EOF {
		return err
	}
	return w.writeData(buf, off)
}

// copyFile copies the first n bytes of src to off in the kernel, skipping
// src's holes.
func (w *chunkWriter) copyFile(src *os.File, off, n int64, buf []byte) error {
	sfd, dfd := int(src.Fd()), int(w.dst.Fd())
	if w.clone.Load() {
		err := unix.IoctlFileCloneRange(dfd, &unix.FileCloneRange{Src_fd: int64(sfd), Src_length: uint64(n), Dest_offset: uint64(off)})
		if err == nil {
			return nil
		}
		w.clone.Store(false) // not this filesystem (or not this alignment)
	}
	for pos := int64(0); pos < n; {
		data, err := unix.Seek(sfd, pos, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) || (err == nil && data >= n) {
			return nil // the rest is a hole
		}
		if err != nil {
			return fmt.Errorf("finding data of the cached blob at offset %d: %w", pos, err)
		}
		hole, err := unix.Seek(sfd, data, unix.SEEK_HOLE)
		if err != nil {
			return fmt.Errorf("finding holes of the cached blob at offset %d: %w", data, err)
		}
		end := min(hole, n)
		if err := w.copyRange(sfd, data, off+data, end-data, buf); err != nil {
			return err
		}
		pos = end
	}
	return nil
}

// copyRange copies n bytes from sfd at soff to the output at doff with
// copy_file_range, falling back to reading and writing through buf.
func (w *chunkWriter) copyRange(sfd int, soff, doff, n int64, buf []byte) error {
	for n > 0 && !w.nocopy.Load() {
		m, err := unix.CopyFileRange(sfd, &soff, int(w.dst.Fd()), &doff, int(n), 0)
		if err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			if errors.Is(err, unix.EXDEV) || errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EINVAL) {
				w.nocopy.Store(true)
				break
			}
			return fmt.Errorf("copying the cached blob at offset %d to offset %d: %w", soff, doff, err)
		}
		if m == 0 {
			return fmt.Errorf("copying the cached blob at offset %d to offset %d: %d bytes short", soff, doff, n)
		}
		soff, doff, n = soff+int64(m), doff+int64(m), n-int64(m)
	}
	for n > 0 {
		k := min(n, int64(len(buf)))
		m, err := unix.Pread(sfd, buf[:k], soff)
		if err != nil || m == 0 {
			return fmt.Errorf("reading the cached blob at offset %d: %v", soff, err)
		}
		if _, err := w.dst.WriteAt(buf[:m], doff); err != nil {
			return err
		}
		soff, doff, n = soff+int64(m), doff+int64(m), n-int64(m)
	}
	return nil
}

// writeData writes b at off, leaving its zero pages as holes (one write
// per run of data pages).
func (w *chunkWriter) writeData(b []byte, off int64) error {
	const page = cow.PageSize
	run := -1 // start of the pending data run
	for i := 0; i < len(b); i += page {
		zero := digest.IsZero(b[i:min(i+page, len(b))])
		switch {
		case !zero && run < 0:
			run = i
		case zero && run >= 0:
			if _, err := w.dst.WriteAt(b[run:i], off+int64(run)); err != nil {
				return err
			}
			run = -1
		}
	}
	if run >= 0 {
		if _, err := w.dst.WriteAt(b[run:], off+int64(run)); err != nil {
			return err
		}
	}
	return nil
}
