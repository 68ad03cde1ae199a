package cachetest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/klauspost/compress/zstd"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
)

// contents are the blobs of the round trip: sizes around pages and the
// 1 MiB transfer and copy buffers, and zero runs of every shape a sparse
// or compressing tier handles.
func contents() []struct {
	name string
	data []byte
} {
	mostlyZero := random(3, 4096000)
	for i := 4096; i < len(mostlyZero)-4096; i++ {
		if (i/4096)%4 != 0 {
			mostlyZero[i] = 0
		}
	}
	return []struct {
		name string
		data []byte
	}{
		{"empty", nil},
		{"one byte", []byte{42}},
		{"small", random(1, 1000)},
		{"page", random(2, 4096)},
		{"odd size", random(4, 3*mib+17)},
		{"chunk of mostly zero pages", mostlyZero},
		{"all zero", make([]byte, 2*mib)},
		{"zero pages then short tail", append(make([]byte, 3*4096), random(10, 100)...)},
		{"data then partial zero tail", append(random(11, 4096+7), make([]byte, 5000)...)},
		{"data across the copy buffer", append(append(make([]byte, mib-4096), random(12, 8192)...), make([]byte, 4096)...)},
		{"guest memory", vmLike(13, 5*mib+123)},
	}
}

func (s *suite) roundTrip(t *testing.T) {
	for i, fn := range s.h.Functions {
		for _, tc := range contents() {
			if i > 0 && len(tc.data) > mib {
				continue // the other functions take the same paths: small contents suffice
			}
			t.Run(digest.FunctionName(fn)+"/"+tc.name, func(t *testing.T) {
				ns := s.ns()
				ns.Function = fn
				s.roundTripOne(t, ns, tc.data)
			})
		}
	}
	if slices.Contains(s.h.Functions, digest.Default) {
		// An unset function is the default one: the blob reads back
		// under either.
		t.Run("unset function", func(t *testing.T) {
			ns := s.ns()
			ns.Function = repb.DigestFunction_UNKNOWN
			s.roundTripOne(t, ns, random(5, 5000))
		})
	}
}

// roundTripOne writes data to a fresh tier and reads it back every way the
// tier offers, then through the tier reopened.
func (s *suite) roundTripOne(t *testing.T, ns cache.Namespace, data []byte) {
	tier := s.h.New(t)
	c := tier.Cache
	d := digest.Compute(ns.DigestFunction(), data)
	if len(data) > 0 && !missing(t, c, ns, d) {
		t.Errorf("FindMissing reports %s present before it is written", digest.String(d))
	}
	write(t, c, ns, data)
	if missing(t, c, ns, d) {
		t.Fatalf("FindMissing reports %s missing after it is written", digest.String(d))
	}
	mustRead(t, c, ns, d, data)
	if o, ok := c.(cache.Opener); ok {
		readPieces(t, o, ns, d, data)
	}
	// Writing it again is harmless.
	write(t, c, ns, data)
	mustRead(t, c, ns, d, data)
	if explicit := (cache.Namespace{Group: ns.Group, Instance: ns.Instance, Function: ns.DigestFunction()}); explicit != ns {
		mustRead(t, c, explicit, d, data)
	}
	if tier.Reopen != nil {
		c := tier.Reopen(t)
		if missing(t, c, ns, d) {
			t.Fatalf("the reopened tier reports %s missing", digest.String(d))
		}
		mustRead(t, c, ns, d, data)
	}
}

// readPieces checks an opened blob's size and reads parts of it: one in
// the middle and one across the end.
func readPieces(t *testing.T, o cache.Opener, ns cache.Namespace, d *repb.Digest, data []byte) {
	t.Helper()
	b, err := o.Open(ctxT(t), ns, d)
	if err != nil {
		t.Fatalf("Open %s: %v", digest.String(d), err)
	}
	defer b.Close()
	if b.Size() != int64(len(data)) {
		t.Fatalf("Open %s: Size %d, want %d", digest.String(d), b.Size(), len(data))
	}
	if len(data) < 8 {
		return
	}
	mid := len(data) / 2
	p := make([]byte, 7)
	if n, err := b.ReadAt(p, int64(mid)); n != len(p) || !bytes.Equal(p, data[mid:mid+7]) {
		t.Fatalf("ReadAt 7 bytes at %d of %s: %d bytes, %v, equal %v", mid, digest.String(d), n, err, bytes.Equal(p[:n], data[mid:mid+n]))
	}
	p = make([]byte, 10)
	n, err := b.ReadAt(p, int64(len(data)-4))
	if n != 4 || err == nil || !bytes.Equal(p[:4], data[len(data)-4:]) {
		t.Fatalf("ReadAt across the end of %s: %d bytes, %v; want the last 4 and an error (io.EOF)", digest.String(d), n, err)
	}
}

