package zstdio

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"testing"
	"time"

	"github.com/snaploader/snaploader/internal/testutil"
)

func decodeAll(t testing.TB, z []byte) []byte {
	t.Helper()
	dec, err := NewDecoder(bytes.NewReader(z), MaxWindow)
	if err != nil {
		t.Fatal(err)
	}
	defer dec.Close()
	got, err := io.ReadAll(dec)
	if err != nil {
		t.Fatalf("decoding the seekable object as one stream: %v", err)
	}
	return got
}

func TestSeekableRoundTrip(t *testing.T) {
	enc := NewEncoder()
	for _, tc := range []struct {
		name      string
		data      []byte
		frameSize int
	}{
		{"image, several frames, short last", testutil.BucketImage(1, 3<<20+12345), 256 << 10},
		{"text, one frame", testutil.TextLike(2, 100<<10), 256 << 10},
		{"text, exact frames", testutil.TextLike(3, 1<<20), 64 << 10},
		{"one byte", []byte{7}, 16 << 10},
	} {
		t.Run(tc.name, func(t *testing.T) {
			z := EncodeSeekable(enc, tc.data, tc.frameSize)
			if got := decodeAll(t, z); !bytes.Equal(got, tc.data) {
				t.Fatalf("the whole object decodes to %d bytes that differ from the %d encoded", len(got), len(tc.data))
			}
			size := int64(len(tc.data))
			x, _, err := ParseSeekIndex(z, size)
			if err != nil {
				t.Fatal(err)
			}
			if x.ObjectSize() != int64(len(z)) || x.Offsets[0] != SeekIndexLen(size, int64(tc.frameSize)) {
				t.Fatalf("index: object of %d bytes, frames from %d; want %d and %d", x.ObjectSize(), x.Offsets[0], len(z), SeekIndexLen(size, int64(tc.frameSize)))
			}
			// Any range decodes from its frames alone.
			for _, r := range [][2]int64{{0, 1}, {0, size}, {size / 3, 16 << 10}, {size - 1, 1}, {int64(tc.frameSize) - 1, 2}} {
				off, end := r[0], min(size, r[0]+r[1])
				if off >= size {
					continue
				}
				first, _, cs, ce := x.Frames(off, end)
				got := decodeAll(t, z[cs:ce])
				skip := off - int64(first)*x.FrameSize
				if int64(len(got)) < skip+(end-off) || !bytes.Equal(got[skip:skip+end-off], tc.data[off:end]) {
					t.Errorf("range [%d, %d) from frames at [%d, %d): wrong bytes", off, end, cs, ce)
				}
			}
		})
	}
}

func TestParseSeekIndex(t *testing.T) {
	data := testutil.TextLike(4, 600<<10)
	size := int64(len(data))
	z := EncodeSeekable(NewEncoder(), data, 128<<10)
	single := NewEncoder().EncodeAll(data, nil)
	hlen := int(SeekIndexLen(size, 128<<10))
	flip := func(at int) []byte { b := bytes.Clone(z[:hlen]); b[at] ^= 0x40; return b }
	for _, tc := range []struct {
		name     string
		head     []byte
		size     int64
		want     error // nil: a valid index; ErrShortIndex, ErrNotSeekable, or errBad
		wantNeed int
	}{
		{"whole index", z[:hlen], size, nil, 0},
		{"whole object", z, size, nil, 0},
		{"magic only", z[:4], size, ErrShortIndex, 8},
		{"part of the index", z[:hlen-1], size, ErrShortIndex, hlen},
		{"a single zstd stream", single, size, ErrNotSeekable, 0},
		{"raw content", data, size, ErrNotSeekable, 0},
		{"another size", z[:hlen], size + 1<<20, errBad, 0},
		{"damaged tag", flip(9), size, errBad, 0},
		{"damaged frame size", flip(17), size, errBad, 0},
		{"damaged frame length", flip(hlen - 2), size, errBad, 0},
		{"huge payload length", flip(7), size, errBad, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			x, need, err := ParseSeekIndex(tc.head, tc.size)
			switch {
			case tc.want == nil && (err != nil || x == nil):
				t.Fatalf("got %v, want an index", err)
			case tc.want == errBad && (err == nil || errors.Is(err, ErrShortIndex) || errors.Is(err, ErrNotSeekable)):
				t.Fatalf("got %v, want a malformed index", err)
			case tc.want != nil && tc.want != errBad && !errors.Is(err, tc.want):
				t.Fatalf("got %v, want %v", err, tc.want)
			}
			if need != tc.wantNeed {
				t.Errorf("need = %d, want %d", need, tc.wantNeed)
			}
		})
	}
}

