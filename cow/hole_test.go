package cow

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/snaploader/snaploader/cache/localcache"
)

func TestIsHole(t *testing.T) {
	dir := t.TempDir()
	const cs = 64 << 10
	data := make([]byte, 4*cs)
	for i := cs; i < 2*cs; i++ { // chunk 1 holds data; 0, 2, 3 are zeros
		data[i] = byte(i)
	}
	path := filepath.Join(dir, "mem")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	lc, err := localcache.New(filepath.Join(dir, "cache"), localcache.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer lc.Close()
	s, _, err := FromFile(context.Background(), "mem", path, lc, lc, Options{ChunkSize: cs, TempDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := s.WriteAt([]byte{1}, 3*cs+10); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		off  int64
		want bool
	}{
		{0, true}, {cs - 1, true}, {cs, false}, {2*cs + 4096, true},
		{3 * cs, false}, // written: no longer a hole
		{-1, false}, {4 * cs, false},
	} {
		if got := s.IsHole(tc.off); got != tc.want {
			t.Errorf("IsHole(%d) = %v, want %v", tc.off, got, tc.want)
		}
	}
}
