package remote

import (
	"bytes"
	"fmt"
	"os/exec"
	"strings"
	"testing"

	"github.com/snaploader/snaploader/internal/testutil"
)

// zstdCLI compresses b with the reference encoder reading a pipe (frames
// without a content size).
func zstdCLI(t *testing.T, b []byte, args ...string) []byte {
	t.Helper()
	cmd := exec.Command(testutil.LookPath(t, "zstd"), append([]string{"-c", "-q"}, args...)...)
	cmd.Stdin = struct{ *bytes.Reader }{bytes.NewReader(b)} // not an *os.File: a pipe
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("zstd %v: %v\n%s", args, err, stderr.String())
	}
	return out.Bytes()
}

func TestDecodeReferenceFramesBoundedBySize(t *testing.T) {
	for _, n := range []int{100, 900, 200_000, 3 << 20} {
		for _, args := range [][]string{nil, {"-19"}} {
			t.Run(fmt.Sprint(n, args), func(t *testing.T) {
				b := []byte(strings.Repeat(fmt.Sprintf("chunk %d of a snapshot\n", n), n/20+1))[:n]
				z := zstdCLI(t, b, args...)
				got, err := decodeAll(z, int64(n))
				if err != nil || !bytes.Equal(got, b) {
					t.Fatalf("decoding %d bytes the reference encoder made: %v", len(z), err)
				}
				// Claimed one byte short: refused, not decoded whole.
				if _, err := decodeAll(z, int64(n-1)); err == nil {
					t.Fatal("data decoding beyond the claimed size was accepted")
				}
			})
		}
	}
}
