package localcache

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/digest"
)

func TestNonRegularBlobFileIsCorrupt(t *testing.T) {
	for _, tc := range []struct {
		name    string
		indexed bool // the blob was written by this Cache before being replaced
		open    bool // Open instead of Read
		place   func(t *testing.T, path string)
	}{
		{"fifo, indexed, Read", true, false, mkfifo},
		{"fifo, indexed, Open", true, true, mkfifo},
		{"fifo, another process's, Read", false, false, mkfifo},
		{"symlink, indexed, Read", true, false, func(t *testing.T, path string) {
			if err := os.Symlink("/dev/zero", path); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newCache(t, t.TempDir(), Options{MaxBytes: 64 * mib})
			data := content(11, 100_000)
			d := digest.Compute(ns.Function, data)
			path := c.Path(ns, d)
			if tc.indexed {
				put(t, c, ns, data)
				if err := os.Remove(path); err != nil {
					t.Fatal(err)
				}
			} else if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
				t.Fatal(err)
			}
			tc.place(t, path)
			done := make(chan error, 1)
			go func() {
				if tc.open {
					b, err := c.Open(context.Background(), ns, d)
					if err == nil {
						b.Close()
					}
					done <- err
					return
				}
				rc, err := c.Read(context.Background(), ns, d)
				if err == nil {
					_, err = io.ReadAll(rc)
					rc.Close()
				}
				done <- err
			}()
			var err error
			select {
			case err = <-done:
			case <-time.After(5 * time.Second):
				// Unblock the reader so the test can end.
				if f, ferr := os.OpenFile(path, os.O_WRONLY|syscall.O_NONBLOCK, 0); ferr == nil {
					f.Close()
				}
				t.Fatal("reading a blob whose file is not a regular file blocked")
			}
			if status.Code(err) != codes.DataLoss || !strings.Contains(err.Error(), d.Hash) {
				t.Fatalf("got %v, want Internal naming the digest", err)
			}
			if strings.Contains(err.Error(), c.Dir()) {
				t.Errorf("error names the cache directory: %v", err)
			}
			if _, err := os.Lstat(path); !os.IsNotExist(err) {
				t.Errorf("the non-regular file was left in place (%v)", err)
			}
			if p := present(t, c, d); p[0] {
				t.Error("the blob is still reported present")
			}
			// A good copy can be stored again.
			put(t, c, ns, data)
			if got, err := readBlob(c, d); err != nil || string(got) != string(data) {
				t.Fatalf("re-stored blob: %v", err)
			}
		})
	}
}

func mkfifo(t *testing.T, path string) {
	if err := syscall.Mkfifo(path, 0o644); err != nil {
		t.Fatal(err)
	}
}

func readBlob(c *Cache, d *repb.Digest) ([]byte, error) {
	rc, err := c.Read(context.Background(), ns, d)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	return io.ReadAll(rc)
}

func TestReservationsCountTowardTheBound(t *testing.T) {
	c := newCache(t, t.TempDir(), Options{MaxBytes: 8 * mib})
	var ds []*repb.Digest
	for i := range 6 {
		ds = append(ds, put(t, c, ns, content(uint64(100+i), mib)))
	}
	r, err := c.Reserve(5 * mib)
	if err != nil {
		t.Fatal(err)
	}
	if c.Usage()+c.Reserved() > c.MaxBytes() {
		t.Fatalf("usage %d + reserved %d over the bound", c.Usage(), c.Reserved())
	}
	if p := present(t, c, ds...); p[0] || !p[5] {
		t.Errorf("reserving did not evict least recently used first: %v", p)
	}
	if _, err := c.Reserve(4 * mib); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("reservations beyond the bound: %v, want ResourceExhausted", err)
	}
	// PutFile turns a reserved scratch file into an entry, counted once.
	data := content(200, 3*mib)
	d := digest.Compute(ns.Function, data)
	f, err := os.CreateTemp(c.TempDir(), "upload-*")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	f.Write(data)
	before := c.Usage()
	if err := c.PutFile(context.Background(), ns, d, f, r); err != nil {
		t.Fatal(err)
	}
	if c.Reserved() != 0 || c.Usage() < before {
		t.Errorf("after PutFile: reserved %d, usage %d (was %d)", c.Reserved(), c.Usage(), before)
	}
	if _, err := os.Stat(f.Name()); !os.IsNotExist(err) {
		t.Errorf("the scratch file is still there: %v", err)
	}
	if got, err := readBlob(c, d); err != nil || string(got) != string(data) {
		t.Fatalf("reading the put file: %v", err)
	}
	r.Release() // idempotent
	if c.Reserved() != 0 {
		t.Fatal(fmt.Sprint("double release: reserved ", c.Reserved()))
	}
}
