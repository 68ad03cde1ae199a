// Package fusefs serves fixed-size files, such as a lazily loaded
// copy-on-write store, through a FUSE mount, so that a VMM can use them as
// a disk image or as the mem-path of a file-backed guest memory.
//
// Each entry of the mount is one regular file at the root of the mount
// point. Files are served without direct I/O, so mmap with MAP_SHARED
// works: pages the VMM dirties reach File.WriteAt when the kernel writes
// them back (msync, munmap, fsync or memory pressure). Open does not keep
// the kernel's page cache, so a file opened again sees the File's current
// contents; Invalidate drops cached pages after the File was changed
// outside the mount.
package fusefs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// File is what one entry of the mount serves. ReadAt and WriteAt may be
// called concurrently; they are never called outside [0, Size()), and
// Size must not change while mounted.
type File interface {
	io.ReaderAt
	io.WriterAt
	Size() int64
}

// Flusher is implemented by files that can make written data durable;
// fsync and msync(MS_SYNC) on the mounted file call Flush.
type Flusher interface {
	Flush() error
}

// Options configures Mount. The zero value is usable.
type Options struct {
	// ReadOnly mounts read-only: files are mode 0444 and opening one for
	// writing fails with EROFS.
	ReadOnly bool
	// AllowOther lets users other than the mounting one access the files.
	AllowOther bool
	// MaxWrite is the largest READ/WRITE request the kernel sends, capped
	// by the kernel at 1 MiB. Default 1 MiB.
	MaxWrite int
	// ReadAhead is the kernel's read-ahead window for the mount, in
	// bytes. Default MaxWrite; negative keeps the kernel's default
	// (128 KiB). It is set through /sys/class/bdi, which needs root;
	// without it the kernel's default stays.
	ReadAhead int
	// Name is shown as the file system source in /proc/mounts. Default
	// "snaploader".
	Name string
	// Logger receives I/O errors of the files. Nil discards them.
	Logger *slog.Logger
}

// Server is a mounted directory serving files. Create it with Mount.
type Server struct {
	dir    string
	server *fuse.Server
	nodes  map[string]*fileNode
	stop   func() bool

	mu      sync.Mutex
	mounted bool
}

// Mount mounts a FUSE file system on dir (an existing, empty directory)
// with one regular file per entry of files. The files are unmounted when
// ctx ends or Unmount is called. As root the mount is made with mount(2)
// directly; otherwise fusermount is used.
func Mount(ctx context.Context, dir string, files map[string]File, opts Options) (*Server, error) {
	if opts.MaxWrite <= 0 {
		opts.MaxWrite = 1 << 20
	}
	if opts.Name == "" {
		opts.Name = "snaploader"
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("mounting files on %s: %w", dir, err)
	}
	m := &Server{dir: dir, nodes: make(map[string]*fileNode, len(files))}
	now := time.Now()
	ino := uint64(2)
	for name, f := range files {
		if name == "" || name == "." || name == ".." || strings.ContainsAny(name, "/\x00") {
			return nil, fmt.Errorf("mounting files on %s: invalid file name %q", dir, name)
		}
		if f == nil {
			return nil, fmt.Errorf("mounting files on %s: file %q is nil", dir, name)
		}
		m.nodes[name] = &fileNode{name: name, file: f, size: f.Size(), readOnly: opts.ReadOnly, mtime: now, ino: ino, log: log}
		ino++
	}
	root := &rootNode{nodes: m.nodes}
	timeout := time.Hour // names and sizes never change
	mopts := fuse.MountOptions{
		AllowOther:    opts.AllowOther,
		MaxWrite:      opts.MaxWrite,
		MaxReadAhead:  opts.MaxWrite,
		FsName:        opts.Name,
		Name:          "snaploader",
		DisableXAttrs: true,
		// Replies carry bytes, never file descriptors: splicing only
		// adds pipe set-up to every READ.
		DisableSplice: true,
	}
	if os.Geteuid() == 0 {
		mopts.DirectMountStrict = true
	}
	if opts.ReadOnly {
		mopts.Options = append(mopts.Options, "ro")
	}
	server, err := fs.Mount(dir, root, &fs.Options{
		MountOptions: mopts,
		EntryTimeout: &timeout,
		AttrTimeout:  &timeout,
		UID:          uint32(os.Getuid()),
		GID:          uint32(os.Getgid()),
	})
	if err != nil {
		return nil, fmt.Errorf("mounting files on %s: %w", dir, err)
	}
	m.server, m.mounted = server, true
	if opts.ReadAhead == 0 {
		opts.ReadAhead = opts.MaxWrite
	}
	if opts.ReadAhead > 0 {
		if err := setReadAhead(dir, opts.ReadAhead); err != nil {
			log.Debug("fusefs: keeping the default read-ahead", "dir", dir, "err", err)
		}
	}
	m.stop = context.AfterFunc(ctx, func() {
		if err := m.unmount(); err != nil {
			log.Warn("fusefs: unmounting after the context ended", "dir", dir, "err", err)
		}
	})
	return m, nil
}

// Dir returns the mount point.
func (m *Server) Dir() string { return m.dir }

// Unmount detaches the mount point. If files are still open or mapped, the
// mount is detached lazily: the mount point is free at once and the open
// files keep working until closed, after which the server ends (see Wait).
// Unmount is idempotent.
func (m *Server) Unmount() error {
	m.stop()
	return m.unmount()
}

