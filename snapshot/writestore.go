package snapshot

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"

	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cow"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
	"github.com/snaploader/snaploader/internal/fileio"
)

// WriteStore copies a store into a sparse regular file at path (atomically:
// a locked temporary file renamed into place), with a few chunks
// in flight so fetching and writing overlap. Holes stay holes, and so do
// zero runs inside chunks: a chunk whose blob is a file of the local cache
// is copied in the kernel (FICLONERANGE where the filesystem shares
// blocks, else copy_file_range of its data regions, found with
// SEEK_DATA/SEEK_HOLE); a chunk in memory (just fetched, or a private
// copy) is written without its zero pages.
// progress, when set, is told of every chunk's bytes as they are written.
// Errors name the file and keep their kind (a full disk is
// ResourceExhausted).
func WriteStore(ctx context.Context, s *cow.Store, path string, progress func(int64)) error {
	if progress == nil {
		progress = func(int64) {}
	}
	if err := writeStore(ctx, s, path, progress); err != nil {
		return errkind.IO(err, "writing %s", path)
	}
	return nil
}

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
	// Scratch buffers, only for the chunks that are neither in memory
	// nor in a file of the local cache (and for copies the kernel
	// refuses): one per chunk in flight at most, reused.
	bufs := sync.Pool{New: func() any { b := make([]byte, s.ChunkSize()); return &b }}
	for _, c := range s.ChunkedFile().GetChunks() {
		g.Go(func() error {
			if err := gctx.Err(); err != nil {
				return err
			}
			off, n := c.GetOffset(), c.GetDigest().GetSizeBytes()
			done, err := s.WithCleanChunk(off, func(b cache.Blob) error { return w.copyBlob(b, off, n, &bufs) })
			if err != nil {
				return err
			}
			if !done {
				bp := bufs.Get().(*[]byte)
				defer bufs.Put(bp)
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

// writeParallelism is how many chunks WriteStore has in flight.
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

// copyBlob writes the n bytes of b (a chunk's clean blob) at off: from
// memory without a copy when b's bytes are there (just fetched), with an
// in-kernel copy when they are a file of the local cache, else through a
// scratch buffer of bufs.
func (w *chunkWriter) copyBlob(b cache.Blob, off, n int64, bufs *sync.Pool) error {
	written := false
	err := b.WithContents(func(c cache.Contents) error {
		switch {
		case int64(len(c.Mem)) >= n:
			written = true
			return w.writeData(c.Mem[:n], off)
		case c.File != nil && !w.nocopy.Load():
			written = true
			bp := bufs.Get().(*[]byte)
			defer bufs.Put(bp)
			return w.copyFile(c.File, off, n, (*bp)[:n])
		}
		return nil
	})
	if err != nil || written {
		return err
	}
	bp := bufs.Get().(*[]byte)
	defer bufs.Put(bp)
	buf := (*bp)[:n]
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
