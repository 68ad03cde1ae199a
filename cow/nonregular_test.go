package cow

import (
	"context"
	"net"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/internal/testutil"
)

// FromFile refuses anything but a regular file, promptly and naming the
// path: a FIFO with no writer would otherwise block the open forever, and a
// device such as /dev/zero would be read without end.
func TestFromFileRefusesNonRegular(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "sock")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	tests := []struct {
		name, path, kind string
	}{
		{"fifo", fifo, "FIFO"},
		{"dev-zero", "/dev/zero", "character device"},
		{"directory", dir, "directory"},
		{"socket", sock, "socket"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if strings.HasPrefix(tc.path, "/dev/") {
				testutil.RequireDevice(t, tc.path)
			}
			cas := newDirCAS(t)
			done := make(chan error, 1)
			go func() {
				s, _, err := FromFile(context.Background(), "mem", tc.path, cas, cas, testOpts(t))
				if s != nil {
					s.Close()
				}
				done <- err
			}()
			select {
			case err := <-done:
				if status.Code(err) != codes.InvalidArgument {
					t.Fatalf("FromFile(%s) = %v, want InvalidArgument", tc.path, err)
				}
				if msg := err.Error(); !strings.Contains(msg, tc.path) || !strings.Contains(msg, tc.kind) {
					t.Fatalf("FromFile(%s) error %q does not name the path and %q", tc.path, msg, tc.kind)
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("FromFile(%s) still blocked after 10s", tc.path)
			}
		})
	}
}
