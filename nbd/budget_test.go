package nbd

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"
)

// bigDevice is a writable sparse file-backed export of size bytes.
func bigDevice(t *testing.T, size int64) *fileDevice {
	t.Helper()
	p := filepath.Join(t.TempDir(), "big.raw")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.Close()
	return newFileDevice(t, p, size)
}

func heapInuse() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse
}

// waitClosed waits up to d for the server to close c's connection.
func waitClosed(c *client, d time.Duration) bool {
	c.nc.SetReadDeadline(time.Now().Add(d))
	_, err := io.Copy(io.Discard, c.nc)
	return err == nil || !errors.Is(err, os.ErrDeadlineExceeded)
}

// Forty clients each announce a large WRITE, send part of its payload or
// none, and stall. The server's heap stays within its write budget (it
// used to buffer every announced payload whole: about 1 GB here), another
// client's reads and writes are served meanwhile, and the stalled
// connections are closed after StallTimeout, freeing what they held.
func TestStalledWritesBoundMemory(t *testing.T) {
	const (
		size     = 64 << 20
		budget   = 8 << 20
		stall    = 6 * time.Second
		stallers = 40
	)
	dev := bigDevice(t, size)
	srv := NewServer(Options{MaxWriteBuffer: budget, StallTimeout: stall})
	if err := srv.AddExport("disk", dev, false); err != nil {
		t.Fatal(err)
	}
	addr := serveTCP(t, srv)
	base := heapInuse()

	var stalled []*client
	for i := range stallers {
		c := dial(t, "tcp", addr)
		c.nc.SetDeadline(time.Time{})
		c.goExport("disk")
		switch i % 4 {
		case 0: // header only, longest payload
			c.request(cmdWrite, 0, 1, 0, MaxPayload, nil)
		case 1: // part of the longest payload
			c.request(cmdWrite, 0, 1, 0, MaxPayload, bytes.Repeat([]byte{0xee}, 256<<10))
		case 2: // part of a payload small enough to be buffered
			c.request(cmdWrite, 0, 1, 1<<20, BufferedWriteMax, bytes.Repeat([]byte{0xee}, 100<<10))
		case 3: // header only, bufferable payload
			c.request(cmdWrite, 0, 1, 2<<20, BufferedWriteMax, nil)
		}
		stalled = append(stalled, c)
	}
	start := time.Now()
	time.Sleep(500 * time.Millisecond) // let the server take in what was sent
	grown := int64(heapInuse()) - int64(base)
	t.Logf("heap in use grew by %d KiB with %d stalled writers (write budget %d KiB)", grown>>10, stallers, budget>>10)
	if limit := int64(budget + 16<<20); grown > limit {
		t.Errorf("heap in use grew by %d MiB with %d stalled WRITEs, want under %d MiB (write budget %d MiB + slack)", grown>>20, stallers, limit>>20, budget>>20)
	}

	// Another client is served at once, not after the stall timeout.
	c := dial(t, "tcp", addr)
	c.goExport("disk")
	pattern := bytes.Repeat([]byte{0x5a, 0xa5}, 32<<10)
	c.nc.SetDeadline(time.Now().Add(stall - time.Second))
	c.request(cmdWrite, 0, 7, 40<<20, uint32(len(pattern)), pattern)
	if h, errno, _ := c.reply(nil); h != 7 || errno != 0 {
		t.Fatalf("WRITE beside stalled clients: handle %d errno %d", h, errno)
	}
	c.request(cmdRead, 0, 8, 40<<20, uint32(len(pattern)), nil)
	if h, errno, got := c.reply(map[uint64]int{8: len(pattern)}); h != 8 || errno != 0 || !bytes.Equal(got, pattern) {
		t.Fatalf("READ beside stalled clients: handle %d errno %d, data equal %v", h, errno, bytes.Equal(got, pattern))
	}
	if d := time.Since(start); d >= stall {
		t.Fatalf("the other client was served only after %v, the stall timeout", d)
	}

	// The stalled clients are disconnected once the stall timeout passes.
	for i, sc := range stalled {
		if !waitClosed(sc, stall+20*time.Second-time.Since(start)) {
			t.Fatalf("stalled client %d still connected %v after it stalled (timeout %v)", i, time.Since(start), stall)
		}
	}
	if n := srv.Stats().Stalls; n != stallers {
		t.Errorf("Stats.Stalls = %d, want %d", n, stallers)
	}
	// What they held is free: the budget admits a buffered WRITE again.
	before := srv.Stats().StreamedWrites
	c.nc.SetDeadline(time.Now().Add(30 * time.Second))
	c.request(cmdWrite, 0, 9, 40<<20, uint32(len(pattern)), pattern)
	if h, errno, _ := c.reply(nil); h != 9 || errno != 0 {
		t.Fatalf("WRITE after the stalls: handle %d errno %d", h, errno)
	}
	if srv.Stats().StreamedWrites != before {
		t.Error("a small WRITE was streamed after the stalled clients left: their budget was not returned")
	}
}

