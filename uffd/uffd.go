// Package uffd serves a microVM's guest memory lazily through userfaultfd,
// speaking Firecracker's page-fault-handler handshake.
//
// On restore the VMM maps anonymous memory for each guest region, registers
// it with a userfaultfd (missing mode), connects to a Unix socket and sends
// one message: a JSON array of GuestRegionUffdMapping objects
// {"base_host_virt_addr", "size", "offset", "page_size"} (older VMMs send
// "page_size_kib") with the userfaultfd attached as SCM_RIGHTS. A Server
// accepts that connection, validates the regions against its Memory, and
// resolves every page fault by installing the containing block of the
// memory snapshot (UFFDIO_COPY, or UFFDIO_ZEROPAGE for holes and for ranges
// the VMM released with MADV_DONTNEED / the balloon).
//
// Regions backed by huge pages (page_size 2 MiB: hugetlbfs or MAP_HUGETLB
// guest memory) are served in whole huge pages aligned to the huge page;
// their holes are installed with a UFFDIO_COPY of a zero page, since the
// kernel has no UFFDIO_ZEROPAGE for hugetlb. The chunk size must then be a
// multiple of the huge page size (see Options.ChunkSize).
//
// Blocks are fetched by a bounded worker pool, so a slow block does not
// hold up faults elsewhere, and concurrent faults on one block share one
// fetch. A block that cannot be read (for example a chunk failing digest
// verification) is never replaced by zeros or stale data: the VMM process
// is killed and Serve returns an error naming the offset.
package uffd

import (
	"io"
	"log/slog"
	"sync/atomic"
	"time"
)

// Memory is the guest memory snapshot being served, addressed by offset in
// the memory snapshot file (the regions' "offset" field). A copy-on-write
// chunk store satisfies it.
type Memory interface {
	io.ReaderAt
	Size() int64
}

// HoleChecker is optionally implemented by a Memory that knows which parts
// of it are holes (all zeros). IsHole(off) reports whether the byte at
// offset off lies in a hole; such pages are installed as zero pages without
// reading.
type HoleChecker interface {
	IsHole(off int64) bool
}

// Options configures a Server.
type Options struct {
	// ChunkSize is the granularity of a fetch and UFFDIO_COPY in bytes;
	// blocks are aligned to multiples of it in the memory file and clipped
	// to the region. Typically the store's chunk size (4,096,000). 0 means
	// one page. For regions of base pages it is rounded up to a multiple of
	// the page size; a huge-page region (page_size 2 MiB, hugetlbfs) whose
	// page size does not divide it is rejected at the handshake.
	ChunkSize int64
	// Parallelism bounds concurrent block fetches; 0 means 16.
	Parallelism int
	// HandshakeTimeout bounds reading the VMM's handshake; 0 means 10s.
	HandshakeTimeout time.Duration
	// Logger, if set, receives a record when the VMM is killed and when
	// a handshake is rejected.
	Logger *slog.Logger
}

// Mapping is Firecracker's GuestRegionUffdMapping: one guest memory region
// as mapped in the VMM process.
type Mapping struct {
	// BaseHostVirtAddr is the region's start address in the VMM.
	BaseHostVirtAddr uint64 `json:"base_host_virt_addr"`
	// Size of the region in bytes.
	Size uint64 `json:"size"`
	// Offset of the region in the memory snapshot file.
	Offset uint64 `json:"offset"`
	// PageSize is the region's page size in bytes.
	PageSize uint64 `json:"page_size,omitempty"`
	// PageSizeKiB is the field older VMMs send instead of PageSize.
	PageSizeKiB uint64 `json:"page_size_kib,omitempty"`
}

// Server serves one VMM's guest memory from a Memory.
type Server struct {
	mem     Memory
	holes   HoleChecker
	opts    Options
	c       counters
	started atomic.Bool
}

// NewServer returns a Server for mem. If mem implements HoleChecker, holes
// are served as zero pages without reading them.
func NewServer(mem Memory, opts Options) *Server {
	if opts.Parallelism <= 0 {
		opts.Parallelism = 16
	}
	if opts.HandshakeTimeout <= 0 {
		opts.HandshakeTimeout = 10 * time.Second
	}
	if opts.ChunkSize < 0 {
		opts.ChunkSize = 0
	}
	s := &Server{mem: mem, opts: opts}
	s.holes, _ = mem.(HoleChecker)
	return s
}

// Stats returns the counters so far; safe to call at any time.
func (s *Server) Stats() Stats { return s.c.snapshot() }

func (s *Server) logf(msg string, args ...any) {
	if s.opts.Logger != nil {
		s.opts.Logger.Warn(msg, args...)
	}
}
