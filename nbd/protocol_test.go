package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"net"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// setup serves one writable 8 MiB file-backed export "disk" on a Unix
// socket and returns the socket, the device, and the file's initial bytes.
func setup(t *testing.T, opts Options) (string, *holeDevice, []byte, *Server) {
	t.Helper()
	src, data := sourceFile(t, t.TempDir(), testSize)
	dev := &holeDevice{fileDevice: newFileDevice(t, src, testSize)}
	srv := NewServer(opts)
	if err := srv.AddExport("disk", dev, false); err != nil {
		t.Fatal(err)
	}
	return serve(t, srv), dev, data, srv
}

func deviceBytes(t *testing.T, d *holeDevice) []byte {
	t.Helper()
	b, err := os.ReadFile(d.f.Name())
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// checkStillServing reads the first 64 KiB over a fresh connection.
func checkStillServing(t *testing.T, sock string, want []byte) {
	t.Helper()
	c := dial(t, "unix", sock)
	c.goExport("disk")
	c.request(cmdRead, 0, 7, 0, 65536, nil)
	h, errno, data := c.reply(map[uint64]int{7: 65536})
	if h != 7 || errno != 0 || !bytes.Equal(data, want[:65536]) {
		t.Fatalf("fresh connection: handle %d errno %d, data equal %v", h, errno, bytes.Equal(data, want[:65536]))
	}
}

func TestHandshakeOptions(t *testing.T) {
	sock, _, _, srv := setup(t, Options{})
	if err := srv.AddExport("second", &fileDevice{t: t, size: 0}, true); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name  string
		opt   uint32
		data  []byte
		check func(t *testing.T, replies []optReply)
	}{
		{"structured-reply-unsupported", optStructuredReply, nil, wantReply(repErrUnsup)},
		{"starttls-unsupported", 5, nil, wantReply(repErrUnsup)},
		{"unknown-option-unsupported", 4242, []byte("payload"), wantReply(repErrUnsup)},
		{"info-unknown-export", optInfo, infoData("nope"), wantReply(repErrUnknown)},
		{"go-unknown-export", optGo, infoData("nope"), wantReply(repErrUnknown)},
		{"info-malformed", optInfo, []byte{0, 0, 0, 99, 'x'}, wantReply(repErrInvalid)},
		{"info-count-mismatch", optInfo, append(infoData("disk"), 0, 1), wantReply(repErrInvalid)},
		{"list-with-data-invalid", optList, []byte{1}, wantReply(repErrInvalid)},
		{"list", optList, nil, func(t *testing.T, rs []optReply) {
			var names []string
			for _, r := range rs[:len(rs)-1] {
				if r.typ != repServer {
					t.Fatalf("reply type %#x, want NBD_REP_SERVER", r.typ)
				}
				n := binary.BigEndian.Uint32(r.data)
				names = append(names, string(r.data[4:4+n]))
			}
			sort.Strings(names)
			if len(names) != 2 || names[0] != "disk" || names[1] != "second" {
				t.Fatalf("listed %q, want [disk second]", names)
			}
		}},
		{"info", optInfo, infoData("disk", infoName, infoBlockSize), func(t *testing.T, rs []optReply) {
			seen := map[uint16][]byte{}
			for _, r := range rs[:len(rs)-1] {
				if r.typ != repInfo {
					t.Fatalf("reply type %#x, want NBD_REP_INFO", r.typ)
				}
				seen[binary.BigEndian.Uint16(r.data)] = r.data[2:]
			}
			if e := seen[infoExport]; len(e) != 10 || binary.BigEndian.Uint64(e) != testSize ||
				binary.BigEndian.Uint16(e[8:]) != tflagHasFlags|tflagSendFlush|tflagSendTrim|tflagSendWriteZeroes {
				t.Errorf("NBD_INFO_EXPORT %x", e)
			}
			if string(seen[infoName]) != "disk" {
				t.Errorf("NBD_INFO_NAME %q", seen[infoName])
			}
			if b := seen[infoBlockSize]; len(b) != 12 || binary.BigEndian.Uint32(b[8:]) != MaxPayload {
				t.Errorf("NBD_INFO_BLOCK_SIZE %x", b)
			}
		}},
		{"info-read-only-flag", optInfo, infoData("second"), func(t *testing.T, rs []optReply) {
			if f := binary.BigEndian.Uint16(rs[0].data[10:]); f&tflagReadOnly == 0 {
				t.Errorf("read-only export flags %#x lack NBD_FLAG_READ_ONLY", f)
			}
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := dial(t, "unix", sock)
			c.option(tc.opt, tc.data)
			var rs []optReply
			for {
				r := c.optReply()
				if r.opt != tc.opt {
					t.Fatalf("reply for option %d, want %d", r.opt, tc.opt)
				}
				rs = append(rs, r)
				if r.typ == repAck || r.typ&repFlagError != 0 {
					break
				}
			}
			tc.check(t, rs)
			// The negotiation continues after every one of these options.
			if size, _ := c.goExport("disk"); size != testSize {
				t.Fatalf("size %d after option, want %d", size, testSize)
			}
		})
	}
}

