package gc

import (
	"encoding/hex"
	"slices"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"

	"github.com/snaploader/snaploader/digest"
)

// blobKey names a blob compactly (40 bytes): its 32-byte hash, and its
// size with the digest function in the low two bits. BLAKE3 and SHA-256
// both have 32-byte hashes.
type blobKey struct {
	hash [32]byte
	sf   uint64
}

func functionCode(fn digest.Function) (uint64, bool) {
	switch fn {
	case digest.BLAKE3:
		return 1, true
	case digest.SHA256:
		return 2, true
	}
	return 0, false
}

// keyOf returns d's compact key; ok is false for a digest of another
// function or hash length (never collected, never marked).
func keyOf(fn digest.Function, d *repb.Digest) (blobKey, bool) {
	var k blobKey
	c, ok := functionCode(fn)
	if !ok || len(d.GetHash()) != 64 || d.GetSizeBytes() < 0 || d.GetSizeBytes() >= 1<<61 {
		return k, false
	}
	if _, err := hex.Decode(k.hash[:], []byte(d.GetHash())); err != nil {
		return k, false
	}
	k.sf = uint64(d.GetSizeBytes())<<2 | c
	return k, true
}

func compareKeys(a, b blobKey) int {
	if c := slices.Compare(a.hash[:], b.hash[:]); c != 0 {
		return c
	}
	switch {
	case a.sf < b.sf:
		return -1
	case a.sf > b.sf:
		return 1
	}
	return 0
}

// keySet is a set of blob keys: appended to, then frozen (sorted,
// deduplicated) and searched.
type keySet struct {
	keys   []blobKey
	frozen bool
	// compacted is the length at the last freeze of a growing set.
	compacted int
}

func (s *keySet) add(k blobKey) { s.keys = append(s.keys, k); s.frozen = false }

func (s *keySet) freeze() {
	slices.SortFunc(s.keys, compareKeys)
	s.keys = slices.CompactFunc(s.keys, func(a, b blobKey) bool { return a == b })
	s.keys = slices.Clip(s.keys)
	s.frozen = true
}

// index returns k's position in the frozen set, or -1.
func (s *keySet) index(k blobKey) int {
	if !s.frozen {
		panic("gc: keySet searched before freeze")
	}
	i, ok := slices.BinarySearchFunc(s.keys, k, compareKeys)
	if !ok {
		return -1
	}
	return i
}

func (s *keySet) has(k blobKey) bool { return s.index(k) >= 0 }

func (s *keySet) len() int { return len(s.keys) }
