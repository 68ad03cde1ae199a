package digest

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/snaploader/snaploader/internal/testutil"
)

// Hashing a huge (sparse) file stops promptly when its context ends.
func TestComputeReaderContextCancel(t *testing.T) {
	p := filepath.Join(t.TempDir(), "huge")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(1 << 40); err != nil {
		testutil.Unavailable(t, "a 1 TiB sparse file (the filesystem of the temporary directory): "+err.Error())
	}
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(200*time.Millisecond, cancel)
	start := time.Now()
	done := make(chan error, 1)
	go func() {
		_, err := ComputeReaderContext(ctx, BLAKE3, f)
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("hashing ended with %v, want context.Canceled", err)
		}
		if !strings.Contains(err.Error(), "stopped after") {
			t.Errorf("error %q does not say how far hashing got", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("hashing a 1 TiB sparse file still running %v after cancellation", time.Since(start))
	}
}

func TestComputeReaderContextMatches(t *testing.T) {
	for _, fn := range []Function{BLAKE3, SHA256} {
		data := []byte(strings.Repeat("snaploader", 300000))
		got, err := ComputeReaderContext(context.Background(), fn, strings.NewReader(string(data)))
		if err != nil {
			t.Fatal(err)
		}
		if want := Compute(fn, data); !Equal(got, want) {
			t.Fatalf("%v: ComputeReaderContext = %s, Compute = %s", fn, String(got), String(want))
		}
	}
}
