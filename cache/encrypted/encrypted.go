// Package encrypted is a cache tier wrapper that encrypts on the client,
// so that whoever operates or can read the wrapped tier (a REAPI cache, a
// `snaploader serve`, an S3 bucket) learns neither snapshot contents nor
// the names and configuration in manifests, while one group's identical
// chunks are still stored once.
//
// Blobs are sealed deterministically per group key and plaintext digest
// (see seal.go) and stored under their ciphertext's own digest, so every
// REAPI cache still verifies them. The callers above keep using plaintext
// digests: the wrapper maps each plaintext blob to its ciphertext blob,
// learning the mapping from the blobs it writes and from the entries it
// reads. An action-cache entry (a manifest) is sealed whole, together with
// the mapping of every blob it reaches (its artifact files, the trees its
// output directories name and the chunks those trees list), into one
// SealedEntry; the stored entry names the ciphertext blobs of its artifact
// files and trees as output files with opaque paths, so caches that check
// an entry's completeness check those, and no cache ever parses a sealed
// tree. Version entries (a random id) stay in the clear.
//
// What the wrapped tier can learn: which stored blobs of one group are
// equal, their sizes (plus 16 bytes per 64 KiB), how many artifact files
// and trees a manifest has, access times and patterns. Not: any byte of a
// blob, any name, key field, configuration or metadata, nor whether two
// groups store the same data.
package encrypted

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"sync"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
	"github.com/snaploader/snaploader/proto/snapshotpb"
)

// Options configure New.
type Options struct {
	// Keys is the group's keyring; required.
	Keys *Keyring
	// TempDir holds sealed blobs larger than MemoryLimit while they are
	// uploaded (default os.TempDir()).
	TempDir string
	// MemoryLimit is the largest sealed blob kept in memory before upload
	// (default 64 MiB).
	MemoryLimit int64
}

// Cache seals what it stores in the wrapped tier and opens what it reads.
// It fulfils the whole cache.Tier contract over plaintext digests.
type Cache struct {
	inner cache.Tier
	opts  Options

	mu sync.Mutex
	// sealed maps a plaintext blob, under one key, to its ciphertext blob.
	sealed map[plainKey]*repb.Digest
	// trees holds the file digests of trees already parsed (keyID "").
	trees map[plainKey][]*repb.Digest
	bufs  sync.Pool // *bytes.Buffer holding a sealed blob before upload
}

type plainKey struct {
	keyID string
	fn    digest.Function
	hash  string
	size  int64
}

// New wraps inner.
func New(inner cache.Tier, opts Options) (*Cache, error) {
	if opts.Keys == nil {
		return nil, status.Error(codes.InvalidArgument, "encrypted tier: a keyring is required")
	}
	if opts.TempDir == "" {
		opts.TempDir = os.TempDir()
	}
	if opts.MemoryLimit <= 0 {
		opts.MemoryLimit = 64 << 20
	}
	c := &Cache{inner: cache.Verifying(inner), opts: opts, sealed: map[plainKey]*repb.Digest{}, trees: map[plainKey][]*repb.Digest{}}
	c.bufs.New = func() any { return new(bytes.Buffer) }
	return c, nil
}

// Down is the wrapped tier's.
func (c *Cache) Down() error { return c.inner.Down() }

// Close closes the wrapped tier.
func (c *Cache) Close() error { return c.inner.Close() }

func pk(keyID string, fn digest.Function, d *repb.Digest) plainKey {
	return plainKey{keyID, fn, d.GetHash(), d.GetSizeBytes()}
}

// lookup returns the ciphertext blob of d under key keyID, nil if unknown.
func (c *Cache) lookup(keyID string, fn digest.Function, d *repb.Digest) *repb.Digest {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.sealed[pk(keyID, fn, d)]
}

