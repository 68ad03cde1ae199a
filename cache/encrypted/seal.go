package encrypted

import (
	"bufio"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strconv"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"

	"github.com/snaploader/snaploader/digest"
)

// A sealed blob is
//
//	"SLE1" | len(key id) (1 byte) | key id | segments
//
// where the plaintext is cut into segments of segmentSize bytes (the last
// one shorter, possibly empty) and each is sealed with AES-256-GCM under
// the blob key, with the nonce counter (8 bytes, big-endian) | final (4
// bytes: 1 for the last segment, else 0). The blob key is HKDF-SHA256 of
// the group key and the plaintext's digest (function, hash and size): each
// key seals exactly one plaintext, so the fixed nonces never repeat under a
// key, and the same plaintext sealed twice by one group gives the same
// ciphertext (deduplication), while another group's ciphertext of it
// differs entirely. Segment order, truncation and extension are caught by
// the counter and the final flag; a ciphertext moved to another plaintext's
// address fails to open because that address derives another key.
const (
	blobMagic   = "SLE1"
	segmentSize = 64 << 10
	tagSize     = 16
)

// sealedSize is the size of the sealed blob of an n-byte plaintext under a
// key id of idLen bytes.
func sealedSize(n int64, idLen int) int64 {
	segs := n/segmentSize + 1
	if n > 0 && n%segmentSize == 0 {
		segs = n / segmentSize
	}
	return int64(len(blobMagic)+1+idLen) + n + segs*tagSize
}

// blobAEAD derives the AEAD of the plaintext blob d.
func blobAEAD(k Key, fn digest.Function, d *repb.Digest) (cipher.AEAD, error) {
	info := "snaploader blob v1 " + digest.FunctionName(fn) + " " + d.GetHash() + " " + strconv.FormatInt(d.GetSizeBytes(), 10)
	return deriveAEAD(k, info)
}

func deriveAEAD(k Key, info string) (cipher.AEAD, error) {
	key, err := hkdf.Key(sha256.New, k.Secret[:], nil, info, 32)
	if err != nil {
		return nil, fmt.Errorf("deriving a key: %w", err)
	}
	b, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(b)
}

func segmentNonce(nonce []byte, i uint64, final bool) []byte {
	binary.BigEndian.PutUint64(nonce[:8], i)
	binary.BigEndian.PutUint32(nonce[8:12], 0)
	if final {
		nonce[11] = 1
	}
	return nonce
}

// sealBlob writes the sealed form of the plaintext blob d, read from r, to
// w. r must yield d's size in bytes.
func sealBlob(w io.Writer, k Key, fn digest.Function, d *repb.Digest, r io.Reader) error {
	aead, err := blobAEAD(k, fn, d)
	if err != nil {
		return err
	}
	hdr := append([]byte(blobMagic), byte(len(k.ID)))
	if _, err := w.Write(append(hdr, k.ID...)); err != nil {
		return err
	}
	nonce := make([]byte, aead.NonceSize())
	buf := make([]byte, segmentSize, segmentSize+tagSize)
	var total int64
	for i := uint64(0); ; i++ {
		n, err := io.ReadFull(r, buf)
		if err != nil && err != io.ErrUnexpectedEOF && err != io.EOF {
			return err
		}
		total += int64(n)
		final := total >= d.GetSizeBytes()
		if !final && n < segmentSize {
			return fmt.Errorf("blob %s: plaintext ended after %d of %d bytes", digest.String(d), total, d.GetSizeBytes())
		}
		if total > d.GetSizeBytes() {
			return fmt.Errorf("blob %s: plaintext is longer than %d bytes", digest.String(d), d.GetSizeBytes())
		}
		out := aead.Seal(buf[:0], segmentNonce(nonce, i, final), buf[:n], nil)
		if _, err := w.Write(out); err != nil {
			return err
		}
		buf = buf[:segmentSize]
		if final {
			return nil
		}
	}
}

// errOpen is the cause of every failure to open a sealed blob.
var errOpen = errors.New("ciphertext does not open: tampered, truncated, swapped for another blob's, or sealed by another group")

// openReader returns the plaintext of the sealed blob d read from r,
// authenticating every segment before yielding it; keys finds the key the
// blob names.
func openReader(r io.Reader, keys *Keyring, fn digest.Function, d *repb.Digest) (io.Reader, error) {
	br := bufio.NewReaderSize(r, segmentSize+tagSize+1)
	hdr := make([]byte, len(blobMagic)+1)
	if _, err := io.ReadFull(br, hdr); err != nil || string(hdr[:len(blobMagic)]) != blobMagic {
		return nil, &keyError{d: d, err: errOpen}
	}
	id := make([]byte, hdr[len(blobMagic)])
	if _, err := io.ReadFull(br, id); err != nil {
		return nil, &keyError{d: d, err: errOpen}
	}
	k, ok := keys.Get(string(id))
	if !ok {
		return nil, &keyError{d: d, missingKey: string(id)}
	}
	aead, err := blobAEAD(k, fn, d)
	if err != nil {
		return nil, err
	}
	return &openingReader{r: br, aead: aead, d: d, nonce: make([]byte, aead.NonceSize()), buf: make([]byte, segmentSize+tagSize)}, nil
}

// keyError is a sealed blob or entry that cannot be opened.
type keyError struct {
	d          *repb.Digest
	missingKey string // the key id it needs, when the keyring lacks it
	err        error
}

func (e *keyError) Error() string {
	if e.missingKey != "" {
		return fmt.Sprintf("blob %s is sealed under key id %s, which the key file does not hold", digest.String(e.d), e.missingKey)
	}
	return fmt.Sprintf("blob %s: %v", digest.String(e.d), e.err)
}

type openingReader struct {
	r     *bufio.Reader
	aead  cipher.AEAD
	d     *repb.Digest
	nonce []byte
	buf   []byte
	out   []byte // opened, not yet returned
	i     uint64
	total int64
	done  bool
	err   error
}

func (o *openingReader) Read(p []byte) (int, error) {
	for len(o.out) == 0 {
		if o.err != nil {
			return 0, o.err
		}
		if o.done {
			return 0, io.EOF
		}
		o.err = o.next()
	}
	n := copy(p, o.out)
	o.out = o.out[n:]
	return n, nil
}

// next opens the next segment.
func (o *openingReader) next() error {
	n, err := io.ReadFull(o.r, o.buf)
	if err != nil && err != io.ErrUnexpectedEOF {
		if err == io.EOF {
			return corrupt(o.d, errOpen)
		}
		return err
	}
	final := n < len(o.buf)
	if !final {
		if _, perr := o.r.Peek(1); perr == io.EOF {
			final = true
		} else if perr != nil {
			return perr
		}
	}
	if n < tagSize {
		return corrupt(o.d, errOpen)
	}
	plain, err := o.aead.Open(o.buf[:0], segmentNonce(o.nonce, o.i, final), o.buf[:n], nil)
	if err != nil {
		return corrupt(o.d, errOpen)
	}
	o.i++
	o.total += int64(len(plain))
	if o.total > o.d.GetSizeBytes() || (final && o.total != o.d.GetSizeBytes()) {
		return corrupt(o.d, errOpen)
	}
	o.out, o.done = plain, final
	return nil
}
