package localcache

import (
	"errors"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/snaploader/snaploader/errkind"
	"github.com/snaploader/snaploader/internal/fileio"
)

// directAlign is the alignment of memory, offsets and lengths that direct
// writes (O_DIRECT) take: a page, a multiple of every block size in use.
const directAlign = 4096

// minDirect is the smallest blob written past the page cache: below it a
// direct write saves little and costs a synchronous disk write.
const minDirect = 256 << 10

// writeDirect writes data, a whole blob, at offset 0 of the new temporary
// file f, sparse as writeSparse, past the page cache (O_DIRECT) where it
// can: the bytes go from data to the disk without being copied into page
// cache pages, which costs a fraction of the CPU of a buffered write (and
// of its later write-back). A blob is written to the cache for later
// restores, not read back at once, so it has no use for the page cache.
// The page-aligned part goes direct, the unaligned tail through the page
// cache; data whose memory is not page-aligned, a filesystem that refuses
// direct writes and small blobs are written as writeSparse does.
func writeDirect(f *os.File, data []byte) error {
	aligned := len(data) &^ (directAlign - 1)
	if len(data) < minDirect || uintptr(unsafe.Pointer(unsafe.SliceData(data)))%directAlign != 0 || setDirect(f, true) != nil {
		return writeSparse(f, data, 0)
	}
	err := fileio.WriteSparse(f, data[:aligned], 0)
	if derr := setDirect(f, false); derr != nil {
		return errkind.IO(errnoOf(derr), "turning off direct writes")
	}
	if errors.Is(err, unix.EINVAL) {
		// The filesystem took O_DIRECT but refuses these writes: write it
		// all again through the page cache.
		return writeSparse(f, data, 0)
	}
	if err != nil {
		return errkind.IO(errnoOf(err), "writing %d bytes directly at offset 0", aligned)
	}
	if aligned < len(data) {
		return writeSparse(f, data[aligned:], int64(aligned))
	}
	return nil
}

// setDirect turns O_DIRECT on or off for f.
func setDirect(f *os.File, on bool) error {
	fd := int(f.Fd())
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err != nil {
		return err
	}
	if on {
		fl |= unix.O_DIRECT
	} else {
		fl &^= unix.O_DIRECT
	}
	_, err = unix.FcntlInt(uintptr(fd), unix.F_SETFL, fl)
	return err
}
