// Package digest computes and checks REAPI digests (BLAKE3 by default,
// SHA-256 for caches that speak only SHA-256) and the fixed string-list and
// proto hashes that snaploader's cache keys are built from.
package digest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"strings"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/snaploader/snaploader/errkind"
	"github.com/zeebo/blake3"
	"google.golang.org/protobuf/proto"
)

// Function is a REAPI digest function.
type Function = repb.DigestFunction_Value

const (
	// BLAKE3 is the default digest function for snapshot data.
	BLAKE3 = repb.DigestFunction_BLAKE3
	// SHA256 is supported for caches that only accept SHA-256.
	SHA256 = repb.DigestFunction_SHA256
)

// Default is the digest function used when none is configured.
const Default = BLAKE3

// HashLen is the length in hex characters of both supported hashes.
const HashLen = 64

// New returns a fresh hasher for fn.
func New(fn Function) (hash.Hash, error) {
	switch fn {
	case BLAKE3:
		return blake3.New(), nil
	case SHA256:
		return sha256.New(), nil
	}
	return nil, fmt.Errorf("unsupported digest function %v", fn)
}

// MustNew is New for functions already validated.
func MustNew(fn Function) hash.Hash {
	h, err := New(fn)
	if err != nil {
		panic(err)
	}
	return h
}

// Compute returns the digest of data.
func Compute(fn Function, data []byte) *repb.Digest {
	h := MustNew(fn)
	h.Write(data)
	return &repb.Digest{Hash: hex.EncodeToString(h.Sum(nil)), SizeBytes: int64(len(data))}
}

// ComputeReader returns the digest of everything r yields.
func ComputeReader(fn Function, r io.Reader) (*repb.Digest, error) {
	h, err := New(fn)
	if err != nil {
		return nil, err
	}
	n, err := io.Copy(h, r)
	if err != nil {
		return nil, fmt.Errorf("hashing: %w", err)
	}
	return &repb.Digest{Hash: hex.EncodeToString(h.Sum(nil)), SizeBytes: n}, nil
}

// ComputeReaderContext is ComputeReader that stops when ctx ends: ctx is
// checked before every read of r (1 MiB at a time), so hashing a huge file
// returns ctx's error promptly after a cancellation.
func ComputeReaderContext(ctx context.Context, fn Function, r io.Reader) (*repb.Digest, error) {
	h, err := New(fn)
	if err != nil {
		return nil, err
	}
	buf := make([]byte, 1<<20)
	var n int64
	for {
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("hashing, stopped after %d bytes: %w", n, err)
		}
		k, err := r.Read(buf)
		h.Write(buf[:k])
		n += int64(k)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("hashing, at byte %d: %w", n, err)
		}
	}
	return &repb.Digest{Hash: hex.EncodeToString(h.Sum(nil)), SizeBytes: n}, nil
}

// Validate checks that d is a well-formed digest: 64 lower-case hex
// characters and a non-negative size. A malformed digest is an
// InvalidArgument error: every tier and the server check digests through it.
func Validate(d *repb.Digest) error {
	if d == nil {
		return errkind.New(errkind.InvalidArgument, "digest is nil")
	}
	if d.SizeBytes < 0 {
		return errkind.New(errkind.InvalidArgument, "digest %s: negative size", String(d))
	}
	if len(d.Hash) != HashLen {
		return errkind.New(errkind.InvalidArgument, "digest %s: hash must be %d hex characters", String(d), HashLen)
	}
	// Without a branch per character: hashes are random, so branches on
	// digit-or-letter mispredict half the time, and a restore validates
	// every chunk's digest.
	ok := uint8(1)
	for i := 0; i < len(d.Hash); i++ {
		ok &= lowerHex[d.Hash[i]]
	}
	if ok == 0 {
		return errkind.New(errkind.InvalidArgument, "digest %s: hash is not lower-case hex", String(d))
	}
	return nil
}

// lowerHex is 1 for the bytes of lower-case hex.
var lowerHex = func() (t [256]uint8) {
	for _, c := range "0123456789abcdef" {
		t[c] = 1
	}
	return t
}()

// String formats d as "hash/size".
func String(d *repb.Digest) string {
	if d == nil {
		return "<nil>"
	}
	return fmt.Sprintf("%s/%d", d.Hash, d.SizeBytes)
}

// Equal reports whether a and b name the same blob.
func Equal(a, b *repb.Digest) bool {
	return a.GetHash() == b.GetHash() && a.GetSizeBytes() == b.GetSizeBytes()
}

// ParseFunction parses "blake3" or "sha256" (any case).
func ParseFunction(s string) (Function, error) {
	switch strings.ToLower(s) {
	case "", "blake3":
		return BLAKE3, nil
	case "sha256", "sha-256":
		return SHA256, nil
	}
	return repb.DigestFunction_UNKNOWN, fmt.Errorf("unknown digest function %q (want blake3 or sha256)", s)
}

// FunctionName is the lower-case name of fn, used in paths and manifests.
func FunctionName(fn Function) string {
	return strings.ToLower(fn.String())
}

// Verifier hashes data as it passes and checks it against a digest.
type Verifier struct {
	want *repb.Digest
	h    hash.Hash
	n    int64
}

// NewVerifier returns a Verifier for want.
func NewVerifier(fn Function, want *repb.Digest) (*Verifier, error) {
	h, err := New(fn)
	if err != nil {
		return nil, err
	}
	return &Verifier{want: want, h: h}, nil
}

// Write hashes p.
func (v *Verifier) Write(p []byte) (int, error) {
	v.n += int64(len(p))
	return v.h.Write(p)
}

// Check reports an error when the bytes written do not match the digest.
func (v *Verifier) Check() error {
	if v.n != v.want.SizeBytes {
		return fmt.Errorf("blob %s: got %d bytes, digest says %d", String(v.want), v.n, v.want.SizeBytes)
	}
	if got := hex.EncodeToString(v.h.Sum(nil)); got != v.want.Hash {
		return fmt.Errorf("blob %s: content hashes to %s", String(v.want), got)
	}
	return nil
}

// sha256Hex is the SHA-256 of s in lower-case hex.
func sha256Hex(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// StringListHash is H(parts...): the SHA-256 (hex) of the concatenation of
// the SHA-256 hex of each part, in order. Empty parts count. This is a
// storage format: it must never change.
func StringListHash(parts ...string) string {
	var b strings.Builder
	for _, p := range parts {
		b.WriteString(sha256Hex([]byte(p)))
	}
	return sha256Hex([]byte(b.String()))
}

// ProtoHash is the SHA-256 hex of the deterministic encoding of m.
func ProtoHash(m proto.Message) (string, error) {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		return "", fmt.Errorf("encoding %T: %w", m, err)
	}
	return sha256Hex(b), nil
}

// zeroBlock is compared against with bytes.Equal, which is vectorised.
var zeroBlock [64 << 10]byte

// IsZero reports whether every byte of b is zero.
func IsZero(b []byte) bool {
	for len(b) > 0 {
		n := min(len(b), len(zeroBlock))
		if !bytes.Equal(b[:n], zeroBlock[:n]) {
			return false
		}
		b = b[n:]
	}
	return true
}
