package cache

import (
	"bytes"
	"context"
	"io"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"

	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
	"github.com/snaploader/snaploader/internal/zstdio"
)

// WriteBytes is PutHashed of a tier that hashes what it stores anyway
// (a remote, a wrapper that seals or counts): Write of data.
func WriteBytes(ctx context.Context, c Cache, ns Namespace, d *repb.Digest, data []byte) error {
	return c.Write(ctx, ns, d, bytes.NewReader(data))
}

// WriteDecoded is WriteCompressed of a tier that stores content as it is
// (no zstd at rest): the frames r yields are decoded, with a window
// bounded by d's size, and the content written with Write, which verifies
// it against d. Frames that do not decode are InvalidArgument naming d,
// and nothing is stored.
func WriteDecoded(ctx context.Context, c Cache, ns Namespace, d *repb.Digest, r io.Reader) error {
	dec, err := zstdio.NewDecoder(r, zstdio.Window(d.GetSizeBytes()))
	if err != nil {
		return errkind.New(errkind.InvalidArgument, "writing compressed blob %s: %v", digest.String(d), err)
	}
	defer dec.Close()
	return c.Write(ctx, ns, d, &undecodable{r: dec, d: d})
}

// undecodable turns a decoding error into InvalidArgument: the uploaded
// frames are bad input, not stored data gone bad.
type undecodable struct {
	r io.Reader
	d *repb.Digest
}

func (u *undecodable) Read(p []byte) (int, error) {
	n, err := u.r.Read(p)
	if err != nil && err != io.EOF {
		err = errkind.New(errkind.InvalidArgument, "writing compressed blob %s: zstd: %w", digest.String(u.d), err)
	}
	return n, err
}
