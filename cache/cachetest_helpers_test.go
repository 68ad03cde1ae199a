package cache_test

import (
	"bytes"
	"context"
	"math/rand/v2"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/digest"
)

const mib = 1 << 20

var ns = cache.Namespace{Instance: "ci", Function: digest.BLAKE3}

func randBytes(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 3))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func newLocal(t testing.TB, dir string) *localcache.Cache {
	t.Helper()
	return newLocalBoot(t, dir, "")
}

// newLocalBoot is newLocal as a process of the boot named boot would open
// it ("" for this one): after a crash, nothing written before is trusted.
func newLocalBoot(t testing.TB, dir, boot string) *localcache.Cache {
	t.Helper()
	if dir == "" {
		dir = t.TempDir()
	}
	c, err := localcache.New(dir, localcache.Options{BootID: boot})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func put(t testing.TB, c cache.Tier, data []byte) *repb.Digest {
	t.Helper()
	d := digest.Compute(digest.BLAKE3, data)
	if err := c.Write(context.Background(), ns, d, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	return d
}
