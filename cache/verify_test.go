package cache_test

import (
	"bytes"
	"context"
	"os"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
)

func damage(t *testing.T, path string, how string) {
	t.Helper()
	switch how {
	case "flip":
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		b := []byte{0}
		f.ReadAt(b, 100)
		b[0] ^= 1
		f.WriteAt(b, 100)
		f.Close()
	case "truncate":
		os.Truncate(path, 1000)
	case "extend":
		os.Truncate(path, 2*mib)
	}
}

func TestVerifying(t *testing.T) {
	ctx := context.Background()
	for _, how := range []string{"intact", "flip", "truncate", "extend"} {
		t.Run(how, func(t *testing.T) {
			// The writing instance trusts its own blobs, so the damage
			// reaches the wrapper.
			c := newLocal(t, "")
			data := randBytes(1, mib)
			d := put(t, c, data)
			damage(t, c.Path(ns, d), how)
			got, err := cache.ReadAll(ctx, cache.Verifying(c), ns, d)
			if how == "intact" {
				if err != nil || !bytes.Equal(got, data) {
					t.Fatalf("ReadAll: %v", err)
				}
				return
			}
			if status.Code(err) != codes.DataLoss || !strings.Contains(err.Error(), d.Hash) {
				t.Fatalf("ReadAll: %v, want DataLoss naming the digest", err)
			}
		})
	}
	t.Run("errors pass through", func(t *testing.T) {
		c := newLocal(t, "")
		d := digest.Compute(digest.BLAKE3, []byte("absent"))
		if _, err := cache.Verifying(c).Read(ctx, ns, d); !cache.IsNotFound(err) {
			t.Errorf("Read: %v, want NotFound", err)
		}
	})
}

// down is a remote whose reads fail as a tier that is down would.

func TestVerifyingIsIdempotent(t *testing.T) {
	lc := newLocal(t, t.TempDir())
	once := cache.Verifying(lc)
	if twice := cache.Verifying(once); twice != once {
		t.Error("Verifying of a verifying cache wrapped it again")
	}
	if !once.Traits().VerifiesReads {
		t.Error("Verifying's result does not declare that it verifies")
	}
}