func (s *suite) absent(t *testing.T) {
	tier := s.h.New(t)
	c := tier.Cache
	ns := s.ns()
	ctx := ctxT(t)
	for _, n := range []int{10, 5 * mib} {
		d := digest.Compute(s.fn, random(uint64(100+n), n))
		t.Run(fmt.Sprintf("%d bytes", n), func(t *testing.T) {
			if !missing(t, c, ns, d) {
				t.Errorf("FindMissing reports the absent %s present", digest.String(d))
			}
			_, err := c.Read(ctx, ns, d)
			wantKind(t, err, errkind.NotFound, "Read of an absent blob", d.Hash)
			if o, ok := c.(cache.Opener); ok {
				_, err := o.Open(ctx, ns, d)
				wantKind(t, err, errkind.NotFound, "Open of an absent blob", d.Hash)
			}
			if rr, ok := rangeReader(c); ok {
				rc, err := rr.ReadRange(ctx, ns, d, 0, 1)
				if err == nil {
					_, err = io.ReadAll(rc)
					rc.Close()
				}
				wantKind(t, err, errkind.NotFound, "ReadRange of an absent blob", d.Hash)
			}
			if cr, ok := c.(cache.CompressedReader); ok {
				_, _, err := cr.ReadCompressed(ctx, ns, d)
				wantKind(t, err, errkind.NotFound, "ReadCompressed of an absent blob", d.Hash)
			}
		})
	}
	t.Run("action result", func(t *testing.T) {
		key := entryKey("absent")
		_, err := c.GetActionResult(ctx, ns, key)
		wantKind(t, err, errkind.NotFound, "GetActionResult of an absent entry", key.Hash)
	})
}

func flipped(b []byte, i int) []byte {
	b = bytes.Clone(b)
	b[i] ^= 0x40
	return b
}

func (s *suite) writeMismatch(t *testing.T) {
	type mismatch struct {
		name string
		d    *repb.Digest // what the write claims
		body []byte       // what it gives
	}
	var cases []mismatch
	// Sizes under, at and over 1 MiB (a batch limit, a multiple of every
	// block size), the last over 5 MiB (S3's smallest part) and not a
	// multiple of anything.
	for _, n := range []int{100 << 10, mib, 6*mib + 17} {
		data := random(uint64(200+n), n)
		d := digest.Compute(s.fn, data)
		size := fmt.Sprintf("%d bytes/", n)
		cases = append(cases,
			mismatch{size + "other content", d, random(uint64(300+n), n)},
			mismatch{size + "flipped first byte", d, flipped(data, 0)},
			mismatch{size + "flipped last byte", d, flipped(data, n-1)},
			mismatch{size + "short", d, data[:n-1]},
			mismatch{size + "long", d, append(bytes.Clone(data), 1)},
			mismatch{size + "size says more", &repb.Digest{Hash: d.Hash, SizeBytes: int64(n + 4096)}, data},
			mismatch{size + "nothing", d, nil},
		)
	}
	cases = append(cases, mismatch{"empty blob given data", digest.Compute(s.fn, nil), []byte("x")})
	for _, tc := range cases {
		// A source that can seek and one that cannot: writers take
		// different paths (resumable uploads, buffering).
		for _, seekable := range []bool{true, false} {
			name := tc.name
			if !seekable {
				name += "/one-shot"
			}
			t.Run(name, func(t *testing.T) {
				tier := s.h.New(t)
				c := tier.Cache
				ns := s.ns()
				var r io.Reader = bytes.NewReader(tc.body)
				if !seekable {
					r = struct{ io.Reader }{r}
				}
				err := c.Write(ctxT(t), ns, tc.d, r)
				wantKind(t, err, errkind.InvalidArgument, "Write of content not matching its digest", tc.d.Hash)
				// Nothing is stored, neither under the digest claimed
				// nor under the content's own.
				s.storedNothing(t, tier, ns, tc.d, digest.Compute(s.fn, tc.body))
			})
		}
	}
}