func (m *Server) unmount() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.mounted {
		return nil
	}
	if err := m.server.Unmount(); err != nil {
		if derr := unix.Unmount(m.dir, unix.MNT_DETACH); derr != nil && !errors.Is(derr, unix.EINVAL) {
			return fmt.Errorf("unmounting %s: %w (lazy unmount: %v)", m.dir, err, derr)
		}
	}
	m.mounted = false
	return nil
}

// Wait blocks until the file system server has stopped: after Unmount
// once no file of the mount is open any more.
func (m *Server) Wait() { m.server.Wait() }

// Invalidate drops the kernel's cached pages of the named file, after its
// File was written other than through the mount.
func (m *Server) Invalidate(name string) error {
	n, ok := m.nodes[name]
	if !ok {
		return fmt.Errorf("invalidating %s in %s: no such file", name, m.dir)
	}
	if errno := n.NotifyContent(0, 0); errno != 0 && errno != syscall.ENOENT {
		return fmt.Errorf("invalidating %s in %s: %w", name, m.dir, errno)
	}
	return nil
}

type rootNode struct {
	fs.Inode
	nodes map[string]*fileNode
}

var _ fs.NodeOnAdder = (*rootNode)(nil)

func (r *rootNode) OnAdd(ctx context.Context) {
	for name, n := range r.nodes {
		ch := r.NewPersistentInode(ctx, n, fs.StableAttr{Mode: syscall.S_IFREG, Ino: n.ino})
		r.AddChild(name, ch, false)
	}
}

type fileNode struct {
	fs.Inode
	name     string
	file     File
	size     int64
	readOnly bool
	mtime    time.Time
	ino      uint64
	log      *slog.Logger
}

var (
	_ fs.NodeGetattrer = (*fileNode)(nil)
	_ fs.NodeSetattrer = (*fileNode)(nil)
	_ fs.NodeOpener    = (*fileNode)(nil)
	_ fs.NodeReader    = (*fileNode)(nil)
	_ fs.NodeWriter    = (*fileNode)(nil)
	_ fs.NodeFsyncer   = (*fileNode)(nil)
	_ fs.NodeFlusher   = (*fileNode)(nil)
)

func (n *fileNode) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	mode := uint32(0o644)
	if n.readOnly {
		mode = 0o444
	}
	out.Mode = syscall.S_IFREG | mode
	out.Nlink = 1
	out.Ino = n.ino
	out.Size = uint64(n.size)
	out.Blocks = (uint64(n.size) + 511) / 512
	out.Blksize = 4096
	out.SetTimes(&n.mtime, &n.mtime, &n.mtime)
	return 0
}

// Setattr accepts and ignores mode, owner and time changes; the size is
// fixed: growing fails with EFBIG, shrinking with EPERM.
func (n *fileNode) Setattr(ctx context.Context, fh fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if sz, ok := in.GetSize(); ok && int64(sz) != n.size {
		if n.readOnly {
			return syscall.EROFS
		}
		if int64(sz) > n.size {
			return syscall.EFBIG
		}
		return syscall.EPERM
	}
	return n.Getattr(ctx, fh, out)
}

func (n *fileNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if n.readOnly && flags&syscall.O_ACCMODE != syscall.O_RDONLY {
		return nil, 0, syscall.EROFS
	}
	// No FOPEN_DIRECT_IO (mmap must work) and no FOPEN_KEEP_CACHE (every
	// open sees the File's current contents).
	return nil, 0, 0
}

func (n *fileNode) Read(ctx context.Context, fh fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	if off >= n.size || off < 0 {
		return fuse.ReadResultData(nil), 0
	}
	dest = dest[:min(int64(len(dest)), n.size-off)]
	got, err := n.file.ReadAt(dest, off)
	if err != nil && !(errors.Is(err, io.EOF) && got == len(dest)) {
		n.log.Warn("fusefs: read failed", "file", n.name, "offset", off, "length", len(dest), "err", err)
		return nil, syscall.EIO
	}
	return fuse.ReadResultData(dest), 0
}

// Write stores data at off. A write starting at or beyond the end fails
// with EFBIG; one crossing the end is shortened to end there.
func (n *fileNode) Write(ctx context.Context, fh fs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	if n.readOnly {
		return 0, syscall.EROFS
	}
	if off < 0 || off >= n.size {
		if len(data) == 0 {
			return 0, 0
		}
		return 0, syscall.EFBIG
	}
	data = data[:min(int64(len(data)), n.size-off)]
	written, err := n.file.WriteAt(data, off)
	if err != nil {
		n.log.Warn("fusefs: write failed", "file", n.name, "offset", off, "length", len(data), "err", err)
		if written > 0 {
			return uint32(written), 0
		}
		var en syscall.Errno
		if errors.As(err, &en) {
			return 0, en
		}
		return 0, syscall.EIO
	}
	return uint32(written), 0
}

func (n *fileNode) Fsync(ctx context.Context, fh fs.FileHandle, flags uint32) syscall.Errno {
	if f, ok := n.file.(Flusher); ok {
		if err := f.Flush(); err != nil {
			n.log.Warn("fusefs: flush failed", "file", n.name, "err", err)
			return syscall.EIO
		}
	}
	return 0
}

// Flush is called on close(2); data is already with the File.
func (n *fileNode) Flush(ctx context.Context, fh fs.FileHandle) syscall.Errno { return 0 }

// setReadAhead sets the read-ahead window of the mount's backing device.
func setReadAhead(dir string, bytes int) error {
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		return err
	}
	p := fmt.Sprintf("/sys/class/bdi/%d:%d/read_ahead_kb", unix.Major(st.Dev), unix.Minor(st.Dev))
	return os.WriteFile(p, []byte(strconv.Itoa((bytes+1023)/1024)), 0)
}
