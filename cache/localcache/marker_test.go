package localcache

import (
	"bytes"
	"context"
	"os"
	"strconv"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
)

// readBytes is this process's read(2) byte count (/proc/self/io rchar).
func readBytes(t *testing.T) int64 {
	t.Helper()
	b, err := os.ReadFile("/proc/self/io")
	if err != nil {
		t.Skipf("no /proc/self/io: %v", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "rchar: "); ok {
			n, _ := strconv.ParseInt(v, 10, 64)
			return n
		}
	}
	t.Fatal("no rchar in /proc/self/io")
	return 0
}

// TestVerificationMarkers checks that a blob verified in this boot is not
// hashed again by a new process (it is opened without reading it), and
// that every other case is verified: another boot (after a crash), a file
// put in place by something else, a file whose size changed.
func TestVerificationMarkers(t *testing.T) {
	ctx := context.Background()
	const size = 4 * mib
	tests := []struct {
		name       string
		boot       string
		damage     func(t *testing.T, c *Cache, path string)
		wantHashed bool
		wantErr    bool
	}{
		{"same boot", "boot-1", nil, false, false},
		{"another boot", "boot-2", nil, true, false},
		{"another boot, torn", "boot-2", func(t *testing.T, _ *Cache, p string) { flipByte(t, p, 12345) }, true, true},
		{"file replaced", "boot-1", func(t *testing.T, c *Cache, p string) {
			b, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			b[100] ^= 1
			tmp := p + ".new"
			if err := os.WriteFile(tmp, b, 0o644); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(tmp, p); err != nil {
				t.Fatal(err)
			}
		}, true, true},
		{"file truncated", "boot-1", func(t *testing.T, _ *Cache, p string) { os.Truncate(p, size-4096) }, false, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			c1 := newCache(t, dir, Options{BootID: "boot-1"})
			data := content(7, size)
			d := put(t, c1, ns, data)
			c1.Close()
			if tt.damage != nil {
				tt.damage(t, c1, c1.Path(ns, d))
			}
			c2 := newCache(t, dir, Options{BootID: tt.boot})
			defer c2.Close()
			before := readBytes(t)
			b, err := c2.Open(ctx, ns, d)
			hashed := readBytes(t)-before >= size/2
			if tt.wantErr {
				if status.Code(err) != codes.DataLoss || !strings.Contains(err.Error(), d.Hash) {
					t.Fatalf("Open = %v, want Internal naming the digest", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			got := make([]byte, size)
			b.ReadAt(got, 0)
			b.Close()
			if !bytes.Equal(got, data) {
				t.Fatal("content differs")
			}
			if hashed != tt.wantHashed {
				t.Errorf("blob hashed on Open: %v, want %v", hashed, tt.wantHashed)
			}
			// Once verified, the blob carries this boot's marker.
			c3 := newCache(t, dir, Options{BootID: tt.boot})
			defer c3.Close()
			if _, err := cache.ReadAll(ctx, c3, ns, d); err != nil {
				t.Fatal(err)
			}
			f, _ := os.Open(c3.Path(ns, d))
			defer f.Close()
			if !c3.markedVerified(f, casRel(ns.DigestFunction(), d)) {
				t.Error("no marker after verification")
			}
		})
	}
}
