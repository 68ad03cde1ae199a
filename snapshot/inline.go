package snapshot

import (
	"context"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/proto/snapshotpb"
)

// Inline blobs: a manifest written to the remote carries copies of its
// chunk trees and small artifact files (snapshotpb.InlineBlobs), so that a
// restore has everything it needs before the first chunk once it has read
// the manifest, instead of one more round trip for the trees and files.
// The blobs are stored in the CAS as well: a reader that does not use the
// copies, or finds one that does not match its digest, fetches them.
const (
	// maxInlineBlob is the largest blob copied into a manifest.
	maxInlineBlob = 512 << 10
	// maxInlineTotal bounds a manifest's copies together: action-cache
	// entries of some REAPI caches are limited to a few MiB.
	maxInlineTotal = 1 << 20
)

// inlineBlobs reads from the local cache the blobs a remote manifest of m
// carries: the trees first (every lazy restore needs them), then the
// artifact files, in the manifest's order, while they fit. A blob the
// local cache cannot read is left out.
func (l *Loader) inlineBlobs(ctx context.Context, ns cache.Namespace, m *snapshotpb.SnapshotManifest, trees map[string]*repb.Digest) []*snapshotpb.InlineBlob {
	var ds []*repb.Digest
	for _, cf := range m.GetChunkedFiles() {
		if d := trees[cf.GetName()]; d != nil {
			ds = append(ds, d)
		}
	}
	for _, f := range m.GetFiles() {
		ds = append(ds, f.GetDigest())
	}
	var out []*snapshotpb.InlineBlob
	total := int64(0)
	for _, d := range ds {
		n := d.GetSizeBytes()
		if n > maxInlineBlob || total+n > maxInlineTotal {
			continue
		}
		b, err := cache.ReadAll(ctx, l.local, ns, d)
		if err != nil {
			l.opts.Logger.Debug("not copying a blob into the manifest", "digest", digest.String(d), "err", err)
			continue
		}
		out = append(out, &snapshotpb.InlineBlob{Digest: d, Data: b})
		total += n
	}
	return out
}

// inlineCopies returns the copies of blobs a manifest carries whose bytes
// match their digests under fn, by digest.
func inlineCopies(ar *repb.ActionResult, fn digest.Function) map[string][]byte {
	var copies map[string][]byte
	for _, a := range ar.GetExecutionMetadata().GetAuxiliaryMetadata() {
		ib := &snapshotpb.InlineBlobs{}
		if !a.MessageIs(ib) || a.UnmarshalTo(ib) != nil {
			continue
		}
		for _, b := range ib.GetBlobs() {
			if d := b.GetDigest(); digest.Equal(digest.Compute(fn, b.GetData()), d) {
				if copies == nil {
					copies = make(map[string][]byte)
				}
				copies[digest.String(d)] = b.GetData()
			}
		}
	}
	return copies
}
