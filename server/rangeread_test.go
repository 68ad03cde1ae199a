package server_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"testing"

	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/server"
)

// TestRangeReadsVerifyTheBackend checks reads of part of a blob, which the
// server answers from the range alone over the local cache: they return
// the right bytes from raw and compressed blobs, and after a crash (a new
// boot) a blob damaged at rest is refused, named, and dropped so that a
// client's upload repairs it.
func TestRangeReadsVerifyTheBackend(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name string
		blob []byte
	}{
		{"raw", data(3 << 20)},
		{"compressed", compressible(3<<20, 5)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			lc, err := localcache.New(dir, localcache.Options{MaxBytes: 1 << 30, Compression: true})
			if err != nil {
				t.Fatal(err)
			}
			e := serveOn(t, lc, lc, server.Options{TempDir: t.TempDir()})
			d := sha(tc.blob)
			if _, err := e.write(ctx, &bspb.WriteRequest{ResourceName: uploadName(d, "r"), Data: tc.blob, FinishWrite: true}); err != nil {
				t.Fatal(err)
			}
			name := fmt.Sprintf("blobs/%s/%d", d.Hash, d.SizeBytes)
			read := func(e *env, off, limit int64) ([]byte, error) {
				stream, err := e.bs.Read(ctx, &bspb.ReadRequest{ResourceName: name, ReadOffset: off, ReadLimit: limit})
				if err != nil {
					return nil, err
				}
				var got []byte
				for {
					m, err := stream.Recv()
					if err == io.EOF {
						return got, nil
					}
					if err != nil {
						return got, err
					}
					got = append(got, m.Data...)
				}
			}
			for _, r := range [][2]int64{{0, 16 << 10}, {1 << 20, 4096}, {d.SizeBytes - 100, 1000}, {12345, 0}} {
				got, err := read(e, r[0], r[1])
				want := tc.blob[r[0]:]
				if r[1] > 0 {
					want = want[:min(int64(len(want)), r[1])]
				}
				if err != nil || !bytes.Equal(got, want) {
					t.Fatalf("range %v: %d bytes, %v; want %d bytes", r, len(got), err, len(want))
				}
			}
			// Damage the stored file, then restart the server as after a crash.
			path := lc.Path(cache.Namespace{Function: digest.SHA256}, d)
			f, err := os.OpenFile(path, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			fi, _ := f.Stat()
			f.WriteAt([]byte{0xff, 0x00, 0xff}, fi.Size()/2)
			f.Close()
			lc2, err := localcache.New(dir, localcache.Options{MaxBytes: 1 << 30, BootID: "after-a-crash"})
			if err != nil {
				t.Fatal(err)
			}
			e2 := serveOn(t, lc2, lc2, server.Options{TempDir: t.TempDir()})
			_, err = read(e2, 1<<20, 4096)
			if status.Code(err) != codes.DataLoss || !strings.Contains(err.Error(), d.Hash) {
				t.Fatalf("range read of a damaged blob: %v, want Internal naming it", err)
			}
			if e2.present(t, digest.SHA256, d) {
				t.Error("the damaged blob is still reported present")
			}
		})
	}
}
