package encrypted

import (
	"bytes"
	"context"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"

	"github.com/snaploader/snaploader/digest"
)

// WriteReporting says whether the ciphertext went to the wrapped tier: a
// process that has not seen a blob reports it missing, seals it and finds
// its ciphertext stored already.
func TestWriteReportingSaysWhatWasUploaded(t *testing.T) {
	inner, r := newInner(t), ring(t, 1)
	for _, tc := range []struct {
		name string
		size int
		seed uint64
	}{
		{"small", 1000, 1},
		{"sealed on disk", 1 << 20, 2}, // above wrap's MemoryLimit
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := blobWith(tc.seed, tc.size)
			d := digest.Compute(ns.Function, b)
			for i, want := range []bool{true, false} {
				c := wrap(t, inner, r) // a new process each time
				missing, err := c.FindMissing(context.Background(), ns, []*repb.Digest{d})
				if err != nil || len(missing) != 1 {
					t.Fatalf("process %d: FindMissing = %v, %v; want the blob missing (its ciphertext is unknown here)", i, missing, err)
				}
				up, err := c.WriteReporting(context.Background(), ns, d, bytes.NewReader(b))
				if err != nil || up != want {
					t.Fatalf("process %d: WriteReporting = %v, %v; want %v", i, up, err, want)
				}
			}
		})
	}
}