// lookupAny returns the ciphertext blob of d under any key, the current
// one first.
func (c *Cache) lookupAny(fn digest.Function, d *repb.Digest) *repb.Digest {
	if s := c.lookup(c.opts.Keys.Current().ID, fn, d); s != nil {
		return s
	}
	for _, k := range c.opts.Keys.Keys() {
		if s := c.lookup(k.ID, fn, d); s != nil {
			return s
		}
	}
	return nil
}

func (c *Cache) remember(keyID string, fn digest.Function, plain, sealed *repb.Digest) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.sealed[pk(keyID, fn, plain)] = sealed
}

func corrupt(d *repb.Digest, err error) error {
	return cache.Corruptf("opening sealed blob %s: %v", digest.String(d), err)
}

// openError turns a failure to open into a status error.
func openError(err error) error {
	var ke *keyError
	if errors.As(err, &ke) {
		if ke.missingKey != "" {
			return status.Error(codes.FailedPrecondition, ke.Error())
		}
		return cache.Corruptf("%v", ke)
	}
	return err
}

// FindMissing reports a plaintext blob present when its ciphertext (under
// any key of the keyring) is known and present in the wrapped tier. A
// blob whose ciphertext is not known here is reported missing: Write then
// seals it and uploads it only if the wrapped tier lacks that ciphertext,
// so nothing is uploaded twice.
func (c *Cache) FindMissing(ctx context.Context, ns cache.Namespace, ds []*repb.Digest) ([]*repb.Digest, error) {
	fn := ns.DigestFunction()
	if _, err := digest.New(fn); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "finding missing blobs: %v", err)
	}
	var missing, ask []*repb.Digest
	plainOf := map[string]*repb.Digest{}
	for _, d := range ds {
		if err := digest.Validate(d); err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "finding missing blobs: %v", err)
		}
		s := c.lookupAny(fn, d)
		if s == nil {
			missing = append(missing, d)
			continue
		}
		ask = append(ask, s)
		plainOf[digest.String(s)] = d
	}
	if len(ask) > 0 {
		gone, err := c.inner.FindMissing(ctx, ns, ask)
		if err != nil {
			return nil, err
		}
		for _, s := range gone {
			missing = append(missing, plainOf[digest.String(s)])
		}
	}
	return missing, nil
}

// Read opens the plaintext blob d: its ciphertext when known, else d
// itself as stored in the clear (a snapshot saved without encryption).
// Every segment is authenticated before it is returned. A ciphertext that
// does not open is read to its end before the error is returned, so that
// the wrapped tier's own verification reaches its verdict too (and drops
// a corrupt blob, which the next Write then stores again).
func (c *Cache) Read(ctx context.Context, ns cache.Namespace, d *repb.Digest) (io.ReadCloser, error) {
	fn := ns.DigestFunction()
	s := c.lookupAny(fn, d)
	if s == nil {
		return c.inner.Read(ctx, ns, d)
	}
	rc, err := c.inner.Read(ctx, ns, s)
	if err != nil {
		return nil, fmt.Errorf("reading sealed blob %s of %s: %w", digest.String(s), digest.String(d), err)
	}
	sealed := &sealedReader{r: rc, plain: d, sealed: s}
	r, err := openReader(sealed, c.opts.Keys, fn, d)
	if err != nil {
		err = openError(err)
		if cache.IsCorrupt(err) {
			sealed.drain()
		}
		rc.Close()
		return nil, err
	}
	return &openedBlob{Reader: r, Closer: rc, sealed: sealed}, nil
}

// sealedReader is the ciphertext stream of a blob from the wrapped tier;
// its errors name the plaintext blob as well as the sealed one.
type sealedReader struct {
	r             io.Reader
	plain, sealed *repb.Digest
}

func (r *sealedReader) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	if err != nil && err != io.EOF {
		err = fmt.Errorf("reading sealed blob %s of %s: %w", digest.String(r.sealed), digest.String(r.plain), err)
	}
	return n, err
}

