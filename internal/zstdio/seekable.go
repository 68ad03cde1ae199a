package zstdio

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/klauspost/compress/zstd"
)

// The seekable layout: content cut into frames of a fixed number of
// uncompressed bytes (the last one shorter), each an independent zstd
// frame, preceded by a seek index in a zstd skippable frame, so that the
// whole is still one valid zstd stream (decoders skip the index) and a
// reader holding the index fetches and decodes only the frames a range
// needs:
//
//	index:  magic 0x184D2A5E (uint32 LE), payload length (uint32 LE),
//	        payload: "SLSEEK01", frame size (uint32 LE), frame count
//	        (uint32 LE), then each frame's compressed length (uint32 LE)
//	frames: frame 0, frame 1, ... (zstd frames, back to back)
//
// The index comes first so that the first bytes of an object tell its
// layout and, in the same response, where every frame lies.
const (
	// SeekMagic is the skippable frame magic of the seek index.
	SeekMagic = 0x184D2A5E
	seekTag   = "SLSEEK01"
	// seekFixed is the index's size without its per-frame entries.
	seekFixed = 8 + len(seekTag) + 8
	// DefaultFrameSize is the uncompressed size of a frame: small enough
	// that a 16 KiB read fetches and decodes little more than itself, large
	// enough that the frames lose little compression (see README, "On-disk
	// and cache formats").
	DefaultFrameSize = 256 << 10
	// MaxFrameSize bounds the frame size a reader accepts.
	MaxFrameSize = 16 << 20
	// zstdMagic starts every zstd (data) frame.
	zstdMagic = 0xFD2FB528
)

// SeekIndex is where the frames of a seekable object lie.
type SeekIndex struct {
	// FrameSize is the uncompressed size of every frame but the last.
	FrameSize int64
	// Size is the content's size.
	Size int64
	// Offsets are the frames' offsets in the object, and the object's size
	// last (len = frames + 1); Offsets[0] is the index's own length.
	Offsets []int64
}

// Frames returns the frames [first, last) that hold content [off, end)
// and the object's bytes [cstart, cend) that hold them.
func (x *SeekIndex) Frames(off, end int64) (first, last int, cstart, cend int64) {
	first = int(off / x.FrameSize)
	last = int((end + x.FrameSize - 1) / x.FrameSize)
	last = min(max(last, first+1), len(x.Offsets)-1)
	return first, last, x.Offsets[first], x.Offsets[last]
}

// ObjectSize is the size of the whole object.
func (x *SeekIndex) ObjectSize() int64 { return x.Offsets[len(x.Offsets)-1] }

// SeekIndexLen is the length of the index of content of size bytes in
// frames of frameSize.
func SeekIndexLen(size, frameSize int64) int64 {
	return int64(seekFixed) + 4*frameCount(size, frameSize)
}

func frameCount(size, frameSize int64) int64 {
	return max(1, (size+frameSize-1)/frameSize)
}

// MaxFrameOverhead bounds what a frame of n content bytes may take beyond
// n: the encoder stores incompressible blocks raw (a 3-byte header per
// block, which may be as small as 1 KiB), plus the frame header and
// checksum.
func MaxFrameOverhead(n int64) int64 { return n/256 + 64 }

// EncodeSeekable returns src in the seekable layout, in frames of frameSize
// encoded with enc (whose EncodeAll is safe for concurrent use).
func EncodeSeekable(enc *zstd.Encoder, src []byte, frameSize int) []byte {
	n := int(frameCount(int64(len(src)), int64(frameSize)))
	hdr := int(SeekIndexLen(int64(len(src)), int64(frameSize)))
	out := make([]byte, hdr, hdr+len(src)/2)
	binary.LittleEndian.PutUint32(out, SeekMagic)
	binary.LittleEndian.PutUint32(out[4:], uint32(hdr-8))
	copy(out[8:], seekTag)
	binary.LittleEndian.PutUint32(out[8+len(seekTag):], uint32(frameSize))
	binary.LittleEndian.PutUint32(out[12+len(seekTag):], uint32(n))
	for i := range n {
		start := len(out)
		out = enc.EncodeAll(src[i*frameSize:min(len(src), (i+1)*frameSize)], out)
		binary.LittleEndian.PutUint32(out[seekFixed+4*i:], uint32(len(out)-start))
	}
	return out
}

