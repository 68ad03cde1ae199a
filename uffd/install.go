package uffd

import (
	"errors"
	"fmt"
	"io"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/uffd/internal/uffdio"
)

var errGone = errors.New("VMM address space is gone")

func (ss *session) getBuf(n uint64) []byte {
	if b, ok := ss.bufs.Get().(*[]byte); ok && uint64(cap(*b)) >= n {
		return (*b)[:n]
	}
	return make([]byte, n)
}

func (ss *session) putBuf(b []byte) { ss.bufs.Put(&b) }

// serveRuns reads the data runs from Memory in one span and installs every
// run. installed[i] reports pages (relative to the first run's block start)
// this call installed, indexed from the block's first page blockP0.
func (ss *session) serveRuns(r *region, blockP0 uint64, runs []run, installed []bool) error {
	if len(runs) == 0 {
		return nil
	}
	// Read all data runs with one ReadAt over their span.
	var d0, d1 uint64
	first := true
	for _, rn := range runs {
		if rn.zero {
			continue
		}
		if first {
			d0, first = rn.p0, false
		}
		d1 = rn.p0 + rn.n
	}
	var data []byte
	if !first {
		off := r.pageOff(d0)
		data = ss.getBuf((d1 - d0) * r.page)
		defer ss.putBuf(data)
		n, err := ss.s.mem.ReadAt(data, int64(off))
		ss.s.c.fetches.Add(1)
		ss.s.c.bytesRead.Add(uint64(n))
		if n == len(data) && err == io.EOF {
			err = nil
		}
		if err == nil && n < len(data) {
			err = status.Errorf(codes.Internal, "short read: %d of %d bytes", n, len(data))
		}
		if err != nil {
			return fmt.Errorf("reading guest memory at offset %d (%d bytes, region %d, address %#x) for a page fault: %w",
				off, len(data), r.idx, r.pageAddr(d0), err)
		}
	}
	for _, rn := range runs {
		var err error
		if rn.zero {
			err = ss.installZero(r, rn, installed[rn.p0-blockP0:])
		} else {
			src := data[(rn.p0-d0)*r.page : (rn.p0-d0+rn.n)*r.page]
			err = ss.installCopy(r, rn, src, installed[rn.p0-blockP0:], false)
		}
		if err != nil {
			return err
		}
	}
	// Pages were installed without waking their waiters: wake them once
	// the whole block is in, so that a thread touching its way through
	// the block does not fault again on a page still being installed.
	lo, last := runs[0].p0, runs[len(runs)-1]
	if err := uffdio.Wake(ss.p.uffd, r.pageAddr(lo), (last.p0+last.n-lo)*r.page); err != nil {
		if err == unix.ESRCH {
			return errGone
		}
		return status.Errorf(codes.Internal, "UFFDIO_WAKE at address %#x (offset %d): %v", r.pageAddr(lo), r.pageOff(lo), err)
	}
	return nil
}

const maxRetries = 1000

// installCopy installs src at the run's pages with UFFDIO_COPY, skipping
// pages that already exist. zero says src is zeros (counted as zero pages).
func (ss *session) installCopy(r *region, rn run, src []byte, installed []bool, zero bool) error {
	dst := r.pageAddr(rn.p0)
	total := rn.n * r.page
	var done uint64
	retries := 0
	for done < total {
		n, err := uffdio.Copy(ss.p.uffd, dst+done, unsafe.Pointer(&src[done]), total-done, uffdio.CopyModeDontwake)
		runtime.KeepAlive(src)
		if n > 0 {
			for p := done / r.page; p < (done+uint64(n))/r.page; p++ {
				installed[p] = true
			}
			if zero {
				ss.s.c.zeroPages.Add(uint64(n) / r.page)
			} else {
				ss.s.c.pagesCopied.Add(uint64(n) / r.page)
				ss.s.c.bytesCopied.Add(uint64(n))
			}
			done += uint64(n)
		}
		switch err {
		case nil:
			if n <= 0 {
				return status.Errorf(codes.Internal, "UFFDIO_COPY at address %#x (offset %d) made no progress", dst+done, r.off+(dst+done-r.base))
			}
		case unix.EEXIST:
			// Present already: skip it, but count it as in place, so
			// that the block's wake covers its waiters and a later fault
			// on it is only woken, never fetched again (a fetch that
			// finds it present again would wake no one).
			installed[done/r.page] = true
			done += r.page
		case unix.EAGAIN, unix.ENOENT, unix.EINTR:
			if retries++; retries > maxRetries {
				return status.Errorf(codes.Internal, "UFFDIO_COPY at address %#x (offset %d): %v after %d retries", dst+done, r.off+(dst+done-r.base), err, maxRetries)
			}
			runtime.Gosched()
		case unix.ESRCH:
			return errGone
		default:
			return status.Errorf(codes.Internal, "UFFDIO_COPY at address %#x (offset %d, %d bytes, %d-byte pages): %v", dst+done, r.off+(dst+done-r.base), total-done, r.page, err)
		}
	}
	return nil
}

