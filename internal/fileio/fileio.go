// Package fileio opens files whose paths come from outside the program
// (command-line arguments, a cache directory someone else can write to)
// without ever blocking on a FIFO or a device, reads them in a way that
// stops when a context ends, and manages the locked temporary files a
// process writes in a shared directory so that those a killed process
// left behind can be told apart from live ones and removed.
package fileio

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// OpenRegular opens path read-only and returns it only if it is a regular
// file. The open itself never blocks: it is made with O_NONBLOCK, so a FIFO
// without a writer or a device that waits for a carrier cannot hang the
// caller, and O_NONBLOCK is cleared again once the file is known to be
// regular. Anything else (FIFO, device, directory, socket) is an
// InvalidArgument error naming the path and what it is; a path that cannot
// be opened is InvalidArgument too, wrapping the cause.
func OpenRegular(path string) (*os.File, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC|unix.O_NOCTTY, 0)
	if err != nil {
		if errors.Is(err, unix.ENXIO) {
			// open(2) gives ENXIO for a Unix socket (and a FIFO opened
			// for writing): say what it is rather than "no such device".
			var st unix.Stat_t
			if unix.Stat(path, &st) == nil && st.Mode&unix.S_IFMT != unix.S_IFREG {
				return nil, notRegular(path, st.Mode)
			}
		}
		return nil, status.Errorf(codes.InvalidArgument, "opening %s: %v", path, &os.PathError{Op: "open", Path: path, Err: err})
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return nil, status.Errorf(codes.InvalidArgument, "opening %s: fstat: %v", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		unix.Close(fd)
		return nil, notRegular(path, st.Mode)
	}
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err == nil {
		_, err = unix.FcntlInt(uintptr(fd), unix.F_SETFL, fl&^unix.O_NONBLOCK)
	}
	if err != nil {
		unix.Close(fd)
		return nil, status.Errorf(codes.Internal, "opening %s: clearing O_NONBLOCK: %v", path, err)
	}
	return os.NewFile(uintptr(fd), path), nil
}

func notRegular(path string, mode uint32) error {
	return status.Errorf(codes.InvalidArgument, "opening %s: it is %s, not a regular file", path, Kind(mode))
}

// Kind describes the file type in a stat mode ("a FIFO", "a character
// device", ...), for error messages.
func Kind(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFREG:
		return "a regular file"
	case unix.S_IFIFO:
		return "a FIFO (named pipe)"
	case unix.S_IFCHR:
		return "a character device"
	case unix.S_IFBLK:
		return "a block device"
	case unix.S_IFDIR:
		return "a directory"
	case unix.S_IFSOCK:
		return "a socket"
	case unix.S_IFLNK:
		return "a symbolic link"
	}
	return fmt.Sprintf("a file of unknown type %#o", mode&unix.S_IFMT)
}

// Reader returns a reader that yields what r yields until ctx ends, then
// ctx's error: ctx is checked before every Read, so a copy or a hash over
// it stops within one read of the cancellation. A nil-error read is never
// cut short.
func Reader(ctx context.Context, r io.Reader) io.Reader {
	return &ctxReader{ctx: ctx, r: r}
}

type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c *ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}

// ReaderAt is Reader for an io.ReaderAt.
func ReaderAt(ctx context.Context, r io.ReaderAt) io.ReaderAt {
	return &ctxReaderAt{ctx: ctx, r: r}
}

type ctxReaderAt struct {
	ctx context.Context
	r   io.ReaderAt
}

func (c *ctxReaderAt) ReadAt(p []byte, off int64) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.ReadAt(p, off)
}