func wantReply(typ uint32) func(t *testing.T, rs []optReply) {
	return func(t *testing.T, rs []optReply) {
		t.Helper()
		if len(rs) != 1 || rs[0].typ != typ {
			t.Fatalf("replies %+v, want one of type %#x", rs, typ)
		}
	}
}

func TestExportNameAndAbort(t *testing.T) {
	sock, _, data, _ := setup(t, Options{})

	t.Run("export-name", func(t *testing.T) {
		c := dial(t, "unix", sock)
		c.option(optExportName, []byte("disk"))
		var b [10]byte // NO_ZEROES negotiated: no padding
		c.read(b[:])
		if binary.BigEndian.Uint64(b[:]) != testSize {
			t.Fatalf("size %d", binary.BigEndian.Uint64(b[:]))
		}
		c.request(cmdRead, 0, 1, 4096, 4096, nil)
		if _, errno, got := c.reply(map[uint64]int{1: 4096}); errno != 0 || !bytes.Equal(got, data[4096:8192]) {
			t.Fatalf("read after EXPORT_NAME: errno %d", errno)
		}
	})
	t.Run("export-name-with-zero-padding", func(t *testing.T) {
		nc, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		c := &client{t: t, nc: nc}
		var hello [18]byte
		c.read(hello[:])
		c.write(be32(clientFlagFixedNewstyle))
		c.option(optExportName, []byte("disk"))
		b := make([]byte, 10+124)
		c.read(b)
		if !bytes.Equal(b[10:], make([]byte, 124)) {
			t.Fatal("padding is not zeros")
		}
	})
	t.Run("export-name-unknown-closes", func(t *testing.T) {
		c := dial(t, "unix", sock)
		c.option(optExportName, []byte("nope"))
		if !c.closed() {
			t.Fatal("connection stayed open after EXPORT_NAME of an unknown export")
		}
	})
	t.Run("abort", func(t *testing.T) {
		c := dial(t, "unix", sock)
		c.option(optAbort, nil)
		if r := c.optReply(); r.typ != repAck {
			t.Fatalf("abort reply %#x", r.typ)
		}
		if !c.closed() {
			t.Fatal("connection stayed open after NBD_OPT_ABORT")
		}
	})
	t.Run("empty-name-is-the-only-export", func(t *testing.T) {
		c := dial(t, "unix", sock)
		if size, _ := c.goExport(""); size != testSize {
			t.Fatalf("size %d", size)
		}
	})
}