// drain reads the rest of the ciphertext (the wrapped tier bounds it by
// its size) so that the wrapped tier verifies it to the end.
func (r *sealedReader) drain() { io.Copy(io.Discard, r.r) }

type countingWriter struct{ n int64 }

func (w *countingWriter) Write(p []byte) (int, error) { w.n += int64(len(p)); return len(p), nil }

type openedBlob struct {
	io.Reader
	io.Closer
	sealed  *sealedReader
	drained bool
}

func (o *openedBlob) Read(p []byte) (int, error) {
	n, err := o.Reader.Read(p)
	if err != nil && err != io.EOF {
		err = openError(err)
		if cache.IsCorrupt(err) && !o.drained {
			o.drained = true
			o.sealed.drain()
		}
	}
	return n, err
}

// Write seals the plaintext blob d under the current key and stores the
// ciphertext unless the wrapped tier has it; the plaintext is verified
// against d while it is sealed.
func (c *Cache) Write(ctx context.Context, ns cache.Namespace, d *repb.Digest, r io.Reader) error {
	_, err := c.WriteReporting(ctx, ns, d, r)
	return err
}

// WriteReporting is Write, and reports whether the ciphertext was uploaded:
// false when the wrapped tier held it already. FindMissing cannot tell
// beforehand for a blob whose ciphertext this process has not seen (it is
// known only once the blob is sealed), so a caller counting what it
// uploaded counts this.
func (c *Cache) WriteReporting(ctx context.Context, ns cache.Namespace, d *repb.Digest, r io.Reader) (uploaded bool, err error) {
	vr, err := cache.NewVerifyingReader(io.NopCloser(r), ns.DigestFunction(), d)
	if err != nil {
		return false, err
	}
	return c.write(ctx, ns, d, vr)
}

// Traits: reads are verified (a sealed blob opens only under the key
// derived from its plaintext digest, every segment authenticated, and a
// blob stored in the clear is verified by the wrapped tier, which New
// wraps in cache.Verifying when it does not verify itself); sealed blobs
// have no range or compressed reads.
func (c *Cache) Traits() cache.Traits {
	t := c.inner.Traits()
	return cache.Traits{Description: "encrypted " + t.Description, VerifiesReads: true, MaxBytes: t.MaxBytes}
}

// ReadRange is an error wrapping cache.ErrNoRange: a sealed blob is read
// whole.
func (c *Cache) ReadRange(ctx context.Context, ns cache.Namespace, d *repb.Digest, off, n int64) (io.ReadCloser, error) {
	return nil, errkind.New(errkind.Unimplemented, "encrypted tier: blob %s at [%d, %d): %w", digest.String(d), off, off+n, cache.ErrNoRange)
}

// ReadCompressed is Read: the plaintext, verified.
func (c *Cache) ReadCompressed(ctx context.Context, ns cache.Namespace, d *repb.Digest) (io.ReadCloser, bool, error) {
	return cache.ReadWhole(ctx, c, ns, d)
}

// WriteCompressed decodes the zstd frames of r and seals the content as
// Write does (sealed blobs are not compressed).
func (c *Cache) WriteCompressed(ctx context.Context, ns cache.Namespace, d *repb.Digest, r io.Reader) error {
	return cache.WriteDecoded(ctx, c, ns, d, r)
}

// PutHashed seals data, which the caller has just hashed to d, without
// hashing it again.
func (c *Cache) PutHashed(ctx context.Context, ns cache.Namespace, d *repb.Digest, data []byte) error {
	if int64(len(data)) != d.GetSizeBytes() {
		return errkind.New(errkind.InvalidArgument, "sealing blob %s: %d bytes", digest.String(d), len(data))
	}
	_, err := c.write(ctx, ns, d, bytes.NewReader(data))
	return err
}

var _ cache.Tier = (*Cache)(nil)

