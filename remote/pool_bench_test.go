package remote_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"golang.org/x/sys/unix"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/internal/testutil"
	"github.com/snaploader/snaploader/remote"
)

// pinProcess moves every thread of this process to cpu (new threads
// inherit it) and returns a function that restores the previous set.
func pinProcess(b *testing.B, cpu int) func() {
	b.Helper()
	var old, set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &old); err != nil {
		b.Fatal(err)
	}
	set.Set(cpu)
	apply := func(s *unix.CPUSet) {
		ents, err := os.ReadDir("/proc/self/task")
		if err != nil {
			b.Fatal(err)
		}
		for _, e := range ents {
			if tid, err := strconv.Atoi(e.Name()); err == nil {
				unix.SchedSetaffinity(tid, s) // a thread may have exited
			}
		}
	}
	apply(&set)
	return func() { apply(&old) }
}

// BenchmarkConnections emulates two hosts: `snaploader serve` pinned to CPU
// 1, this process pinned to CPU 0, downloading 64 distinct 4 MB blobs with
// 4 reads in flight (the read-ahead's concurrency) over 1, 2 and 4
// connections; the configurations alternate round by round and the
// medians are reported.
//
//	go test -run '^$' -bench Connections -benchtime 5x ./remote/
func BenchmarkConnections(b *testing.B) {
	if runtime.NumCPU() < 2 {
		b.Skip("needs two CPUs")
	}
	bin, cleanup, err := testutil.BuildMain("../cmd/snaploader", "snaploader")
	if err != nil {
		b.Fatal(err)
	}
	defer cleanup()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	srv := exec.Command("taskset", "-c", "1", bin, "serve", "--listen", addr, "--cache-dir", filepath.Join(b.TempDir(), "served"))
	if err := srv.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { srv.Process.Kill(); srv.Wait() }()
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			b.Fatal("serve did not listen")
		}
	}
	ctx := context.Background()
	url := "grpc://" + addr
	up, err := remote.Dial(ctx, url, remote.Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer up.Close()
	var ds []*repb.Digest
	data := blob(benchBlob, 7)
	for i := range 64 {
		binary.LittleEndian.PutUint64(data, uint64(i))
		d := digest.Compute(up.DigestFunction(), data)
		if err := up.Write(ctx, cache.Namespace{}, d, bytes.NewReader(data)); err != nil {
			b.Fatal(err)
		}
		ds = append(ds, d)
	}
	defer pinProcess(b, 0)()
	conns := []int{1, 2, 4}
	clients := map[int]*remote.Client{}
	for _, n := range conns {
		c, err := remote.Dial(ctx, url, remote.Options{Connections: n})
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		clients[n] = c
	}
	download := func(c *remote.Client) time.Duration {
		t := time.Now()
		work := make(chan *repb.Digest)
		var wg sync.WaitGroup
		for range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				buf := make([]byte, 1<<20)
				for d := range work {
					rc, err := c.Read(ctx, cache.Namespace{}, d)
					if err != nil {
						b.Error(err)
						continue
					}
					if n, err := io.CopyBuffer(io.Discard, rc, buf); err != nil || n != d.SizeBytes {
						b.Error(n, err)
					}
					rc.Close()
				}
			}()
		}
		for _, d := range ds {
			work <- d
		}
		close(work)
		wg.Wait()
		return time.Since(t)
	}
	times := map[int][]float64{}
	for _, n := range conns {
		download(clients[n]) // warm-up
	}
	for b.Loop() {
		for _, n := range conns {
			times[n] = append(times[n], download(clients[n]).Seconds())
		}
	}
	total := float64(len(ds) * benchBlob)
	for _, n := range conns {
		slices.Sort(times[n])
		b.ReportMetric(total/1e6/times[n][len(times[n])/2], fmt.Sprintf("MB/s-%dconn", n))
	}
}
