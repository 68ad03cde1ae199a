package uffd

import (
	"context"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/uffd/internal/uffdio"
)

func TestParseMappings(t *testing.T) {
	const mem = 64 << 20
	tests := []struct {
		name     string
		json     string
		wantErr  string // substring; "" means valid
		wantPage []uint64
	}{
		{name: "firecracker", json: `[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":4096},{"base_host_virt_addr":1048576,"size":4096,"offset":8192,"page_size":4096}]`, wantPage: []uint64{4096, 4096}},
		{name: "both page fields", json: `[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":4096,"page_size_kib":4096}]`, wantPage: []uint64{4096}},
		{name: "legacy bytes", json: `[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size_kib":4096}]`, wantPage: []uint64{4096}},
		{name: "legacy KiB", json: `[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size_kib":4}]`, wantPage: []uint64{4096}},
		{name: "legacy huge KiB", json: `[{"base_host_virt_addr":2097152,"size":2097152,"offset":0,"page_size_kib":2048}]`, wantPage: []uint64{2 << 20}},
		{name: "no page size", json: `[{"base_host_virt_addr":4096,"size":4096,"offset":4096}]`, wantPage: []uint64{4096}},
		{name: "unknown fields ignored", json: `[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096,"future":1}]`, wantPage: []uint64{4096}},
		{name: "whole memory", json: `[{"base_host_virt_addr":4096,"size":67108864,"offset":0,"page_size":4096}]`, wantPage: []uint64{4096}},
		{name: "bad JSON", json: `[{"base_host_virt_addr":`, wantErr: "decoding"},
		{name: "not an array", json: `{"base_host_virt_addr":4096}`, wantErr: "decoding"},
		{name: "empty", json: `[]`, wantErr: "no memory regions"},
		{name: "missing size", json: `[{"base_host_virt_addr":4096,"offset":0}]`, wantErr: "missing"},
		{name: "zero size", json: `[{"base_host_virt_addr":4096,"size":0,"offset":0}]`, wantErr: "empty region"},
		{name: "beyond memory", json: `[{"base_host_virt_addr":4096,"size":8192,"offset":67104768}]`, wantErr: "beyond"},
		{name: "offset overflow", json: `[{"base_host_virt_addr":4096,"size":4096,"offset":18446744073709547520}]`, wantErr: "beyond"},
		{name: "address overflow", json: `[{"base_host_virt_addr":18446744073709547520,"size":8192,"offset":0}]`, wantErr: "overflows"},
		{name: "unaligned base", json: `[{"base_host_virt_addr":4097,"size":4096,"offset":0}]`, wantErr: "multiples"},
		{name: "unaligned size", json: `[{"base_host_virt_addr":4096,"size":4000,"offset":0}]`, wantErr: "multiples"},
		{name: "unaligned offset", json: `[{"base_host_virt_addr":4096,"size":4096,"offset":100}]`, wantErr: "multiples"},
		{name: "odd page size", json: `[{"base_host_virt_addr":4096,"size":12288,"offset":0,"page_size":12288}]`, wantErr: "page size"},
		{name: "small page size", json: `[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":512}]`, wantErr: "page size"},
		{name: "overlap", json: `[{"base_host_virt_addr":1048576,"size":8192,"offset":0},{"base_host_virt_addr":1052672,"size":4096,"offset":8192}]`, wantErr: "overlap"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseMappings([]byte(tc.json), mem, 4096)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) || status.Code(err) != codes.InvalidArgument {
					t.Fatalf("err = %v, want InvalidArgument containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != len(tc.wantPage) {
				t.Fatalf("%d regions, want %d", len(got), len(tc.wantPage))
			}
			for i, m := range got {
				if m.PageSize != tc.wantPage[i] {
					t.Errorf("region %d page size %d, want %d", i, m.PageSize, tc.wantPage[i])
				}
			}
		})
	}
}

