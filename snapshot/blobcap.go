package snapshot

import (
	"cmp"
	"context"
	"fmt"
	"slices"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cow"
	"github.com/snaploader/snaploader/digest"
)

// largeArtifact is the size above which an artifact file is uploaded
// before the chunked files, so that a refusal of its size can still turn
// it into chunks; smaller ones go with the trees in batch calls.
const largeArtifact = 1 << 20

// refusedForSize reports whether err, from uploading one blob, is how a
// cache that caps blob sizes without stating the cap refuses a larger
// blob (codes vary: InvalidArgument, ResourceExhausted, FailedPrecondition).
func refusedForSize(err error) bool {
	switch status.Code(err) {
	case codes.InvalidArgument, codes.ResourceExhausted, codes.FailedPrecondition:
		return true
	}
	return false
}

// uploadLargeArtifacts uploads to the remote, from the local cache, the
// artifact files among files larger than largeArtifact that it lacks, one
// at a time from the smallest. One the remote refuses (see refusedForSize)
// is split into a chunked artifact in the local cache instead, and so is
// every larger one without an attempt: the smallest refused size is the
// remote's learned limit for the rest of the save. It returns the files
// left whole and the new stores (to save as chunked artifacts), also when
// it fails.
func (l *Loader) uploadLargeArtifacts(ctx context.Context, ns cache.Namespace, req *SaveRequest, files []*repb.OutputFile) ([]*repb.OutputFile, []*cow.Store, error) {
	large := make([]*repb.OutputFile, 0, len(files))
	for _, f := range files {
		if f.GetDigest().GetSizeBytes() > largeArtifact {
			large = append(large, f)
		}
	}
	slices.SortStableFunc(large, func(a, b *repb.OutputFile) int {
		return cmp.Compare(a.GetDigest().GetSizeBytes(), b.GetDigest().GetSizeBytes())
	})
	refused := map[string]bool{}
	var stores []*cow.Store
	var limit int64 // the smallest size refused, 0 before any refusal
	for _, f := range large {
		size := f.GetDigest().GetSizeBytes()
		if limit == 0 || size < limit {
			_, _, err := l.copyMissing(ctx, ns, []*repb.Digest{f.GetDigest()}, l.local, l.remote)
			if err == nil {
				continue
			}
			if !refusedForSize(err) {
				return files, stores, fmt.Errorf("artifact file %q: %w", f.GetPath(), err)
			}
			limit = size
			l.opts.Logger.Warn("the remote refused an artifact file as one blob (it may take no blob this large without saying so: --remote-max-blob-bytes states such a limit); storing it and larger ones as chunks",
				"file", f.GetPath(), "bytes", size, "err", err)
		}
		s, err := l.artifactChunks(ctx, ns, req, f, limit)
		if err != nil {
			return files, stores, err
		}
		stores = append(stores, s)
		refused[f.GetPath()] = true
	}
	whole := make([]*repb.OutputFile, 0, len(files))
	for _, f := range files {
		if !refused[f.GetPath()] {
			whole = append(whole, f)
		}
	}
	return whole, stores, nil
}

// artifactChunks splits artifact file f, of which the remote refused blobs
// of limit bytes, into a chunked store in the local cache: chunks of the
// save's chunk size, at most half the refused size.
func (l *Loader) artifactChunks(ctx context.Context, ns cache.Namespace, req *SaveRequest, f *repb.OutputFile, limit int64) (*cow.Store, error) {
	cs := req.ChunkSize
	if cs <= 0 {
		cs = cow.DefaultChunkSize
	}
	if m := l.opts.RemoteMaxBlobBytes; m > 0 {
		cs = min(cs, (m-m/512-cow.PageSize)/cow.PageSize*cow.PageSize)
	}
	cs = min(cs, limit/2/cow.PageSize*cow.PageSize)
	size := f.GetDigest().GetSizeBytes()
	if cs <= 0 {
		return nil, status.Errorf(codes.FailedPrecondition, "artifact file %q of %d bytes: the remote refused it as one blob and a chunk must be a whole number of pages under half its size", f.GetPath(), size)
	}
	s, _, err := cow.FromFile(ctx, f.GetPath(), req.Files[f.GetPath()], l.local, l.local, cow.Options{Namespace: ns, ChunkSize: cs, TempDir: l.local.TempDir()})
	if err != nil {
		return nil, fmt.Errorf("artifact file %q of %d bytes (%s), which the remote takes no blob as large as, as chunks of %d bytes: %w", f.GetPath(), size, digest.String(f.GetDigest()), cs, err)
	}
	return s, nil
}
