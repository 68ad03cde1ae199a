package e2e

import (
	"context"
	"fmt"
	"strconv"
	"testing"

	"github.com/minio/minio-go/v7"

	"github.com/snaploader/snaploader/internal/testutil"
)

// BenchmarkS3CompressionAtRest measures the bytes a VM-like image
// (SNAPLOADER_BENCH_MIB MiB, default 1024; the image of
// BenchmarkServeCompression) takes in a MinIO bucket behind `serve --s3`,
// with compression at rest off (as stored before) and on.
//
//	SNAPLOADER_BENCH_MIB=1024 go test -run '^$' -bench S3CompressionAtRest -benchtime 1x ./e2e/
func BenchmarkS3CompressionAtRest(b *testing.B) {
	m, ok := tryMinIO(b)
	if !ok {
		b.Skip("minio not installed")
	}
	size := benchMiB(b) << 20
	img := testutil.VMImage(12, size)
	ds, chunks := vmChunks(img)
	env := []string{"AWS_ACCESS_KEY_ID=" + m.AccessKey, "AWS_SECRET_ACCESS_KEY=" + m.SecretKey}
	for _, on := range []bool{false, true} {
		b.Run(fmt.Sprintf("compression=%v", on), func(b *testing.B) {
			ctx := context.Background()
			for b.Loop() {
				bucket := m.NewBucket(b)
				srv := startServe(b, env, "--s3", fmt.Sprintf("s3://%s?endpoint=%s&secure=false", bucket, m.Endpoint), "--compression="+strconv.FormatBool(on))
				c := newBSClient(b, srv.addr)
				for i, d := range ds {
					if err := c.upload(ctx, d, chunks[i]); err != nil {
						b.Fatal(err)
					}
				}
				var stored int64
				for o := range m.Client.ListObjects(ctx, bucket, minio.ListObjectsOptions{Recursive: true}) {
					if o.Err != nil {
						b.Fatal(o.Err)
					}
					stored += o.Size
				}
				b.ReportMetric(float64(stored)/(1<<20), "stored-MiB")
				b.ReportMetric(float64(stored)/float64(size), "stored/image")
				srv.stop()
			}
		})
	}
}