func (c *Cache) write(ctx context.Context, ns cache.Namespace, d *repb.Digest, vr io.Reader) (bool, error) {
	if err := digest.Validate(d); err != nil {
		return false, status.Errorf(codes.InvalidArgument, "sealing blob: %v", err)
	}
	fn := ns.DigestFunction()
	k := c.opts.Keys.Current()
	h, err := digest.New(fn)
	if err != nil {
		return false, status.Errorf(codes.InvalidArgument, "sealing blob %s: %v", digest.String(d), err)
	}
	size := sealedSize(d.GetSizeBytes(), len(k.ID))
	buf := c.bufs.Get().(*bytes.Buffer)
	buf.Reset()
	defer c.bufs.Put(buf)
	var w io.Writer = buf
	var tmp *os.File
	if size > c.opts.MemoryLimit {
		if tmp, err = os.CreateTemp(c.opts.TempDir, "sealed-*"); err != nil {
			return false, status.Errorf(codes.Internal, "sealing blob %s: %v", digest.String(d), err)
		}
		defer os.Remove(tmp.Name())
		defer tmp.Close()
		w = tmp
	} else {
		buf.Grow(int(size))
	}
	cw := &countingWriter{}
	if err := sealBlob(io.MultiWriter(w, h, cw), k, fn, d, vr); err != nil {
		return false, sealError(d, err)
	}
	var one [1]byte
	if n, err := vr.Read(one[:]); n > 0 {
		return false, status.Errorf(codes.InvalidArgument, "sealing blob %s: content is longer than the digest says", digest.String(d))
	} else if err != io.EOF {
		return false, sealError(d, err)
	}
	s := &repb.Digest{Hash: hex.EncodeToString(h.Sum(nil)), SizeBytes: cw.n}
	missing, err := c.inner.FindMissing(ctx, ns, []*repb.Digest{s})
	if err != nil {
		return false, fmt.Errorf("storing sealed blob of %s: %w", digest.String(d), err)
	}
	if len(missing) > 0 {
		var body io.Reader = buf
		if tmp != nil {
			if _, err := tmp.Seek(0, io.SeekStart); err != nil {
				return false, status.Errorf(codes.Internal, "sealing blob %s: %v", digest.String(d), err)
			}
			body = tmp
		}
		if err := c.inner.Write(ctx, ns, s, body); err != nil {
			return false, fmt.Errorf("storing sealed blob %s of %s: %w", digest.String(s), digest.String(d), err)
		}
	}
	c.remember(k.ID, fn, d, s)
	return len(missing) > 0, nil
}

// sealError is the error of a failure to seal blob d: content that does
// not match d (it failed verification, or has another length) is
// InvalidArgument; a failure of the source or of the scratch file keeps
// its kind.
func sealError(d *repb.Digest, err error) error {
	if k := errkind.Of(err); k != errkind.DataLoss && k != errkind.Internal {
		return fmt.Errorf("sealing blob %s: %w", digest.String(d), err)
	}
	return status.Errorf(codes.InvalidArgument, "sealing blob %s: %v", digest.String(d), err)
}

// treeFiles lists the file digests of the plaintext tree d. A save writes
// its manifest under several keys (the write key, the snapshot id, maybe
// more): each tree is read and parsed once per process, not once per key.
func (c *Cache) treeFiles(ctx context.Context, ns cache.Namespace, d *repb.Digest) ([]*repb.Digest, error) {
	tk := pk("", ns.DigestFunction(), d)
	c.mu.Lock()
	files, ok := c.trees[tk]
	c.mu.Unlock()
	if ok {
		return files, nil
	}
	b, err := cache.ReadAll(ctx, c, ns, d)
	if err != nil {
		return nil, fmt.Errorf("reading tree %s: %w", digest.String(d), err)
	}
	t := &repb.Tree{}
	if err := proto.Unmarshal(b, t); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "tree %s: %v", digest.String(d), err)
	}
	for _, dir := range append([]*repb.Directory{t.GetRoot()}, t.GetChildren()...) {
		for _, f := range dir.GetFiles() {
			files = append(files, f.GetDigest())
		}
	}
	c.mu.Lock()
	if len(c.trees) >= maxTrees {
		clear(c.trees)
	}
	c.trees[tk] = files
	c.mu.Unlock()
	return files, nil
}

