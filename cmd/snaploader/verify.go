package main

import (
	"context"
	"fmt"
	"io"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
)

// runVerify re-hashes every blob the snapshot o selects needs, from the
// local cache or else the remote, and drops local copies that do not
// match; any mismatch or missing blob fails it.
func runVerify(ctx context.Context, o snapshotOptions, s streams) error {
	e, snap, err := openSnapshot(ctx, o)
	if err != nil {
		return err
	}
	defer e.Close()
	bad := 0
	kind := errkind.NotFound // of the failures: DataLoss when any blob was corrupt
	ns := cache.Namespace{Group: o.Cache.Group, Instance: snap.Key.GetInstanceName(), Function: snap.Function}
	check := func(what string, d *repb.Digest) {
		// The local copy is hashed whatever was verified before, and
		// dropped when it does not match, so the next restore
		// fetches it again.
		err := e.local.Verify(ctx, ns, d)
		if cache.IsNotFound(err) && e.remote != nil {
			var rc io.ReadCloser
			if rc, err = e.remote.Read(ctx, ns, d); err == nil {
				var got *repb.Digest
				// Stops at Ctrl-C even on a huge or endless blob.
				got, err = digest.ComputeReaderContext(ctx, snap.Function, rc)
				rc.Close()
				if err == nil && !digest.Equal(got, d) {
					err = cache.Corruptf("the remote's copy hashes to %s", digest.String(got))
				}
			}
		}
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			bad++
			if cache.IsCorrupt(err) {
				kind = errkind.DataLoss
			} else if kind != errkind.DataLoss && !cache.IsNotFound(err) {
				kind = errkind.Of(err)
			}
			fmt.Fprintf(s.Out, "BAD  %s %s: %v\n", what, digest.String(d), err)
		}
	}
	n := 0
	for _, f := range snap.Manifest.GetFiles() {
		check(fmt.Sprintf("file %q", f.GetPath()), f.GetDigest())
		n++
	}
	for _, cfile := range snap.Manifest.GetChunkedFiles() {
		for _, c := range cfile.GetChunks() {
			check(fmt.Sprintf("chunk %q@%d", cfile.GetName(), c.GetOffset()), c.GetDigest())
			n++
		}
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("verifying snapshot %s: interrupted: %w", snap.Manifest.GetVmMetadata().GetSnapshotId(), err)
	}
	if bad > 0 {
		return errkind.New(kind, "snapshot %s: %d of %d blobs failed verification (corrupt local copies were dropped: the next restore fetches them again)", snap.Manifest.GetVmMetadata().GetSnapshotId(), bad, n)
	}
	fmt.Fprintf(s.Out, "snapshot %s: all %d blobs verified\n", snap.Manifest.GetVmMetadata().GetSnapshotId(), n)
	return nil
}