// zeroSource returns n bytes of zeros that are never written, shared by
// every zero copy of the session.
func (ss *session) zeroSource(n uint64) []byte {
	ss.zeroMu.Lock()
	defer ss.zeroMu.Unlock()
	if uint64(len(ss.zeros)) < n {
		ss.zeros = make([]byte, n)
	}
	return ss.zeros[:n]
}

// installZero installs zero pages over the run with UFFDIO_ZEROPAGE where
// the kernel allows it. Regions where it does not (hugetlb: the kernel
// answers EINVAL, having no huge zero page) get a UFFDIO_COPY from a zero
// buffer, one page at a time so the buffer stays one page long.
func (ss *session) installZero(r *region, rn run, installed []bool) error {
	if !r.zeroCopy.Load() {
		err := ss.installZeropage(r, rn, installed)
		if !errors.Is(err, errNoZeropage) {
			return err
		}
		r.zeroCopy.Store(true)
	}
	zero := ss.zeroSource(r.page)
	for i := uint64(0); i < rn.n; i++ {
		p := rn.p0 + i
		if installed[p-rn.p0] {
			continue
		}
		if err := ss.installCopy(r, run{p0: p, n: 1, zero: true}, zero, installed[p-rn.p0:], true); err != nil {
			return err
		}
	}
	return nil
}

// errNoZeropage: the region does not support UFFDIO_ZEROPAGE.
var errNoZeropage = errors.New("UFFDIO_ZEROPAGE unsupported on this region")

func (ss *session) installZeropage(r *region, rn run, installed []bool) error {
	dst := r.pageAddr(rn.p0)
	total := rn.n * r.page
	var done uint64
	retries := 0
	for done < total {
		n, err := uffdio.Zeropage(ss.p.uffd, dst+done, total-done, uffdio.ZeropageModeDontwake)
		if n > 0 {
			for p := done / r.page; p < (done+uint64(n))/r.page; p++ {
				installed[p] = true
			}
			ss.s.c.zeroPages.Add(uint64(n) / r.page)
			done += uint64(n)
		}
		switch err {
		case nil:
			if n <= 0 {
				return status.Errorf(codes.Internal, "UFFDIO_ZEROPAGE at address %#x (offset %d) made no progress", dst+done, r.off+(dst+done-r.base))
			}
		case unix.EEXIST:
			installed[done/r.page] = true // present already (see installCopy)
			done += r.page
		case unix.EAGAIN, unix.ENOENT, unix.EINTR:
			if retries++; retries > maxRetries {
				return status.Errorf(codes.Internal, "UFFDIO_ZEROPAGE at address %#x (offset %d): %v after %d retries", dst+done, r.off+(dst+done-r.base), err, maxRetries)
			}
			runtime.Gosched()
		case unix.ESRCH:
			return errGone
		case unix.EINVAL:
			if r.page != ss.sysPage {
				return errNoZeropage
			}
			fallthrough
		default:
			return status.Errorf(codes.Internal, "UFFDIO_ZEROPAGE at address %#x (offset %d, %d bytes): %v", dst+done, r.off+(dst+done-r.base), total-done, err)
		}
	}
	return nil
}
