package remote

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/klauspost/compress/zstd"
	"github.com/snaploader/snaploader/internal/zstdio"
)

var encoder = zstdio.NewEncoder()

var decPool sync.Pool

func getDecoder(r io.Reader) (*zstd.Decoder, error) {
	if d, ok := decPool.Get().(*zstd.Decoder); ok {
		if err := d.Reset(r); err == nil {
			return d, nil
		}
		d.Close()
	}
	// Frame checksums are not checked: every blob this package decodes is
	// verified against its digest, which a checksum cannot add to.
	return zstdio.NewDecoder(r, maxDecoderWindow, zstd.IgnoreChecksum(true))
}

func putDecoder(d *zstd.Decoder) {
	d.Reset(nil)
	decPool.Put(d)
}

// decodeAll decodes a zstd blob of size bytes. The output is bounded by
// the size, never by the frames' claims: data that decodes to more is an
// error as soon as it does (a zstd bomb allocates nothing more). Windows
// up to maxDecoderWindow are accepted whatever the size.
func decodeAll(data []byte, size int64) ([]byte, error) {
	dec, err := getDecoder(bytes.NewReader(data))
	if err != nil {
		return nil, err
	}
	defer putDecoder(dec)
	out := make([]byte, size+1)
	n, err := io.ReadFull(dec, out)
	switch {
	case err == nil:
		return nil, fmt.Errorf("zstd data decodes to more than %d bytes", size)
	case errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF):
		return out[:n], nil
	}
	return nil, err
}
