package cache_test

import (
	"context"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/internal/cachecount"
)

func TestCounting(t *testing.T) {
	ctx := context.Background()
	c := cachecount.NewCounting(newLocal(t, ""))
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
	want := cachecount.CountingStats{
		FindMissing: 1, FindMissingDigests: 2,
		Reads: 2, ReadBytes: mib,
		Writes: 2, WriteBytes: mib,
		ACGets: 1, ACPuts: 1,
	}
	if got := c.Stats(); got != want {
		t.Errorf("Stats = %+v\nwant    %+v", got, want)
	}
}

// Wrappers hide no capability: a counted, breaker-guarded, verified tier
// declares what the tier under it does.
func TestWrappersKeepTraits(t *testing.T) {
	lc := newLocal(t, "")
	for _, tc := range []struct {
		name string
		tier cache.Tier
	}{
		{"counting", cachecount.NewCounting(lc)},
		{"breaker", cache.WithBreaker(lc, cache.BreakerOptions{})},
		{"verifying", cache.Verifying(lc)},
		{"all", cachecount.NewCounting(cache.WithBreaker(cache.Verifying(lc), cache.BreakerOptions{}))},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, want := tc.tier.Traits(), lc.Traits()
			if got.VerifiesRanges != want.VerifiesRanges || got.ServesRanges != want.ServesRanges ||
				got.VerifiesCompressedReads != want.VerifiesCompressedReads || got.MaxBytes != want.MaxBytes || got.Description != want.Description {
				t.Errorf("traits %+v, want those of the local cache %+v", got, want)
			}
			if tc.name == "verifying" || tc.name == "all" {
				if !got.VerifiesReads {
					t.Error("a verified tier does not declare verified reads")
				}
			}
			data := randBytes(31, 100_000)
			d := put(t, tc.tier, data)
			rc, err := tc.tier.ReadRange(context.Background(), ns, d, 1000, 5000)
			if err != nil {
				t.Fatalf("range read through the wrapper: %v", err)
			}
			rc.Close()
			rc, _, err = tc.tier.ReadCompressed(context.Background(), ns, d)
			if err != nil {
				t.Fatalf("compressed read through the wrapper: %v", err)
			}
			rc.Close()
		})
	}
}