// newUffd returns an initialised userfaultfd of this process with nothing
// registered (no fault can ever arrive on it).
func newUffd(t *testing.T, api bool) int {
	t.Helper()
	fd, err := uffdio.New(unix.O_CLOEXEC | unix.O_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	if api {
		if _, err := uffdio.Handshake(fd, 0); err != nil {
			t.Fatal(err)
		}
	}
	return fd
}

func TestHandshakeRejected(t *testing.T) {
	requireUffd(t)
	const size = 1 << 20
	path, _ := memFile(t, size, 1)
	mem := openMem(t, path)
	good := `[{"base_host_virt_addr":1048576,"size":1048576,"offset":0,"page_size":4096}]`
	tests := []struct {
		name    string
		body    string
		fds     func(t *testing.T) []int
		wantErr string
	}{
		{name: "bad JSON", body: `[{"base_host_virt_addr":1048576,`, fds: func(t *testing.T) []int { return []int{newUffd(t, true)} }, wantErr: "not valid JSON"},
		{name: "JSON of the wrong shape", body: `{"regions":1}`, fds: func(t *testing.T) []int { return []int{newUffd(t, true)} }, wantErr: "decoding"},
		{name: "no fd", body: good, wantErr: "0 file descriptors"},
		{name: "two fds", body: good, fds: func(t *testing.T) []int { return []int{newUffd(t, true), newUffd(t, true)} }, wantErr: "2 file descriptors"},
		{name: "region beyond size", body: `[{"base_host_virt_addr":1048576,"size":1048576,"offset":4096}]`, fds: func(t *testing.T) []int { return []int{newUffd(t, true)} }, wantErr: "beyond"},
		{name: "unaligned region", body: `[{"base_host_virt_addr":1048577,"size":4096,"offset":0}]`, fds: func(t *testing.T) []int { return []int{newUffd(t, true)} }, wantErr: "multiples"},
		{name: "not a userfaultfd", body: good, fds: func(t *testing.T) []int {
			var p [2]int
			if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
				t.Fatal(err)
			}
			unix.Close(p[1])
			return p[:1]
		}, wantErr: "not a userfaultfd"},
		{name: "userfaultfd without UFFDIO_API", body: good, fds: func(t *testing.T) []int { return []int{newUffd(t, false)} }, wantErr: "not initialised"},
		{name: "nothing sent", wantErr: "without sending"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := openFDs(t)
			s := serve(t, context.Background(), mem, Options{HandshakeTimeout: 5 * time.Second})
			conn, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: s.sock, Net: "unix"})
			if err != nil {
				t.Fatal(err)
			}
			var fds []int
			if tc.fds != nil {
				fds = tc.fds(t)
			}
			if tc.body != "" {
				var oob []byte
				if len(fds) > 0 {
					oob = unix.UnixRights(fds...)
				}
				if _, _, err := conn.WriteMsgUnix([]byte(tc.body), oob, nil); err != nil {
					t.Fatal(err)
				}
			} else {
				conn.CloseWrite()
			}
			for _, fd := range fds {
				unix.Close(fd)
			}
			err = s.wait(t, 10*time.Second)
			if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("Serve: %v, want InvalidArgument containing %q", err, tc.wantErr)
			}
			// The server closed its end.
			conn.SetReadDeadline(time.Now().Add(5 * time.Second))
			if n, err := conn.Read(make([]byte, 16)); err != io.EOF {
				t.Errorf("read from rejected connection: %d, %v; want EOF", n, err)
			}
			conn.Close()
			s.lis.Close()
			if after := openFDs(t); after != before {
				t.Errorf("open fds: %d before, %d after (received descriptors leaked)", before, after)
			}
		})
	}
}

func TestQuantile(t *testing.T) {
	var c counters
	for i := 0; i < 98; i++ {
		c.observe(3 * time.Microsecond) // bucket ≤4µs
	}
	c.observe(100 * time.Microsecond) // ≤128µs
	c.observe(10 * time.Millisecond)
	s := c.snapshot()
	if s.LatencyP50 != 4*time.Microsecond {
		t.Errorf("p50 = %v, want 4µs", s.LatencyP50)
	}
	if s.LatencyP99 != 128*time.Microsecond {
		t.Errorf("p99 = %v, want 128µs", s.LatencyP99)
	}
	if s.LatencyMax != 10*time.Millisecond {
		t.Errorf("max = %v", s.LatencyMax)
	}
	if (&counters{}).snapshot().LatencyP99 != 0 {
		t.Error("empty histogram has a p99")
	}
}