// TestMalformedClients sends broken requests over raw sockets. Each one
// gets an error reply or a closed connection; the server keeps serving
// other clients, and the device never changes outside legal writes.
func TestMalformedClients(t *testing.T) {
	const (
		replyErr = iota
		closes
	)
	tests := []struct {
		name      string
		handshake bool // negotiate "disk" with GO first
		send      func(c *client)
		want      int
		errno     uint32
	}{
		{"bad-client-flags", false, func(c *client) {}, closes, 0},
		{"bad-option-magic", false, func(c *client) {
			c.write(append(be64(0xdeadbeef), make([]byte, 8)...))
		}, closes, 0},
		{"oversized-option", false, func(c *client) {
			c.write(append(append(be64(optMagic), be32(optGo)...), be32(1<<30)...))
		}, closes, 0},
		{"truncated-option", false, func(c *client) {
			c.write(append(append(be64(optMagic), be32(optGo)...), be32(100)...))
			c.write([]byte("abc"))
			c.nc.(*net.UnixConn).CloseWrite()
		}, closes, 0},
		{"bad-request-magic", true, func(c *client) {
			b := make([]byte, 28)
			binary.BigEndian.PutUint32(b, 0x12345678)
			c.write(b)
		}, closes, 0},
		{"truncated-header", true, func(c *client) {
			c.write(be32(requestMagic)[:3])
			c.nc.(*net.UnixConn).CloseWrite()
		}, closes, 0},
		{"oversized-read", true, func(c *client) {
			c.request(cmdRead, 0, 1, 0, MaxPayload+1, nil)
		}, replyErr, errInval},
		{"oversized-write-closes", true, func(c *client) {
			c.request(cmdWrite, 0, 1, 0, MaxPayload+1, nil)
			c.nc.Write(bytes.Repeat([]byte{0xee}, 1<<20)) // may fail: the server hangs up
		}, closes, 0},
		{"read-past-end", true, func(c *client) {
			c.request(cmdRead, 0, 1, testSize-4096, 8192, nil)
		}, replyErr, errInval},
		{"read-offset-overflow", true, func(c *client) {
			c.request(cmdRead, 0, 1, 1<<64-4096, 8192, nil)
		}, replyErr, errInval},
		{"write-past-end", true, func(c *client) {
			c.request(cmdWrite, 0, 1, testSize-4096, 8192, bytes.Repeat([]byte{0xee}, 8192))
		}, replyErr, errInval},
		{"trim-past-end", true, func(c *client) {
			c.request(cmdTrim, 0, 1, testSize, 1, nil)
		}, replyErr, errInval},
		{"write-zeroes-overflow", true, func(c *client) {
			c.request(cmdWriteZeroes, 0, 1, 1<<63, 1<<31, nil)
		}, replyErr, errInval},
		{"unknown-command", true, func(c *client) {
			c.request(42, 0, 1, 0, 4096, nil)
		}, replyErr, errInval},
		{"disconnect-mid-write", true, func(c *client) {
			c.request(cmdWrite, 0, 1, 0, 65536, bytes.Repeat([]byte{0xee}, 30000))
			c.nc.(*net.UnixConn).CloseWrite()
		}, closes, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			sock, dev, data, srv := setup(t, Options{})
			var c *client
			if tc.name == "bad-client-flags" {
				nc, err := net.Dial("unix", sock)
				if err != nil {
					t.Fatal(err)
				}
				defer nc.Close()
				c = &client{t: t, nc: nc}
				var hello [18]byte
				c.read(hello[:])
				c.write(be32(1 << 7))
			} else {
				c = dial(t, "unix", sock)
			}
			if tc.handshake {
				c.goExport("disk")
			}
			tc.send(c)
			switch tc.want {
			case replyErr:
				h, errno, _ := c.reply(nil)
				if h != 1 || errno != tc.errno {
					t.Fatalf("reply handle %d errno %d, want handle 1 errno %d", h, errno, tc.errno)
				}
				// The connection still works.
				c.request(cmdRead, 0, 2, 0, 4096, nil)
				if h, errno, got := c.reply(map[uint64]int{2: 4096}); h != 2 || errno != 0 || !bytes.Equal(got, data[:4096]) {
					t.Fatalf("read after error: handle %d errno %d", h, errno)
				}
				if srv.Stats().Errors != 1 {
					t.Errorf("Stats.Errors = %d, want 1", srv.Stats().Errors)
				}
			case closes:
				if !c.closed() {
					t.Fatal("connection stayed open")
				}
			}
			checkStillServing(t, sock, data)
			if dev.writes.Load() != 0 || dev.zeroes.Load() != 0 {
				t.Errorf("device saw %d writes and %d zeroes", dev.writes.Load(), dev.zeroes.Load())
			}
			if !bytes.Equal(deviceBytes(t, dev), data) {
				t.Fatal("device changed")
			}
		})
	}
}