// Payload limits and streamed WRITEs, request by request.
func TestPayloadLimits(t *testing.T) {
	const size = 40 << 20
	big := bytes.Repeat([]byte{0xab, 0xcd, 0xef}, (3<<20)/3)
	tests := []struct {
		name     string
		readOnly bool
		off      uint64
		length   uint32
		payload  []byte
		closes   bool   // the server hangs up
		errno    uint32 // else the reply's error
		lands    bool   // the payload is on the device afterwards
	}{
		{"over-max-payload-closes", false, 0, MaxPayload + 1, nil, true, 0, false},
		{"max-uint32-closes", false, 0, 1<<32 - 1, nil, true, 0, false},
		{"streamed-write-lands", false, 4 << 20, uint32(len(big)), big, false, 0, true},
		{"streamed-write-past-end", false, size - 1<<20, uint32(len(big)), big, false, errInval, false},
		{"streamed-write-read-only", true, 0, uint32(len(big)), big, false, errPerm, false},
		{"truncated-streamed-write-closes", false, 0, uint32(len(big)), big[:1<<20], true, 0, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dev := bigDevice(t, size)
			srv := NewServer(Options{StallTimeout: 2 * time.Second})
			if err := srv.AddExport("disk", dev, tc.readOnly); err != nil {
				t.Fatal(err)
			}
			c := dial(t, "unix", serve(t, srv))
			c.goExport("disk")
			c.request(cmdWrite, 0, 1, tc.off, tc.length, nil)
			c.nc.Write(tc.payload) // may fail: the server may hang up
			if tc.closes {
				if !waitClosed(c, 20*time.Second) {
					t.Fatal("connection stayed open")
				}
				return
			}
			if h, errno, _ := c.reply(nil); h != 1 || errno != tc.errno {
				t.Fatalf("reply handle %d errno %d, want errno %d", h, errno, tc.errno)
			}
			if srv.Stats().StreamedWrites != 1 {
				t.Errorf("StreamedWrites = %d, want 1", srv.Stats().StreamedWrites)
			}
			// The connection goes on, and the device has the payload
			// exactly when the WRITE succeeded.
			c.request(cmdRead, 0, 2, tc.off%size, 1<<20, nil)
			_, errno, got := c.reply(map[uint64]int{2: 1 << 20})
			if errno != 0 {
				t.Fatalf("READ after the WRITE: errno %d", errno)
			}
			if landed := bytes.Equal(got, big[:1<<20]); landed != tc.lands {
				t.Fatalf("payload on the device: %v, want %v", landed, tc.lands)
			}
			if tc.lands {
				all := make([]byte, len(big))
				if _, err := dev.f.ReadAt(all, int64(tc.off)); err != nil || !bytes.Equal(all, big) {
					t.Fatalf("device holds a different %d bytes at %d (err %v)", len(big), tc.off, err)
				}
			}
		})
	}
}

// A client that sends READs and never reads the replies is disconnected
// after StallTimeout, and the read budget it held serves others again.
func TestStalledReaderFreesReadBudget(t *testing.T) {
	const size = 64 << 20
	dev := bigDevice(t, size)
	srv := NewServer(Options{MaxReadBuffer: MaxPayload, StallTimeout: 2 * time.Second})
	if err := srv.AddExport("disk", dev, false); err != nil {
		t.Fatal(err)
	}
	sock := serve(t, srv)
	greedy := dial(t, "unix", sock)
	greedy.goExport("disk")
	for i := range uint64(4) {
		greedy.request(cmdRead, 0, i, 0, MaxPayload, nil)
	}
	start := time.Now()
	if !waitClosedWithoutReading(greedy, 30*time.Second) {
		t.Fatal("a client not reading its replies stayed connected")
	}
	t.Logf("disconnected after %v", time.Since(start))
	c := dial(t, "unix", sock)
	c.goExport("disk")
	c.request(cmdRead, 0, 1, 0, MaxPayload, nil)
	if h, errno, got := c.reply(map[uint64]int{1: MaxPayload}); h != 1 || errno != 0 || len(got) != MaxPayload {
		t.Fatalf("READ after the stalled reader left: handle %d errno %d", h, errno)
	}
	if srv.Stats().Stalls < 1 {
		t.Errorf("Stats.Stalls = %d, want >= 1", srv.Stats().Stalls)
	}
}

// waitClosedWithoutReading polls the server's view of the connection: it
// is closed once ActiveConnections would drop; the client cannot read to
// find out without unblocking the server, so it probes with a write.
func waitClosedWithoutReading(c *client, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		c.nc.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
		// A header for an unknown command: harmless if still open.
		b := be32(requestMagic)
		b = append(b, make([]byte, 24)...)
		b[7] = 42
		if _, err := c.nc.Write(b); err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
			return true
		}
		time.Sleep(200 * time.Millisecond)
	}
	return false
}
