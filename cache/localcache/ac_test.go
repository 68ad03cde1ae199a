package localcache

import (
	"context"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/protobuf/proto"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
)

func acEntry(name string) *repb.ActionResult {
	return &repb.ActionResult{
		ExitCode:    2,
		OutputFiles: []*repb.OutputFile{{Path: name, Digest: digest.Compute(digest.BLAKE3, []byte(name))}},
	}
}

// Every single-bit flip anywhere in a stored entry is detected: the entry
// reads back exactly as written or not at all.
func TestActionResultBitFlipsAreDetected(t *testing.T) {
	ctx := context.Background()
	c := newCache(t, t.TempDir(), Options{MaxBytes: 64 * mib})
	defer c.Close()
	key := &repb.Digest{Hash: digest.StringListHash("entry"), SizeBytes: 1}
	want := acEntry("art")
	if err := c.UpdateActionResult(ctx, ns, key, want); err != nil {
		t.Fatal(err)
	}
	rel, err := acRel(ns, key)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(c.Dir(), rel)
	orig, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for bit := 0; bit < len(orig)*8; bit++ {
		b := append([]byte(nil), orig...)
		b[bit/8] ^= 1 << (bit % 8)
		if err := os.WriteFile(path, b, 0o644); err != nil {
			t.Fatal(err)
		}
		c.stored(rel, 4096, true) // the index may have dropped it
		got, err := c.GetActionResult(ctx, ns, key)
		if err == nil && !proto.Equal(got, want) {
			t.Fatalf("bit %d flipped: read back a different entry %v", bit, got)
		}
		if err == nil {
			t.Fatalf("bit %d flipped: not detected", bit)
		}
		if !cache.IsCorrupt(err) {
			t.Fatalf("bit %d flipped: got %v, want a corrupt-entry error", bit, err)
		}
		if _, err := os.Stat(path); !os.IsNotExist(err) {
			t.Fatalf("bit %d flipped: corrupt entry was not removed", bit)
		}
	}
}

// An entry written before entries carried a checksum is still read.
func TestActionResultWithoutChecksumIsRead(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	c := newCache(t, dir, Options{MaxBytes: 64 * mib})
	key := &repb.Digest{Hash: digest.StringListHash("old"), SizeBytes: 1}
	want := acEntry("kernel")
	if err := c.UpdateActionResult(ctx, ns, key, want); err != nil {
		t.Fatal(err)
	}
	rel, _ := acRel(ns, key)
	b, _ := proto.MarshalOptions{Deterministic: true}.Marshal(want)
	if err := os.WriteFile(filepath.Join(dir, rel), b, 0o644); err != nil {
		t.Fatal(err)
	}
	c.Close()
	c = newCache(t, dir, Options{MaxBytes: 64 * mib})
	defer c.Close()
	got, err := c.GetActionResult(ctx, ns, key)
	if err != nil || !proto.Equal(got, want) {
		t.Fatalf("old-format entry: got %v, %v", got, err)
	}
}

// A FIFO at an entry's path is a corrupt entry, not a hang.
func TestActionResultFIFOIsNotOpenedBlocking(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	dir := t.TempDir()
	c := newCache(t, dir, Options{MaxBytes: 64 * mib})
	defer c.Close()
	key := &repb.Digest{Hash: digest.StringListHash("fifo"), SizeBytes: 1}
	if err := c.UpdateActionResult(ctx, ns, key, acEntry("x")); err != nil {
		t.Fatal(err)
	}
	rel, _ := acRel(ns, key)
	path := filepath.Join(dir, rel)
	os.Remove(path)
	if err := syscall.Mkfifo(path, 0o644); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { _, err := c.GetActionResult(ctx, ns, key); done <- err }()
	select {
	case err := <-done:
		if !cache.IsCorrupt(err) {
			t.Fatalf("FIFO entry: got %v, want a corrupt-entry error", err)
		}
	case <-ctx.Done():
		t.Fatal("reading an entry that is a FIFO blocked")
	}
}

// Many caches on one directory (as several processes) creating the same
// entry at once agree on one stored entry.
func TestCreateActionResultIsAtomic(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	key := &repb.Digest{Hash: digest.StringListHash("version"), SizeBytes: 1}
	for round := range 20 {
		key.Hash = digest.StringListHash("version", string(rune('a'+round)))
		const n = 6
		got := make([]*repb.ActionResult, n)
		created := make([]bool, n)
		var wg sync.WaitGroup
		for i := range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				c := newCache(t, dir, Options{MaxBytes: 64 * mib})
				defer c.Close()
				ar, ok, err := c.CreateActionResult(ctx, ns, key, acEntry(string(rune('A'+i))))
				if err != nil {
					t.Error(err)
					return
				}
				got[i], created[i] = ar, ok
			}()
		}
		wg.Wait()
		winners := 0
		for i := range n {
			if created[i] {
				winners++
			}
			if !proto.Equal(got[i], got[0]) {
				t.Fatalf("round %d: creator %d sees %v, creator 0 sees %v", round, i, got[i], got[0])
			}
		}
		if winners != 1 {
			t.Fatalf("round %d: %d creators say they created the entry, want 1", round, winners)
		}
	}
}