// storedNothing fails t unless the tier, after writes that failed, holds
// none of ds and nothing left over.
func (s *suite) storedNothing(t *testing.T, tier Tier, ns cache.Namespace, ds ...*repb.Digest) {
	t.Helper()
	for _, d := range ds {
		if d.SizeBytes == 0 {
			continue // the empty blob may always be present
		}
		if !missing(t, tier.Cache, ns, d) {
			t.Errorf("a failed write stored %s", digest.String(d))
		}
		_, err := tier.Cache.Read(ctxT(t), ns, d)
		wantKind(t, err, errkind.NotFound, "Read after a failed write", "")
	}
	if tier.Leftovers != nil {
		if l := tier.Leftovers(t); len(l) > 0 {
			t.Errorf("failed writes left %v behind", l)
		}
	}
}

// failingReader yields r, then err instead of io.EOF.
type failingReader struct {
	r   io.Reader
	err error
}

func (f *failingReader) Read(p []byte) (int, error) {
	n, err := f.r.Read(p)
	if err == io.EOF {
		err = f.err
	}
	return n, err
}

func (s *suite) writeSourceFails(t *testing.T) {
	for _, n := range []int{100 << 10, mib + 17} {
		data := random(uint64(400+n), n)
		d := digest.Compute(s.fn, data)
		t.Run(fmt.Sprintf("%d bytes/source fails", n), func(t *testing.T) {
			tier := s.h.New(t)
			ns := s.ns()
			src := &failingReader{bytes.NewReader(data[:n/2]), errkind.New(errkind.Unavailable, "the source went away")}
			err := tier.Cache.Write(ctxT(t), ns, d, src)
			wantKind(t, err, errkind.Unavailable, "Write from a source that fails", d.Hash)
			s.storedNothing(t, tier, ns, d)
		})
		t.Run(fmt.Sprintf("%d bytes/canceled", n), func(t *testing.T) {
			tier := s.h.New(t)
			ns := s.ns()
			ctx, cancel := context.WithCancel(context.Background())
			cancel()
			err := tier.Cache.Write(ctx, ns, d, bytes.NewReader(data))
			wantKind(t, err, errkind.Canceled, "Write with a canceled context", "")
			s.storedNothing(t, tier, ns, d)
		})
	}
}

func (s *suite) malformedDigest(t *testing.T) {
	tier := s.h.New(t)
	c := tier.Cache
	ns := s.ns()
	good := digest.Compute(s.fn, []byte("x"))
	for _, tc := range []struct {
		name string
		d    *repb.Digest
	}{
		{"nil", nil},
		{"short hash", &repb.Digest{Hash: "abc", SizeBytes: 3}},
		{"upper-case hash", &repb.Digest{Hash: strings.ToUpper(good.Hash), SizeBytes: 1}},
		{"traversal in hash", &repb.Digest{Hash: "../../" + good.Hash[6:], SizeBytes: 1}},
		{"negative size", &repb.Digest{Hash: good.Hash, SizeBytes: -1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s.allInvalid(t, c, ns, tc.d, tc.d.GetHash())
		})
	}
	t.Run("unknown function", func(t *testing.T) {
		ns := ns
		ns.Function = repb.DigestFunction_MD5
		s.allInvalid(t, c, ns, good, "")
	})
}

// allInvalid fails t unless every method given d in ns is InvalidArgument
// naming name.
func (s *suite) allInvalid(t *testing.T, c cache.Cache, ns cache.Namespace, d *repb.Digest, name string) {
	t.Helper()
	ctx := ctxT(t)
	good := digest.Compute(s.fn, []byte("x"))
	_, err := c.FindMissing(ctx, ns, []*repb.Digest{good, d})
	wantKind(t, err, errkind.InvalidArgument, "FindMissing", name)
	_, err = c.Read(ctx, ns, d)
	wantKind(t, err, errkind.InvalidArgument, "Read", name)
	err = c.Write(ctx, ns, d, strings.NewReader("x"))
	wantKind(t, err, errkind.InvalidArgument, "Write", name)
	if o, ok := c.(cache.Opener); ok {
		_, err = o.Open(ctx, ns, d)
		wantKind(t, err, errkind.InvalidArgument, "Open", name)
	}
	if rr, ok := rangeReader(c); ok {
		_, err = rr.ReadRange(ctx, ns, d, 0, 1)
		wantKind(t, err, errkind.InvalidArgument, "ReadRange", name)
	}
	if cr, ok := c.(cache.CompressedReader); ok {
		_, _, err = cr.ReadCompressed(ctx, ns, d)
		wantKind(t, err, errkind.InvalidArgument, "ReadCompressed", name)
	}
	_, err = c.GetActionResult(ctx, ns, d)
	wantKind(t, err, errkind.InvalidArgument, "GetActionResult", name)
	err = c.UpdateActionResult(ctx, ns, d, &repb.ActionResult{ExitCode: 1})
	wantKind(t, err, errkind.InvalidArgument, "UpdateActionResult", name)
}