// ErrShortIndex says more of the object's first bytes are needed to read
// its index: ParseSeekIndex's need tells how many.
var ErrShortIndex = errors.New("seek index: more bytes needed")

// ErrNotSeekable says the object does not start with a seek index (a
// single zstd stream, or raw content).
var ErrNotSeekable = errors.New("not in the seekable layout")

// ParseSeekIndex reads the index at the start of head, the first bytes of
// an object holding content of size bytes. It returns ErrNotSeekable when
// the object has no index, ErrShortIndex (with need, the index's length)
// when head holds only part of it, and another error when the index is
// malformed (the object is corrupt).
func ParseSeekIndex(head []byte, size int64) (x *SeekIndex, need int, err error) {
	if len(head) < 8 {
		return nil, 8, ErrShortIndex
	}
	if binary.LittleEndian.Uint32(head) != SeekMagic {
		return nil, 0, ErrNotSeekable
	}
	plen := int64(binary.LittleEndian.Uint32(head[4:]))
	if plen < int64(seekFixed-8) || plen > int64(seekFixed)+4*(size+1) {
		return nil, 0, fmt.Errorf("seek index of %d bytes for %d bytes of content", plen, size)
	}
	if int64(len(head)) < 8+plen {
		return nil, int(8 + plen), ErrShortIndex
	}
	p := head[8 : 8+plen]
	if string(p[:len(seekTag)]) != seekTag {
		return nil, 0, fmt.Errorf("seek index tag %q", p[:len(seekTag)])
	}
	fs := int64(binary.LittleEndian.Uint32(p[len(seekTag):]))
	n := int64(binary.LittleEndian.Uint32(p[len(seekTag)+4:]))
	if fs <= 0 || fs > MaxFrameSize || n != frameCount(size, fs) || int64(seekFixed)+4*n != 8+plen {
		return nil, 0, fmt.Errorf("seek index of %d frames of %d bytes for %d bytes of content", n, fs, size)
	}
	x = &SeekIndex{FrameSize: fs, Size: size, Offsets: make([]int64, n+1)}
	x.Offsets[0] = 8 + plen
	for i := range n {
		c := int64(binary.LittleEndian.Uint32(p[int64(len(seekTag))+8+4*i:]))
		content := min(fs, size-i*fs)
		if c < 4 || c > content+MaxFrameOverhead(content) {
			return nil, 0, fmt.Errorf("seek index: frame %d of %d bytes holding %d bytes of content", i, c, content)
		}
		x.Offsets[i+1] = x.Offsets[i] + c
	}
	return x, 0, nil
}

// CheckSeekable checks that an object holding content of size bytes, when
// it starts with a seek index, is what its index describes: frames that
// start where it says and end with the object. An object without an index
// (one zstd stream) passes.
func CheckSeekable(obj []byte, size int64) error {
	x, _, err := ParseSeekIndex(obj, size)
	switch {
	case errors.Is(err, ErrNotSeekable):
		return nil
	case err != nil:
		return err
	case x.ObjectSize() != int64(len(obj)):
		return fmt.Errorf("seek index: frames end at %d in an object of %d bytes", x.ObjectSize(), len(obj))
	}
	for i, off := range x.Offsets[:len(x.Offsets)-1] {
		if !IsZstdFrame(obj[off:]) {
			return fmt.Errorf("seek index: no zstd frame %d at offset %d", i, off)
		}
	}
	return nil
}

// IsZstdFrame reports whether b starts with a zstd data frame's magic.
func IsZstdFrame(b []byte) bool {
	return len(b) >= 4 && binary.LittleEndian.Uint32(b) == zstdMagic
}
