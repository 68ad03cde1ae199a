package cow

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
)

// Options configures a Store. The zero value gives the defaults.
type Options struct {
	// Namespace is passed to the Source and Sink; its Function is the digest
	// function of the chunks (BLAKE3 when unset).
	Namespace cache.Namespace
	// ChunkSize is the chunk size FromFile splits with (Open takes it from
	// the ChunkedFile). Default DefaultChunkSize; must be a multiple of
	// PageSize and at most MaxChunkSize.
	ChunkSize int64
	// ReadAhead is the most chunks after a touched one that are opened in
	// the background: a reader touching chunk after chunk gets as many as
	// it consumes while two fetches complete, up to ReadAhead; a first or
	// out-of-order touch gets 4. Default DefaultReadAhead; negative
	// disables read-ahead.
	ReadAhead int
	// PrefetchConcurrency bounds concurrent background opens (and so the
	// memory of chunks in flight). Within it, as many run as keep about one
	// bandwidth-delay product of the link in flight, measured from the
	// fetches that complete: two on a fast link with short round trips,
	// more as latency grows. Default: as many chunks as
	// DefaultPrefetchBytes hold, at least DefaultPrefetchConcurrency and at
	// most MaxDefaultPrefetchConcurrency (4 chunks of 4 MB, 31 of 512 KiB),
	// so that small chunks get as many bytes in flight as large ones.
	PrefetchConcurrency int
	// PrefetchRate bounds the bytes per second of chunks background opens
	// start. Default DefaultPrefetchRate; negative means unbounded.
	PrefetchRate int64
	// Parallelism bounds concurrent hashing, reading and uploading in Save
	// and FromFile. Default max(8, NumCPU).
	Parallelism int
	// Progress, when set, is called with the byte count of each chunk a
	// Save or FromFile has read and hashed (from several goroutines).
	Progress func(bytes int64)
	// TempDir is where the overlay file holding dirty chunks is created.
	// Default os.TempDir().
	TempDir string
	// Parent carries the values (such as the trace span) chunk fetches run
	// under; its cancellation does not affect the store, which lives until
	// Close. Default context.Background().
	Parent context.Context
	// NoOutboards: Save and FromFile do not compute and store chunk
	// outboards (they do for BLAKE3 otherwise; see
	// Source.ReadVerifiedRange).
	NoOutboards bool
	// BehindQuiet is how long the store waits, after a verified range read
	// of an unfetched chunk, for the reader to go quiet (no other range
	// read) before the whole chunk streams in behind: on a machine whose
	// client core is busy receiving, hashing and storing a 4 MB chunk for
	// milliseconds, the next fault's range read would otherwise wait behind
	// it. Default DefaultBehindQuiet; negative starts the whole chunk at
	// once.
	BehindQuiet time.Duration
	// BehindMaxDelay bounds that wait: a reader that never pauses still
	// gets one whole chunk per BehindMaxDelay (one such fetch runs at a
	// time). Default DefaultBehindMaxDelay.
	BehindMaxDelay time.Duration
	// CloseGrace bounds how long Close waits for the whole-chunk fetches
	// still running behind range reads before it cancels them: with the
	// remote down, each would otherwise ride out the outage for the
	// remote's whole retry bound, and a VMM's exit would wait for it.
	// Default DefaultCloseGrace.
	CloseGrace time.Duration
	// OnFetch, when set, is called after every successful open of a clean
	// chunk from the source (from several goroutines, with the chunk's lock
	// held: it must be quick, e.g. count into metrics).
	OnFetch func(FetchEvent)
}

// FetchEvent describes one open of a clean chunk from the source.
type FetchEvent struct {
	File       string
	Offset     int64
	Bytes      int64
	Foreground bool          // a ReadAt or WriteAt waited for it
	Wait       time.Duration // how long the open took
	// Tier is the tier that served it (cache.TierLocal or
	// cache.TierRemote, as Source.OpenTier says).
	Tier string
}

func (o Options) withDefaults() (Options, error) {
	if o.Namespace.Function == repb.DigestFunction_UNKNOWN {
		o.Namespace.Function = digest.Default
	}
	if _, err := digest.New(o.Namespace.Function); err != nil {
		return o, status.Errorf(codes.InvalidArgument, "cow options: %v", err)
	}
	if o.ChunkSize == 0 {
		o.ChunkSize = DefaultChunkSize
	}
	if err := checkChunkSize(o.ChunkSize); err != nil {
		return o, status.Errorf(codes.InvalidArgument, "cow options: %v", err)
	}
	if o.ReadAhead == 0 {
		o.ReadAhead = DefaultReadAhead
	}
	if o.PrefetchRate == 0 {
		o.PrefetchRate = DefaultPrefetchRate
	}
	if o.PrefetchConcurrency <= 0 {
		o.PrefetchConcurrency = int(min(max(DefaultPrefetchBytes/o.ChunkSize, DefaultPrefetchConcurrency), MaxDefaultPrefetchConcurrency))
	}
	if o.Parallelism <= 0 {
		o.Parallelism = max(8, runtime.NumCPU())
	}
	if o.TempDir == "" {
		o.TempDir = os.TempDir()
	}
	if o.BehindQuiet == 0 {
		o.BehindQuiet = DefaultBehindQuiet
	}
	if o.BehindMaxDelay <= 0 {
		o.BehindMaxDelay = DefaultBehindMaxDelay
	}
	if o.CloseGrace <= 0 {
		o.CloseGrace = DefaultCloseGrace
	}
	return o, nil
}

// Defaults of the wait before a whole chunk streams in behind a range read
// (see Options.BehindQuiet). First bytes of every chunk of 1 GiB in turn,
// through `serve` on two pinned CPUs (e2e BenchmarkColdHost): p50 5.3 ms /
// p99 13.4 ms with no wait; p50 1.6 ms with it, and p99 5.3 ms with one
// forced whole chunk per 100 ms, 3.2 ms with one per 250 ms.
const (
	DefaultBehindQuiet    = 10 * time.Millisecond
	DefaultBehindMaxDelay = 250 * time.Millisecond
)

// DefaultCloseGrace is how long Close lets whole-chunk fetches behind
// range reads finish (see Options.CloseGrace).
const DefaultCloseGrace = 2 * time.Second

func checkChunkSize(cs int64) error {
	switch {
	case cs <= 0:
		return fmt.Errorf("chunk size %d is not positive", cs)
	case cs%PageSize != 0:
		return fmt.Errorf("chunk size %d is not a multiple of %d", cs, PageSize)
	case cs > MaxChunkSize:
		return fmt.Errorf("chunk size %d exceeds %d", cs, MaxChunkSize)
	}
	return nil
}