// readPath is one way of reading a whole blob.
type readPath struct {
	name string
	// has says whether c offers the path.
	has  func(c cache.Cache) bool
	read func(ctx context.Context, c cache.Cache, ns cache.Namespace, d *repb.Digest) ([]byte, error)
	// repairs says whether the tier itself verifies what the path reads,
	// so that it knows the blob is damaged; a ReadCompressed stream of
	// stored frames is verified by the caller instead.
	repairs bool
}

func always(cache.Cache) bool { return true }

func isOpener(c cache.Cache) bool { _, ok := c.(cache.Opener); return ok }

func isCompressedReader(c cache.Cache) bool { _, ok := c.(cache.CompressedReader); return ok }

var readPaths = []readPath{
	{"Read", always, readAll, true},
	{"Open", isOpener, func(ctx context.Context, c cache.Cache, ns cache.Namespace, d *repb.Digest) ([]byte, error) {
		return openAll(ctx, c.(cache.Opener), ns, d)
	}, true},
	{"ReadCompressed", isCompressedReader, func(ctx context.Context, c cache.Cache, ns cache.Namespace, d *repb.Digest) ([]byte, error) {
		rc, zst, err := c.(cache.CompressedReader).ReadCompressed(ctx, ns, d)
		if err != nil {
			return nil, err
		}
		if zst {
			if rc, err = cache.NewZstdVerifyingReader(rc, ns.DigestFunction(), d); err != nil {
				return nil, err
			}
		}
		defer rc.Close()
		return io.ReadAll(rc)
	}, false},
}

// damages are what Corrupt does to stored bytes.
var damages = []struct {
	name string
	f    func([]byte) []byte
}{
	{"flipped byte", func(b []byte) []byte { b[len(b)/2] ^= 0x40; return b }},
	{"truncated", func(b []byte) []byte { return b[:len(b)-1] }},
	{"extended", func(b []byte) []byte { return append(b, 0) }},
	{"emptied", func(b []byte) []byte { return b[:0] }},
	{"other content", func(b []byte) []byte { return random(uint64(len(b)), len(b)) }},
}

func (s *suite) corruption(t *testing.T) {
	for _, tc := range []struct {
		name string
		data []byte
	}{
		{"small", random(20, 2000)},
		{"small guest memory", vmLike(23, 200<<10)},
		{"random", random(21, mib+5)},
		{"guest memory", vmLike(22, mib+5)},
	} {
		for _, dmg := range damages {
			if dmg.name != "flipped byte" && tc.name != "random" {
				continue
			}
			for _, p := range readPaths {
				t.Run(tc.name+"/"+dmg.name+"/"+p.name, func(t *testing.T) {
					s.corruptOne(t, tc.data, dmg.f, p)
				})
			}
		}
	}
}

func (s *suite) corruptOne(t *testing.T, data []byte, damage func([]byte) []byte, p readPath) {
	tier := s.h.New(t)
	if tier.Corrupt == nil {
		t.Skip("the harness cannot damage the tier's storage")
	}
	if !p.has(tier.Cache) {
		t.Skipf("the tier has no %s", p.name)
	}
	ns := s.ns()
	d := write(t, tier.Cache, ns, data)
	tier.Corrupt(t, ns, d, damage)
	c := tier.Cache
	if tier.Reopen != nil {
		c = tier.Reopen(t)
	}
	got, err := p.read(ctxT(t), c, ns, d)
	if err == nil {
		t.Fatalf("%s of the damaged blob %s succeeded (%d bytes, equal to what was written: %v)", p.name, digest.String(d), len(got), bytes.Equal(got, data))
	}
	if !cache.IsCorrupt(err) {
		t.Fatalf("%s of the damaged blob: %v error (%v), want DataLoss", p.name, errkind.Of(err), err)
	}
	if !strings.Contains(err.Error(), d.Hash) {
		t.Errorf("%s of the damaged blob: error %q does not name it", p.name, err)
	}
	if bytes.Equal(got, data) {
		t.Errorf("%s returned all the written bytes along with the error", p.name)
	}
	if !p.repairs {
		return
	}
	// The tier may have dropped the blob; either way writing it again
	// repairs it.
	t.Logf("after the failed read, FindMissing reports it missing: %v", missing(t, c, ns, d))
	write(t, c, ns, data)
	mustRead(t, c, ns, d, data)
	if missing(t, c, ns, d) {
		t.Errorf("FindMissing reports the repaired %s missing", digest.String(d))
	}
}

