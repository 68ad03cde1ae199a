package testutil

import (
	"io"
	"math/rand/v2"
)

// VM-like images: 4 KiB pages in groups of 16 (64 KiB). 30% of the groups
// are zero (a hole in a sparse store); of the pages of the others, half
// are repetitive (a random record of 8 to 512 bytes repeated to fill the
// page, as arrays of like structures and fill patterns are) and half
// heap-like: 8-byte words whose low 32 bits are random and whose high 32
// bits are one of a few pointer prefixes or zero (as pointers and counters
// are). zstd's fastest level stores such an image in about 0.4x its
// non-zero bytes.
const (
	vmPage  = 4096
	vmGroup = 16 * vmPage
)

// VMImage is a deterministic VM-like image of size bytes for seed.
func VMImage(seed uint64, size int) []byte {
	b := make([]byte, size)
	g := newVMGen(seed)
	for off := 0; off < size; off += vmGroup {
		g.group(b[off:min(off+vmGroup, size)])
	}
	return b
}

// WriteVMImage writes the same bytes as VMImage(seed, size) to w, a group
// at a time.
func WriteVMImage(w io.Writer, seed uint64, size int64) error {
	g := newVMGen(seed)
	buf := make([]byte, 4<<20)
	for off := int64(0); off < size; {
		n := min(int64(len(buf)), size-off)
		for p := int64(0); p < n; p += vmGroup {
			g.group(buf[p:min(p+vmGroup, n)])
		}
		if _, err := w.Write(buf[:n]); err != nil {
			return err
		}
		off += n
	}
	return nil
}

// VMImageNonZero is how many bytes of VMImage(seed, size) are in groups
// that are not zero.
func VMImageNonZero(seed uint64, size int) int64 {
	var n int64
	g := newVMGen(seed)
	buf := make([]byte, vmGroup)
	for off := 0; off < size; off += vmGroup {
		l := min(vmGroup, size-off)
		if !g.group(buf[:l]) {
			n += int64(l)
		}
	}
	return n
}

type vmGen struct{ r *rand.Rand }

func newVMGen(seed uint64) *vmGen { return &vmGen{r: rand.New(rand.NewPCG(seed, 0x564d))} }

func (g *vmGen) fill(b []byte) {
	for i := 0; i < len(b); i += 8 {
		v := g.r.Uint64()
		for k := 0; k < 8 && i+k < len(b); k++ {
			b[i+k] = byte(v >> (8 * k))
		}
	}
}

var vmPrefixes = [...]uint32{0, 0, 0x00007f3a, 0x0000558c}

func (g *vmGen) heap(b []byte) {
	for i := 0; i < len(b); i += 8 {
		v := uint64(g.r.Uint32()) | uint64(vmPrefixes[g.r.IntN(len(vmPrefixes))])<<32
		for k := 0; k < 8 && i+k < len(b); k++ {
			b[i+k] = byte(v >> (8 * k))
		}
	}
}

// group fills b (at most one group) and reports whether it is zero.
func (g *vmGen) group(b []byte) bool {
	if g.r.IntN(10) < 3 {
		clear(b)
		return true
	}
	for p := 0; p < len(b); p += vmPage {
		page := b[p:min(p+vmPage, len(b))]
		if g.r.IntN(2) == 0 {
			g.heap(page)
			continue
		}
		unit := page[:min(8+g.r.IntN(505), len(page))]
		g.fill(unit)
		for i := len(unit); i < len(page); i += len(unit) {
			copy(page[i:], unit)
		}
	}
	return false
}