// maxTrees bounds the trees whose file lists a Cache keeps.
const maxTrees = 256

// reseal seals blob d, known under an older key, under the current one.
func (c *Cache) reseal(ctx context.Context, ns cache.Namespace, d *repb.Digest) error {
	rc, err := c.Read(ctx, ns, d)
	if err != nil {
		return fmt.Errorf("resealing blob %s under the current key: %w", digest.String(d), err)
	}
	defer rc.Close()
	if err := c.Write(ctx, ns, d, rc); err != nil {
		return fmt.Errorf("resealing blob %s under the current key: %w", digest.String(d), err)
	}
	return nil
}

// isVersionEntry reports whether ar only holds a version id, which stays
// in the clear.
func isVersionEntry(ar *repb.ActionResult) bool {
	aux := ar.GetExecutionMetadata().GetAuxiliaryMetadata()
	return len(aux) == 1 && aux[0].MessageIs((*snapshotpb.SnapshotVersionMetadata)(nil)) &&
		len(ar.GetOutputFiles()) == 0 && len(ar.GetOutputDirectories()) == 0
}

// entryAEAD derives the AEAD sealing the entry under key in ns: bound to
// the entry's address, so an entry moved to another key does not open.
func entryInfo(ns cache.Namespace, key *repb.Digest) string {
	return "snaploader entry v1 " + strconv.Quote(ns.Instance) + " " + digest.FunctionName(ns.DigestFunction()) + " " + digest.String(key)
}

// UpdateActionResult seals ar with the mapping of every blob it reaches.
func (c *Cache) UpdateActionResult(ctx context.Context, ns cache.Namespace, key *repb.Digest, ar *repb.ActionResult) error {
	if isVersionEntry(ar) {
		return c.inner.UpdateActionResult(ctx, ns, key, ar)
	}
	fn := ns.DigestFunction()
	k := c.opts.Keys.Current()
	payload := &snapshotpb.SealedPayload{}
	stored := &repb.ActionResult{}
	seen := map[string]bool{}
	add := func(d *repb.Digest, listed bool) error {
		if seen[digest.String(d)] {
			return nil
		}
		seen[digest.String(d)] = true
		s := c.lookup(k.ID, fn, d)
		if s == nil && c.lookupAny(fn, d) != nil {
			// Sealed under an older key: a new entry names only
			// ciphertexts of the current key, so that removing an old
			// key breaks only the entries sealed before it was replaced.
			if err := c.reseal(ctx, ns, d); err != nil {
				return fmt.Errorf("sealing action result %s: %w", digest.String(key), err)
			}
			s = c.lookup(k.ID, fn, d)
		}
		if s == nil {
			return status.Errorf(codes.FailedPrecondition, "sealing action result %s: blob %s was not stored through the encrypted tier", digest.String(key), digest.String(d))
		}
		payload.Blobs = append(payload.Blobs, &snapshotpb.BlobMapping{Plain: d, Sealed: s})
		if listed {
			stored.OutputFiles = append(stored.OutputFiles, &repb.OutputFile{Path: "sealed/" + strconv.Itoa(len(stored.OutputFiles)), Digest: s})
		}
		return nil
	}
	for _, f := range ar.GetOutputFiles() {
		if err := add(f.GetDigest(), true); err != nil {
			return err
		}
	}
	for _, od := range ar.GetOutputDirectories() {
		if err := add(od.GetTreeDigest(), true); err != nil {
			return err
		}
		files, err := c.treeFiles(ctx, ns, od.GetTreeDigest())
		if err != nil {
			return fmt.Errorf("sealing action result %s: %w", digest.String(key), err)
		}
		for _, d := range files {
			if err := add(d, false); err != nil {
				return err
			}
		}
	}
	plain, err := proto.MarshalOptions{Deterministic: true}.Marshal(ar)
	if err != nil {
		return status.Errorf(codes.InvalidArgument, "sealing action result %s: %v", digest.String(key), err)
	}
	payload.ActionResult = plain
	pb, err := proto.Marshal(payload)
	if err != nil {
		return status.Errorf(codes.Internal, "sealing action result %s: %v", digest.String(key), err)
	}
	aead, err := deriveAEAD(k, entryInfo(ns, key))
	if err != nil {
		return err
	}
	nonce := make([]byte, aead.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		return err
	}
	se, err := anypb.New(&snapshotpb.SealedEntry{KeyId: k.ID, Nonce: nonce, Ciphertext: aead.Seal(nil, nonce, pb, []byte(k.ID))})
	if err != nil {
		return err
	}
	stored.ExecutionMetadata = &repb.ExecutedActionMetadata{AuxiliaryMetadata: []*anypb.Any{se}}
	return c.inner.UpdateActionResult(ctx, ns, key, stored)
}