// TestRequestsAndReplies drives each command over a raw connection and
// checks the device and the counters.
func TestRequestsAndReplies(t *testing.T) {
	sock, dev, data, srv := setup(t, Options{})
	c := dial(t, "unix", sock)
	c.goExport("disk")
	want := bytes.Clone(data)

	payload := bytes.Repeat([]byte{0x5a}, 12345)
	c.request(cmdWrite, cmdFlagFUA, 10, 1000, uint32(len(payload)), payload)
	copy(want[1000:], payload)
	c.request(cmdWriteZeroes, 0, 11, 4<<20, 1<<20, nil)
	clear(want[4<<20 : 5<<20])
	c.request(cmdTrim, 0, 12, 6<<20, 2<<20, nil) // the last 2 MiB
	clear(want[6<<20:])
	c.request(cmdFlush, 0, 13, 0, 0, nil)
	c.request(cmdRead, 0, 14, 0, 0, nil) // zero-length read succeeds with no data
	got := map[uint64]uint32{}
	for range 5 {
		h, errno, _ := c.reply(nil)
		got[h] = errno
	}
	for h := uint64(10); h <= 14; h++ {
		if e, ok := got[h]; !ok || e != 0 {
			t.Errorf("handle %d: errno %d, replied %v", h, e, ok)
		}
	}
	c.request(cmdRead, 0, 15, 0, testSize, nil)
	if h, errno, all := c.reply(map[uint64]int{15: testSize}); h != 15 || errno != 0 || !bytes.Equal(all, want) {
		t.Fatalf("read of the whole device: handle %d errno %d", h, errno)
	}
	if !bytes.Equal(deviceBytes(t, dev), want) {
		t.Fatal("device contents differ")
	}
	if dev.flushes.Load() < 2 { // FUA write + FLUSH
		t.Errorf("%d flushes, want >= 2", dev.flushes.Load())
	}
	c.request(cmdDisc, 0, 16, 0, 0, nil)
	if !c.closed() {
		t.Fatal("connection open after NBD_CMD_DISC")
	}
	st := srv.Stats()
	if st.Writes != 1 || st.BytesWritten != int64(len(payload)) || st.Trims != 1 || st.WriteZeroes != 1 ||
		st.Flushes != 1 || st.Reads != 2 || st.BytesRead != testSize || st.Errors != 0 {
		t.Errorf("stats %+v", st)
	}
}

// gateDevice blocks reads until n of them are in progress at once.
type gateDevice struct {
	*fileDevice
	n       int32
	active  atomic.Int32
	release chan struct{}
	once    sync.Once
}

func (d *gateDevice) ReadAt(p []byte, off int64) (int, error) {
	if d.active.Add(1) >= d.n {
		d.once.Do(func() { close(d.release) })
	}
	select {
	case <-d.release:
	case <-time.After(20 * time.Second):
		return 0, errors.New("reads were not concurrent")
	}
	return d.fileDevice.ReadAt(p, off)
}

func TestRequestsRunConcurrently(t *testing.T) {
	src, data := sourceFile(t, t.TempDir(), testSize)
	dev := &gateDevice{fileDevice: newFileDevice(t, src, testSize), n: 4, release: make(chan struct{})}
	srv := NewServer(Options{MaxInFlight: 4})
	if err := srv.AddExport("disk", dev, true); err != nil {
		t.Fatal(err)
	}
	c := dial(t, "unix", serve(t, srv))
	c.goExport("disk")
	lens := map[uint64]int{}
	for i := range uint64(4) {
		c.request(cmdRead, 0, i, i<<20, 1<<20, nil)
		lens[i] = 1 << 20
	}
	for range 4 {
		h, errno, got := c.reply(lens)
		if errno != 0 || !bytes.Equal(got, data[h<<20:(h+1)<<20]) {
			t.Fatalf("handle %d: errno %d (reads served one at a time?)", h, errno)
		}
	}
}

