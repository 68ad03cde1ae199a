package cow

import (
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/proto/snapshotpb"
)

// ValidateChunkedFile checks a ChunkedFile from an untrusted manifest: a
// plain base name, 0 <= size <= MaxSize, a chunk size that is a positive
// multiple of PageSize up to MaxChunkSize, and chunks at distinct offsets
// that are multiples of the chunk size below the size, each with a valid
// digest of exactly min(chunk_size, size-offset) bytes. Any violation is an
// InvalidArgument error naming the file and the offending chunk.
func ValidateChunkedFile(cf *snapshotpb.ChunkedFile) error {
	if cf == nil {
		return status.Error(codes.InvalidArgument, "chunked file is nil")
	}
	name := cf.GetName()
	bad := func(format string, args ...any) error {
		return status.Errorf(codes.InvalidArgument, "chunked file %q: "+format, append([]any{name}, args...)...)
	}
	if name == "" || name == "." || name == ".." || strings.ContainsAny(name, "/\\\x00") {
		return bad("name must be a plain base name")
	}
	size, cs := cf.GetSize(), cf.GetChunkSize()
	if size < 0 || size > MaxSize {
		return bad("size %d is outside [0, %d]", size, int64(MaxSize))
	}
	if err := checkChunkSize(cs); err != nil {
		return bad("%v", err)
	}
	seen := newChunkSet(size/cs+1, len(cf.GetChunks()))
	for i, c := range cf.GetChunks() {
		off := c.GetOffset()
		switch {
		case off < 0 || off >= size:
			return bad("chunk %d: offset %d is outside the file's size %d", i, off, size)
		case off%cs != 0:
			return bad("chunk %d: offset %d is not a multiple of the chunk size %d", i, off, cs)
		case !seen.add(off / cs):
			return bad("chunk %d: offset %d is listed twice", i, off)
		}
		d := c.GetDigest()
		if err := digest.Validate(d); err != nil {
			return bad("chunk at offset %d: %v", off, err)
		}
		if want := min(cs, size-off); d.GetSizeBytes() != want {
			return bad("chunk at offset %d: digest %s has size %d, want %d", off, digest.String(d), d.GetSizeBytes(), want)
		}
	}
	return nil
}

// chunkSet is a set of chunk indexes below n: a bitmap when the file's
// chunks are listed densely enough that it costs at most 8 bytes per listed
// chunk (a restore checks every chunk of a large guest), a map otherwise
// (a sparse file, or a hostile size).
type chunkSet struct {
	bits []uint64
	m    map[int64]bool
}

func newChunkSet(n int64, listed int) chunkSet {
	if n <= 64*int64(listed)+64 {
		return chunkSet{bits: make([]uint64, (n+63)/64)}
	}
	return chunkSet{m: make(map[int64]bool, listed)}
}

// add adds i and reports whether it was absent.
func (s chunkSet) add(i int64) bool {
	if s.bits == nil {
		if s.m[i] {
			return false
		}
		s.m[i] = true
		return true
	}
	w, b := i/64, uint64(1)<<(i%64)
	if s.bits[w]&b != 0 {
		return false
	}
	s.bits[w] |= b
	return true
}