// GetActionResult opens a sealed entry and learns the ciphertext blob of
// every blob it reaches; an entry stored in the clear is returned as it is.
func (c *Cache) GetActionResult(ctx context.Context, ns cache.Namespace, key *repb.Digest) (*repb.ActionResult, error) {
	stored, err := c.inner.GetActionResult(ctx, ns, key)
	if err != nil {
		return nil, err
	}
	se, ok := SealedEntryOf(stored)
	if !ok {
		return stored, nil
	}
	k, ok := c.opts.Keys.Get(se.GetKeyId())
	if !ok {
		return nil, status.Errorf(codes.FailedPrecondition, "action result %s is sealed under key id %s, which the key file does not hold", digest.String(key), se.GetKeyId())
	}
	aead, err := deriveAEAD(k, entryInfo(ns, key))
	if err != nil {
		return nil, err
	}
	if len(se.GetNonce()) != aead.NonceSize() {
		return nil, cache.Corruptf("sealed action result %s: bad nonce", digest.String(key))
	}
	pb, err := aead.Open(nil, se.GetNonce(), se.GetCiphertext(), []byte(se.GetKeyId()))
	if err != nil {
		return nil, cache.Corruptf("sealed action result %s does not open under key id %s: tampered, moved from another key, or sealed by another group", digest.String(key), se.GetKeyId())
	}
	payload := &snapshotpb.SealedPayload{}
	if err := proto.Unmarshal(pb, payload); err != nil {
		return nil, cache.Corruptf("sealed action result %s: %v", digest.String(key), err)
	}
	ar := &repb.ActionResult{}
	if err := proto.Unmarshal(payload.GetActionResult(), ar); err != nil {
		return nil, cache.Corruptf("sealed action result %s: %v", digest.String(key), err)
	}
	fn := ns.DigestFunction()
	for _, m := range payload.GetBlobs() {
		if digest.Validate(m.GetPlain()) != nil || digest.Validate(m.GetSealed()) != nil {
			return nil, cache.Corruptf("sealed action result %s: a blob mapping is malformed", digest.String(key))
		}
		c.remember(k.ID, fn, m.GetPlain(), m.GetSealed())
	}
	return ar, nil
}

// SealedEntryOf returns the SealedEntry of a stored action result, if it is
// one.
func SealedEntryOf(ar *repb.ActionResult) (*snapshotpb.SealedEntry, bool) {
	for _, a := range ar.GetExecutionMetadata().GetAuxiliaryMetadata() {
		se := &snapshotpb.SealedEntry{}
		if a.MessageIs(se) && a.UnmarshalTo(se) == nil {
			return se, true
		}
	}
	return nil, false
}