func TestRemoveExportClosesConnections(t *testing.T) {
	sock, dev, data, srv := setup(t, Options{})
	c := dial(t, "unix", sock)
	c.goExport("disk")
	c.request(cmdRead, 0, 1, 0, 4096, nil)
	if _, errno, got := c.reply(map[uint64]int{1: 4096}); errno != 0 || !bytes.Equal(got, data[:4096]) {
		t.Fatal("read before removal failed")
	}
	wait(t, "RemoveExport", func() { srv.RemoveExport("disk") })
	before := dev.reads.Load()
	if !c.closed() {
		t.Fatal("connection open after RemoveExport")
	}
	c2 := dial(t, "unix", sock)
	c2.option(optGo, infoData("disk"))
	if r := c2.optReply(); r.typ != repErrUnknown {
		t.Fatalf("GO of a removed export: reply %#x", r.typ)
	}
	if dev.reads.Load() != before {
		t.Fatal("device read after RemoveExport returned")
	}
	if err := srv.AddExport("disk", dev, false); err != nil {
		t.Fatalf("re-adding a removed export: %v", err)
	}
	if err := srv.AddExport("disk", dev, false); err == nil {
		t.Fatal("adding a duplicate export succeeded")
	}
}

func TestServeEndsWithContext(t *testing.T) {
	src, _ := sourceFile(t, t.TempDir(), testSize)
	srv := NewServer(Options{})
	srv.AddExport("disk", newFileDevice(t, src, testSize), false)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, lis) }()
	c := dial(t, "tcp", lis.Addr().String())
	c.goExport("disk")
	idle := dial(t, "tcp", lis.Addr().String()) // stuck in the handshake
	_ = idle
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("Serve: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Serve did not return")
	}
	if !c.closed() {
		t.Fatal("connection open after Serve returned")
	}
	if st := srv.Stats(); st.ActiveConnections != 0 || st.Connections != 2 {
		t.Fatalf("stats %+v", st)
	}
	if _, err := net.Dial("tcp", lis.Addr().String()); err == nil {
		t.Fatal("listener still accepting")
	}
}

func TestHandshakeTimeout(t *testing.T) {
	sock, _, data, _ := setup(t, Options{HandshakeTimeout: 200 * time.Millisecond})
	c := dial(t, "unix", sock) // says nothing after the client flags
	if !c.closed() {
		t.Fatal("silent client not disconnected")
	}
	checkStillServing(t, sock, data)
}

type panicDevice struct{ *fileDevice }

func (d panicDevice) ReadAt(p []byte, off int64) (int, error) {
	if off == 0 {
		panic("device bug")
	}
	return d.fileDevice.ReadAt(p, off)
}

func TestDevicePanicIsEIO(t *testing.T) {
	src, data := sourceFile(t, t.TempDir(), testSize)
	srv := NewServer(Options{})
	srv.AddExport("disk", panicDevice{newFileDevice(t, src, testSize)}, true)
	c := dial(t, "unix", serve(t, srv))
	c.goExport("disk")
	c.request(cmdRead, 0, 1, 0, 4096, nil)
	if _, errno, _ := c.reply(nil); errno != errIO {
		t.Fatalf("errno %d, want EIO", errno)
	}
	c.request(cmdRead, 0, 2, 4096, 4096, nil)
	if _, errno, got := c.reply(map[uint64]int{2: 4096}); errno != 0 || !bytes.Equal(got, data[4096:8192]) {
		t.Fatalf("read after a panic: errno %d", errno)
	}
}