var errBad = errors.New("malformed")

// BenchmarkSeekableFrameSize reports, per frame size, the compression
// ratio (stored/content) of a 16 MiB bucket image (30% zero MiBs, the rest
// half random, half one repeated byte) and of log-like text, cut into 4 MB
// chunks as the loader cuts files, and the time to decode the one frame a
// 16 KiB read needs (frame-decode-µs): the compute part of a fault; the
// transfer part is the frame's compressed size at the link's rate.
//
//	go test -run '^$' -bench SeekableFrameSize ./internal/zstdio/
func BenchmarkSeekableFrameSize(b *testing.B) {
	const chunk = 4096000
	enc := NewEncoder()
	for _, data := range []struct {
		name string
		b    []byte
	}{{"image", testutil.BucketImage(9, 16<<20)}, {"text", testutil.TextLike(9, 16<<20)}} {
		for _, fs := range []int{16 << 10, 64 << 10, 256 << 10, 1 << 20, 2 << 20, 0} {
			name := fmt.Sprintf("%s/frame=%dKiB", data.name, fs>>10)
			if fs == 0 {
				name = data.name + "/single-stream"
			}
			b.Run(name, func(b *testing.B) {
				var stored, content int64
				var frames [][]byte
				for off := 0; off < len(data.b); off += chunk {
					c := data.b[off:min(len(data.b), off+chunk)]
					var z []byte
					if fs == 0 {
						z = enc.EncodeAll(c, nil)
					} else {
						z = EncodeSeekable(enc, c, fs)
						x, _, err := ParseSeekIndex(z, int64(len(c)))
						if err != nil {
							b.Fatal(err)
						}
						for i := range len(x.Offsets) - 1 {
							frames = append(frames, z[x.Offsets[i]:x.Offsets[i+1]])
						}
					}
					stored += int64(min(len(z), len(c))) // incompressible chunks are stored raw
					content += int64(len(c))
				}
				if fs == 0 {
					frames = [][]byte{enc.EncodeAll(data.b[:chunk], nil)}
				}
				dec, err := NewDecoder(nil, MaxWindow)
				if err != nil {
					b.Fatal(err)
				}
				defer dec.Close()
				var buf []byte
				i := 0
				start := time.Now()
				for b.Loop() {
					if buf, err = dec.DecodeAll(frames[i%len(frames)], buf[:0]); err != nil {
						b.Fatal(err)
					}
					i++
				}
				b.ReportMetric(float64(time.Since(start).Microseconds())/float64(i), "frame-decode-µs")
				b.ReportMetric(float64(stored)/float64(content), "stored/content")
			})
		}
	}
}

func TestCheckSeekable(t *testing.T) {
	data := testutil.TextLike(5, 700<<10)
	size := int64(len(data))
	z := EncodeSeekable(NewEncoder(), data, 128<<10)
	x, _, err := ParseSeekIndex(z, size)
	if err != nil {
		t.Fatal(err)
	}
	// Two frame lengths changed so that they still add up: the frames no
	// longer start where the index says.
	shifted := bytes.Clone(z)
	binary.LittleEndian.PutUint32(shifted[seekFixed:], uint32(x.Offsets[1]-x.Offsets[0]+1))
	binary.LittleEndian.PutUint32(shifted[seekFixed+4:], uint32(x.Offsets[2]-x.Offsets[1]-1))
	longer := bytes.Clone(z)
	binary.LittleEndian.PutUint32(longer[seekFixed:], uint32(x.Offsets[1]-x.Offsets[0]+1))
	for _, tc := range []struct {
		name string
		obj  []byte
		ok   bool
	}{
		{"as written", z, true},
		{"one zstd stream", NewEncoder().EncodeAll(data, nil), true},
		{"frames shifted", shifted, false},
		{"frames longer than the object", longer, false},
		{"truncated", z[:len(z)-1], false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := CheckSeekable(tc.obj, size); (err == nil) != tc.ok {
				t.Errorf("CheckSeekable: %v, want ok=%v", err, tc.ok)
			}
		})
	}
}
