package nbd

import "math/bits"

// Buffers come from per-size-class pools, from 4 KiB to MaxPayload.
const (
	minBufShift = 12
	bufClasses  = 26 - minBufShift
)

func bufClass(n int) int {
	c := bits.Len(uint(n-1)) - minBufShift
	return max(c, 0)
}

func (s *Server) getBuf(n int) []byte {
	if n == 0 {
		return []byte{}
	}
	c := bufClass(n)
	if p, ok := s.pools[c].Get().(*[]byte); ok {
		return (*p)[:n]
	}
	return make([]byte, n, 1<<(c+minBufShift))
}

func (s *Server) putBuf(b []byte) {
	if cap(b) == 0 {
		return
	}
	c := bufClass(cap(b))
	if cap(b) != 1<<(c+minBufShift) {
		return
	}
	b = b[:cap(b)]
	s.pools[c].Put(&b)
}
