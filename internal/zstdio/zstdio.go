// Package zstdio is the one place snaploader sets up zstd: the encoder
// every tier and transfer compresses with, and decoders whose memory is
// bounded whatever a frame's header asks for.
package zstdio

import (
	"io"

	"github.com/klauspost/compress/zstd"
)

// Window bounds: MinWindow is accepted for a blob of any size (what the
// reference encoder's levels ask for on streamed input, and what a chunk
// fits in); MaxWindow bounds every decoder.
const (
	MinWindow = 8 << 20
	MaxWindow = 64 << 20
)

// Window is the largest window a decoder accepts for a blob of size bytes:
// the blob's size, within [MinWindow, MaxWindow]. A frame asking for more
// cannot be one of that blob's (a window need not exceed the content).
func Window(size int64) uint64 {
	return uint64(min(max(size, MinWindow), MaxWindow))
}

// NewEncoder returns an encoder at the fastest level on one goroutine,
// with opts added (a window size, checksums).
func NewEncoder(opts ...zstd.EOption) *zstd.Encoder {
	e, err := zstd.NewWriter(nil, append([]zstd.EOption{zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1)}, opts...)...)
	if err != nil {
		panic("zstd encoder options: " + err.Error()) // fixed options: a bug
	}
	return e
}

// NewDecoder returns a decoder of r on one goroutine, in low-memory mode,
// that refuses frames with a window over maxWindow, with opts added.
func NewDecoder(r io.Reader, maxWindow uint64, opts ...zstd.DOption) (*zstd.Decoder, error) {
	return zstd.NewReader(r, append([]zstd.DOption{zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true), zstd.WithDecoderMaxWindow(maxWindow)}, opts...)...)
}
