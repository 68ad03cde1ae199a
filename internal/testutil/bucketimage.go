package testutil

import (
	"fmt"
	"math/rand/v2"
	"strings"
)

// BucketImage is size bytes of the image the bucket benchmarks use: 30% of
// its MiBs zero, the rest half random and half one repeated byte per MiB.
func BucketImage(seed uint64, size int) []byte {
	rng := rand.New(rand.NewPCG(seed, 18))
	b := make([]byte, size)
	for off := 0; off < size; off += 1 << 20 {
		m := b[off:min(size, off+1<<20)]
		switch k := rng.IntN(100); {
		case k < 30:
		case k < 65:
			for i := range m {
				m[i] = byte(rng.Uint32())
			}
		default:
			c := byte(rng.Uint32())
			for i := range m {
				m[i] = c
			}
		}
	}
	return b
}

// TextLike is size bytes of log-like text: timestamps, numbers and words
// of a Zipf-distributed vocabulary.
func TextLike(seed uint64, size int) []byte {
	rng := rand.New(rand.NewPCG(seed, 7))
	words := make([]string, 4096)
	for i := range words {
		w := make([]byte, 3+rng.IntN(8))
		for j := range w {
			w[j] = byte('a' + rng.IntN(26))
		}
		words[i] = string(w)
	}
	z := rand.NewZipf(rng, 1.1, 4, uint64(len(words)-1))
	var sb strings.Builder
	for sb.Len() < size {
		fmt.Fprintf(&sb, "2026-12-07T19:%02d:%02d.%06dZ level=info pid=%d ", rng.IntN(60), rng.IntN(60), rng.IntN(1e6), 1000+rng.IntN(50))
		for range 4 + rng.IntN(12) {
			sb.WriteString(words[z.Uint64()])
			sb.WriteByte(' ')
		}
		sb.WriteByte('\n')
	}
	return []byte(sb.String()[:size])
}
