package nbd

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"

	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// fileDevice is a Device backed by a real file. It fails the test if the
// server ever calls it outside the device.
type fileDevice struct {
	t    testing.TB
	f    *os.File
	size int64

	reads, writes atomic.Int64
}

func newFileDevice(t testing.TB, path string, size int64) *fileDevice {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return &fileDevice{t: t, f: f, size: size}
}

func (d *fileDevice) check(op string, off, n int64) error {
	if off < 0 || n < 0 || off+n > d.size {
		d.t.Errorf("%s of %d bytes at offset %d outside the %d-byte device", op, n, off, d.size)
		return fmt.Errorf("%s of %d bytes at offset %d outside the %d-byte device", op, n, off, d.size)
	}
	return nil
}

func (d *fileDevice) ReadAt(p []byte, off int64) (int, error) {
	d.reads.Add(1)
	if err := d.check("read", off, int64(len(p))); err != nil {
		return 0, err
	}
	return d.f.ReadAt(p, off)
}

func (d *fileDevice) WriteAt(p []byte, off int64) (int, error) {
	d.writes.Add(1)
	if err := d.check("write", off, int64(len(p))); err != nil {
		return 0, err
	}
	return d.f.WriteAt(p, off)
}

func (d *fileDevice) Size() int64 { return d.size }

// holeDevice also implements Zeroer by punching holes in the file, and
// Flusher by fsync.
type holeDevice struct {
	*fileDevice
	zeroes, flushes atomic.Int64
}

func (d *holeDevice) Zero(off, length int64) error {
	d.zeroes.Add(1)
	if err := d.check("zero", off, length); err != nil {
		return err
	}
	return unix.Fallocate(int(d.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
}

func (d *holeDevice) Flush() error {
	d.flushes.Add(1)
	return d.f.Sync()
}

// sourceFile writes a file of size bytes: random data with an unwritten
// hole in the second MiB.
func sourceFile(t testing.TB, dir string, size int64) (string, []byte) {
	t.Helper()
	data := make([]byte, size)
	rand.Read(data)
	if size >= 2<<20 {
		clear(data[1<<20 : 2<<20])
	}
	p := filepath.Join(dir, "disk.raw")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	for off := int64(0); off < size; off += 1 << 20 {
		end := min(off+1<<20, size)
		if bytes.Count(data[off:end], []byte{0}) == int(end-off) {
			continue
		}
		if _, err := f.WriteAt(data[off:end], off); err != nil {
			t.Fatal(err)
		}
	}
	return p, data
}

// serve starts srv on a Unix socket in a temporary directory and stops it
// when the test ends, checking that Serve returns.
func serve(t testing.TB, srv *Server) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	serveOn(t, srv, lis)
	return sock
}

func serveTCP(t testing.TB, srv *Server) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	serveOn(t, srv, lis)
	return lis.Addr().String()
}

func serveOn(t testing.TB, srv *Server, lis net.Listener) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, lis) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if !errors.Is(err, context.Canceled) {
				t.Errorf("Serve returned %v, want context.Canceled", err)
			}
		case <-time.After(30 * time.Second):
			t.Errorf("Serve did not return after its context ended")
		}
		if n := srv.Stats().ActiveConnections; n != 0 {
			t.Errorf("%d connections still active after Serve returned", n)
		}
	})
}

// client is a minimal NBD client speaking the raw protocol.
type client struct {
	t  testing.TB
	nc net.Conn
}

func dial(t testing.TB, network, addr string) *client {
	t.Helper()
	nc, err := net.Dial(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	nc.SetDeadline(time.Now().Add(30 * time.Second))
	c := &client{t: t, nc: nc}
	var hello [18]byte
	c.read(hello[:])
	if binary.BigEndian.Uint64(hello[0:]) != nbdMagic || binary.BigEndian.Uint64(hello[8:]) != optMagic {
		t.Fatalf("bad greeting %x", hello)
	}
	if f := binary.BigEndian.Uint16(hello[16:]); f != flagFixedNewstyle|flagNoZeroes {
		t.Fatalf("handshake flags %#x, want %#x", f, flagFixedNewstyle|flagNoZeroes)
	}
	c.write(be32(clientFlagFixedNewstyle | clientFlagNoZeroes))
	return c
}

func be16(v uint16) []byte { return binary.BigEndian.AppendUint16(nil, v) }
func be32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }
func be64(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }

func (c *client) read(p []byte) {
	c.t.Helper()
	if _, err := io.ReadFull(c.nc, p); err != nil {
		c.t.Fatalf("reading from server: %v", err)
	}
}

func (c *client) write(p []byte) {
	c.t.Helper()
	if _, err := c.nc.Write(p); err != nil {
		c.t.Fatalf("writing to server: %v", err)
	}
}

func (c *client) option(opt uint32, data []byte) {
	c.t.Helper()
	b := be64(optMagic)
	b = append(b, be32(opt)...)
	b = append(b, be32(uint32(len(data)))...)
	c.write(append(b, data...))
}

type optReply struct {
	opt, typ uint32
	data     []byte
}

func (c *client) optReply() optReply {
	c.t.Helper()
	var h [20]byte
	c.read(h[:])
	if m := binary.BigEndian.Uint64(h[:]); m != optReplyMagic {
		c.t.Fatalf("option reply magic %#x", m)
	}
	r := optReply{opt: binary.BigEndian.Uint32(h[8:]), typ: binary.BigEndian.Uint32(h[12:])}
	r.data = make([]byte, binary.BigEndian.Uint32(h[16:]))
	c.read(r.data)
	return r
}

func infoData(name string, infos ...uint16) []byte {
	b := be32(uint32(len(name)))
	b = append(b, name...)
	b = append(b, be16(uint16(len(infos)))...)
	for _, i := range infos {
		b = append(b, be16(i)...)
	}
	return b
}

// goExport negotiates name with NBD_OPT_GO and returns its size and flags.
func (c *client) goExport(name string) (size uint64, flags uint16) {
	c.t.Helper()
	c.option(optGo, infoData(name, infoBlockSize))
	for {
		r := c.optReply()
		switch r.typ {
		case repInfo:
			if binary.BigEndian.Uint16(r.data) == infoExport {
				size = binary.BigEndian.Uint64(r.data[2:])
				flags = binary.BigEndian.Uint16(r.data[10:])
			}
		case repAck:
			return size, flags
		default:
			c.t.Fatalf("NBD_OPT_GO %q: reply type %#x %q", name, r.typ, r.data)
		}
	}
}

func (c *client) request(typ, flags uint16, handle, off uint64, length uint32, data []byte) {
	c.t.Helper()
	b := be32(requestMagic)
	b = append(b, be16(flags)...)
	b = append(b, be16(typ)...)
	b = append(b, be64(handle)...)
	b = append(b, be64(off)...)
	b = append(b, be32(length)...)
	c.write(append(b, data...))
}

// reply reads a simple reply; for a successful READ it reads n bytes.
func (c *client) reply(readLen map[uint64]int) (handle uint64, errno uint32, data []byte) {
	c.t.Helper()
	var h [16]byte
	c.read(h[:])
	if m := binary.BigEndian.Uint32(h[:]); m != replyMagic {
		c.t.Fatalf("reply magic %#x", m)
	}
	errno = binary.BigEndian.Uint32(h[4:])
	handle = binary.BigEndian.Uint64(h[8:])
	if n := readLen[handle]; errno == 0 && n > 0 {
		data = make([]byte, n)
		c.read(data)
	}
	return handle, errno, data
}

// closed reports whether the server closed the connection (reads EOF or
// reset without sending anything more).
func (c *client) closed() bool {
	c.nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	var b [1]byte
	_, err := c.nc.Read(b[:])
	return err != nil && !errors.Is(err, os.ErrDeadlineExceeded)
}

// wait runs fn and fails the test if it takes longer than a generous bound
// (a hang, not a timing assertion).
func wait(t testing.TB, what string, fn func()) {
	t.Helper()
	done := make(chan struct{})
	go func() { defer close(done); fn() }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatalf("%s did not finish", what)
	}
}

// isHole reports whether [off, off+n) of the file at path is unallocated.
func isHole(path string, off, n int64) (bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return false, err
	}
	defer f.Close()
	data, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
	if err == unix.ENXIO {
		return true, nil
	}
	if err != nil {
		return false, err
	}
	return data >= off+n, nil
}