func (s *suite) rangeReads(t *testing.T) {
	for _, tc := range []struct {
		name string
		data []byte
	}{
		{"random", random(30, mib+17)},
		{"guest memory", vmLike(31, mib+17)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tier := s.h.New(t)
			rr, ok := rangeReader(tier.Cache)
			if !ok {
				t.Skip("the tier has no range reads (Traits.ServesRanges)")
			}
			ns := s.ns()
			d := write(t, tier.Cache, ns, tc.data)
			size := int64(len(tc.data))
			read := func(off, n int64) ([]byte, error) {
				rc, err := rr.ReadRange(ctxT(t), ns, d, off, n)
				if err != nil {
					return nil, err
				}
				defer rc.Close()
				return io.ReadAll(rc)
			}
			for _, r := range [][2]int64{
				{0, 1}, {0, size}, {4096, 100}, {mib - 1, 2}, {size / 2, cache.OutboardAlign},
				{size - 100, 100}, {size - 1, 1}, {size - 10, 100}, {1, size},
			} {
				off, n := r[0], r[1]
				want := tc.data[off:min(off+n, size)]
				got, err := read(off, n)
				if err != nil || !bytes.Equal(got, want) {
					t.Errorf("ReadRange(%d, %d): %d bytes, %v; want the %d bytes there", off, n, len(got), err, len(want))
				}
			}
			for _, r := range [][2]int64{{size + 1, 1}, {-1, 10}} {
				_, err := read(r[0], r[1])
				if err == nil || cache.IsCorrupt(err) || cache.IsNotFound(err) {
					t.Errorf("ReadRange(%d, %d) outside the blob: %v, want an error of the request", r[0], r[1], err)
				}
			}
		})
	}
}

func (s *suite) compressed(t *testing.T) {
	t.Run("Read", func(t *testing.T) {
		tier := s.h.New(t)
		cr, ok := tier.Cache.(cache.CompressedReader)
		if !ok {
			t.Skip("the tier has no compressed reads (cache.CompressedReader)")
		}
		ns := s.ns()
		for _, data := range [][]byte{vmLike(40, mib+5), vmLike(41, 20<<10), random(42, 100<<10), nil} {
			d := write(t, tier.Cache, ns, data)
			rc, zst, err := cr.ReadCompressed(ctxT(t), ns, d)
			if err != nil {
				t.Fatalf("ReadCompressed %s: %v", digest.String(d), err)
			}
			if zst {
				if rc, err = cache.NewZstdVerifyingReader(rc, ns.DigestFunction(), d); err != nil {
					t.Fatal(err)
				}
			}
			got, err := io.ReadAll(rc)
			rc.Close()
			if err != nil {
				t.Fatalf("ReadCompressed %s (zstd %v): %v", digest.String(d), zst, err)
			}
			if zst {
				if got, err = decodeZstd(got); err != nil {
					t.Fatalf("ReadCompressed %s: the zstd stream does not decode: %v", digest.String(d), err)
				}
			}
			if !bytes.Equal(got, data) {
				t.Fatalf("ReadCompressed %s (zstd %v): %d bytes that differ from the %d written", digest.String(d), zst, len(got), len(data))
			}
		}
	})
	t.Run("Write", func(t *testing.T) {
		tier := s.h.New(t)
		cw, ok := tier.Cache.(cache.CompressedWriter)
		if !ok {
			t.Skip("the tier has no compressed writes (cache.CompressedWriter)")
		}
		c := tier.Cache
		ns := s.ns()
		ctx := ctxT(t)
		for _, data := range [][]byte{vmLike(43, mib+5), random(44, 100<<10), vmLike(45, 20<<10)} {
			z := encodeZstd(data)
			d := digest.Compute(s.fn, data)
			wrong := &repb.Digest{Hash: digest.Compute(s.fn, data[1:]).Hash, SizeBytes: d.SizeBytes}
			err := cw.WriteCompressed(ctx, ns, wrong, bytes.NewReader(z))
			wantKind(t, err, errkind.InvalidArgument, "WriteCompressed of content not matching its digest", wrong.Hash)
			if !missing(t, c, ns, wrong) {
				t.Errorf("a rejected compressed write stored %s", digest.String(wrong))
			}
			if err := cw.WriteCompressed(ctx, ns, d, bytes.NewReader(z)); err != nil {
				t.Fatalf("WriteCompressed %s: %v", digest.String(d), err)
			}
			mustRead(t, c, ns, d, data)
		}
		// Bytes that are not zstd at all.
		data := random(46, 64<<10)
		d := digest.Compute(s.fn, data)
		err := cw.WriteCompressed(ctx, ns, d, bytes.NewReader(data))
		wantKind(t, err, errkind.InvalidArgument, "WriteCompressed of bytes that are not zstd", d.Hash)
		if !missing(t, c, ns, d) {
			t.Errorf("a write of bytes that are not zstd stored %s", digest.String(d))
		}
	})
}

