package cow

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync/atomic"

	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/internal/fileio"
)

// Region is a byte range [Off, Off+Len) of a file.
type Region struct {
	Off, Len int64
}

// DataRegions lists the data regions of f (size bytes) with
// SEEK_DATA/SEEK_HOLE, ascending and clipped to size. A filesystem that
// cannot report holes is an error: a diff read whole would overwrite every
// clean page with zeros.
func DataRegions(f *os.File, size int64) ([]Region, error) {
	fd := int(f.Fd())
	var out []Region
	for off := int64(0); off < size; {
		d, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break
		}
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP) {
			return nil, status.Errorf(codes.InvalidArgument, "finding data regions of %s: its filesystem cannot report holes (SEEK_DATA: %v)", f.Name(), err)
		}
		if err != nil {
			return nil, status.Errorf(codes.Unavailable, "finding data regions of %s at offset %d: %v", f.Name(), off, err)
		}
		if d >= size {
			break
		}
		h, err := unix.Seek(fd, d, unix.SEEK_HOLE)
		if err != nil {
			return nil, status.Errorf(codes.Unavailable, "finding the hole after offset %d of %s: %v", d, f.Name(), err)
		}
		h = min(h, size)
		out = append(out, Region{Off: d, Len: h - d})
		off = h
	}
	return out, nil
}

// DiffStats describes what a MergeDiff did.
type DiffStats struct {
	// DiffSize is the diff's size; OldSize the store's size before.
	DiffSize, OldSize int64
	// DataRegions and DataBytes describe the diff's data regions: the
	// pages dirtied since the base snapshot.
	DataRegions int
	DataBytes   int64
	// BytesRead counts the bytes read from the diff.
	BytesRead int64
	// ChunksWritten counts the chunks the diff wrote into (now dirty).
	ChunksWritten int
}

// MergeDiffFile merges the sparse diff file at path into s: see MergeDiff.
// Only the file's data regions (SEEK_DATA/SEEK_HOLE) are read, so the cost
// follows the dirty bytes, not the memory size.
func (s *Store) MergeDiffFile(ctx context.Context, path string) (DiffStats, error) {
	f, err := fileio.OpenRegular(path)
	if err != nil {
		return DiffStats{}, status.Errorf(status.Code(err), "merging diff %s into chunked file %q: %v", path, s.name, status.Convert(err).Message())
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return DiffStats{}, fmt.Errorf("merging diff %s into chunked file %q: %w", path, s.name, err)
	}
	regions, err := DataRegions(f, fi.Size())
	if err != nil {
		return DiffStats{}, fmt.Errorf("merging diff into chunked file %q: %w", s.name, err)
	}
	st, err := s.MergeDiff(ctx, f, fi.Size(), regions)
	if err != nil {
		return st, fmt.Errorf("merging diff %s: %w", path, err)
	}
	return st, nil
}

// MergeDiff writes the given data regions of a diff over s, as a VMM's
// diff snapshot (Firecracker's snapshot_type "Diff") describes the memory
// it was restored from: the diff is as long as the memory, and its data
// regions are the pages dirtied since, whatever they hold (a data region of
// zeros is a page that became zero). Bytes outside the regions are never
// read and keep the store's content. The chunks written become dirty, so
// the next Save hashes and stores only them.
//
// A diff longer than the store grows it (the new area is zeros outside the
// regions); a shorter one is an InvalidArgument error, as a store never
// shrinks and a shorter diff is not a diff of this memory. Chunks are
// merged in parallel; a chunk the diff covers only partly is first copied
// from its base blob. Merging does not record the chunks as touched
// (no read-ahead, no working set).
func (s *Store) MergeDiff(ctx context.Context, r io.ReaderAt, size int64, regions []Region) (DiffStats, error) {
	st := DiffStats{DiffSize: size, OldSize: s.Size(), DataRegions: len(regions)}
	if s.closed.Load() {
		return st, s.errClosed("merging a diff into", 0)
	}
	if size < st.OldSize {
		return st, status.Errorf(codes.InvalidArgument,
			"diff of chunked file %q has %d bytes, fewer than the base's %d: a diff snapshot is as long as the memory it was taken of (a store never shrinks)",
			s.name, size, st.OldSize)
	}
	var prev int64
	for i, rg := range regions {
		if rg.Off < prev || rg.Len <= 0 || rg.Off+rg.Len > size {
			return st, status.Errorf(codes.InvalidArgument, "diff of chunked file %q: data region %d [%d, +%d) is unordered, empty or beyond its size %d", s.name, i, rg.Off, rg.Len, size)
		}
		prev = rg.Off + rg.Len
		st.DataBytes += rg.Len
	}
	if size > st.OldSize {
		if err := s.Resize(size); err != nil {
			return st, err
		}
	}

	// Split the regions at chunk boundaries and group the pieces by chunk.
	type piece struct{ off, n int64 }
	var chunks [][]piece
	lastIdx := int64(-1)
	for _, rg := range regions {
		for o := rg.Off; o < rg.Off+rg.Len; {
			idx := o / s.cs
			end := min(rg.Off+rg.Len, (idx+1)*s.cs)
			if idx != lastIdx {
				chunks = append(chunks, nil)
				lastIdx = idx
			}
			chunks[len(chunks)-1] = append(chunks[len(chunks)-1], piece{o, end - o})
			o = end
		}
	}
	st.ChunksWritten = len(chunks)

	var read atomic.Int64
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(s.opts.Parallelism)
	for _, ps := range chunks {
		g.Go(func() error {
			if err := gctx.Err(); err != nil {
				return err
			}
			bp := s.getBuf()
			defer s.bufs.Put(bp)
			idx := ps[0].off / s.cs
			clen := s.chunkLen(idx, size)
			c := s.lookupOrCreate(idx)
			for _, p := range ps {
				buf := (*bp)[:p.n]
				n, err := r.ReadAt(buf, p.off)
				read.Add(int64(n))
				if n < len(buf) {
					if err == nil || errors.Is(err, io.EOF) {
						err = io.ErrUnexpectedEOF
					}
					return status.Errorf(codes.Unavailable, "reading the diff of chunked file %q at offset %d (%d bytes): %v", s.name, p.off, p.n, err)
				}
				if err := s.writeChunk(c, buf, p.off-idx*s.cs, clen); err != nil {
					return err
				}
			}
			return nil
		})
	}
	err := g.Wait()
	st.BytesRead = read.Load()
	if err != nil {
		return st, fmt.Errorf("merging a diff into chunked file %q: %w", s.name, err)
	}
	return st, nil
}

// CarryWorkingSet records the chunks at offsets (a working set recorded in
// the snapshot the store was opened from) as touched, in that order, ahead
// of later touches, without fetching them: a save of a store that no VM
// ran from (a merged diff) keeps the working set its base recorded.
// Offsets of holes, beyond the size or already touched are skipped.
func (s *Store) CarryWorkingSet(offsets []int64) {
	size := s.Size()
	var add []int64
	for _, off := range offsets {
		if off < 0 || off >= size || off%s.cs != 0 {
			continue
		}
		c := s.lookup(off / s.cs)
		if c == nil || c.touched.Swap(true) {
			continue
		}
		add = append(add, off)
	}
	s.touchMu.Lock()
	s.touched = append(add, s.touched...)
	s.touchMu.Unlock()
}
