package cache_test

import (
	"context"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
)

func TestCounting(t *testing.T) {
	ctx := context.Background()
	c := cache.NewCounting(newLocal(t, ""))
	data := randBytes(30, mib)
	d := put(t, c, data)
	put(t, c, data) // present: not consumed again
	if _, err := cache.ReadAll(ctx, c, ns, d); err != nil {
		t.Fatal(err)
	}
	absent := digest.Compute(digest.BLAKE3, []byte("x"))
	if _, err := c.Read(ctx, ns, absent); !cache.IsNotFound(err) {
		t.Fatal(err)
	}
	if _, err := c.FindMissing(ctx, ns, []*repb.Digest{d, absent}); err != nil {
		t.Fatal(err)
	}
	if err := c.UpdateActionResult(ctx, ns, absent, &repb.ActionResult{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.GetActionResult(ctx, ns, absent); err != nil {
		t.Fatal(err)
	}
	want := cache.CountingStats{
		FindMissing: 1, FindMissingDigests: 2,
		Reads: 2, ReadBytes: mib,
		Writes: 2, WriteBytes: mib,
		ACGets: 1, ACPuts: 1,
	}
	if got := c.Stats(); got != want {
		t.Errorf("Stats = %+v\nwant    %+v", got, want)
	}
}