func encodeZstd(b []byte) []byte {
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedDefault))
	if err != nil {
		panic(err)
	}
	defer enc.Close()
	return enc.EncodeAll(b, nil)
}

func decodeZstd(z []byte) ([]byte, error) {
	dec, err := zstd.NewReader(nil, zstd.WithDecoderMaxWindow(cache.MaxZstdWindow))
	if err != nil {
		return nil, err
	}
	defer dec.Close()
	return dec.DecodeAll(z, nil)
}

// parallel runs f(0..n-1) at once and returns their errors joined.
func parallel(n int, f func(i int) error) error {
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = f(i)
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// readBack reads d through Read (and Open) and compares it with want.
func readBack(ctx context.Context, c cache.Cache, ns cache.Namespace, d *repb.Digest, want []byte) error {
	got, err := readAll(ctx, c, ns, d)
	if err == nil && !bytes.Equal(got, want) {
		err = fmt.Errorf("%d bytes that differ from the %d written", len(got), len(want))
	}
	if o, ok := c.(cache.Opener); ok && err == nil {
		got, err = openAll(ctx, o, ns, d)
		if err == nil && !bytes.Equal(got, want) {
			err = fmt.Errorf("opened: %d bytes that differ from the %d written", len(got), len(want))
		}
	}
	if err != nil {
		return fmt.Errorf("reading %s: %w", digest.String(d), err)
	}
	return nil
}

func (s *suite) concurrentWriters(t *testing.T) {
	const writers = 8
	t.Run("same blob", func(t *testing.T) {
		tier := s.h.New(t)
		c := tier.Cache
		ns := s.ns()
		ctx := ctxT(t)
		data := vmLike(50, mib+5)
		d := digest.Compute(s.fn, data)
		if err := parallel(writers, func(int) error {
			if err := c.Write(ctx, ns, d, bytes.NewReader(data)); err != nil {
				return fmt.Errorf("Write %s: %w", digest.String(d), err)
			}
			return readBack(ctx, c, ns, d, data)
		}); err != nil {
			t.Fatal(err)
		}
		if err := parallel(writers, func(int) error { return readBack(ctx, c, ns, d, data) }); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("different blobs", func(t *testing.T) {
		tier := s.h.New(t)
		c := tier.Cache
		ns := s.ns()
		ctx := ctxT(t)
		sizes := [writers]int{1000, 64 << 10, mib + 1, 2 * mib, 3*mib + 5, 100, 4096000, 5000}
		var datas [writers][]byte
		var ds []*repb.Digest
		for i, n := range sizes {
			if i%2 == 0 {
				datas[i] = random(uint64(60+i), n)
			} else {
				datas[i] = vmLike(uint64(60+i), n)
			}
			ds = append(ds, digest.Compute(s.fn, datas[i]))
		}
		if err := parallel(writers, func(i int) error {
			if err := c.Write(ctx, ns, ds[i], bytes.NewReader(datas[i])); err != nil {
				return fmt.Errorf("Write %s: %w", digest.String(ds[i]), err)
			}
			return readBack(ctx, c, ns, ds[i], datas[i])
		}); err != nil {
			t.Fatal(err)
		}
		if m, err := c.FindMissing(ctx, ns, ds); err != nil || len(m) != 0 {
			t.Fatalf("FindMissing after the writes: %v missing, %v", len(m), err)
		}
		for i, d := range ds {
			mustRead(t, c, ns, d, datas[i])
		}
	})
}

// rangeReader is c's range reads, when it serves them: a cache.Tier says
// so in its traits; another cache, by being a cache.RangeReader.
func rangeReader(c cache.Cache) (cache.RangeReader, bool) {
	if t, ok := c.(cache.Tier); ok {
		return t, t.Traits().ServesRanges
	}
	rr, ok := c.(cache.RangeReader)
	return rr, ok
}
