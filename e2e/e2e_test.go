// Package e2e holds end-to-end tests that run snaploader as real processes:
// `snaploader serve` over local disk and over MinIO, hosts with separate
// cache directories, and a real VMM.
package e2e

import (
	"bufio"
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/snaploader/snaploader/internal/testutil"
)

var binary string

func TestMain(m *testing.M) {
	bin, cleanup, err := testutil.BuildMain("../cmd/snaploader", "snaploader")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = bin
	code := m.Run()
	cleanup()
	os.Exit(code)
}

// freePort returns a free 127.0.0.1 port.
func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// server is a `snaploader serve` process.
type server struct {
	addr string
	args []string
	env  []string
	cmd  *exec.Cmd
	log  *syncLog
}

// syncLog is a process's stderr, written by one goroutine and read by the
// test.
type syncLog struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *syncLog) WriteString(s string) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.WriteString(s)
}

func (l *syncLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// startServe starts `snaploader serve` on a free port with extra args.
func startServe(t testing.TB, env []string, args ...string) *server {
	t.Helper()
	s := &server{addr: fmt.Sprintf("127.0.0.1:%d", freePort(t)), args: args, env: env}
	s.start(t)
	t.Cleanup(func() { s.stop() })
	return s
}

func (s *server) start(t testing.TB) {
	t.Helper()
	s.log = &syncLog{}
	cmd := exec.Command(binary, append([]string{"serve", "--listen", s.addr}, s.args...)...)
	cmd.Env = append(os.Environ(), s.env...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s.cmd = cmd
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			s.log.WriteString(sc.Text() + "\n")
		}
	}()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		c, err := net.DialTimeout("tcp", s.addr, 200*time.Millisecond)
		if err == nil {
			c.Close()
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("snaploader serve did not listen on %s", s.addr)
}

func (s *server) stop() {
	if s.cmd != nil && s.cmd.Process != nil {
		s.cmd.Process.Kill()
		s.cmd.Wait()
		s.cmd = nil
	}
}

func (s *server) url() string { return "grpc://" + s.addr }

// writeVM writes a VM-like file of size bytes (a quarter zero chunks).
func writeVM(t testing.TB, path string, size int, seed uint64) []byte {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, 3))
	b := make([]byte, size)
	for off := 0; off < size; off += 64 << 10 {
		if rng.IntN(4) == 0 {
			continue
		}
		for i := off; i < min(size, off+64<<10); i++ {
			b[i] = byte(rng.Uint32())
		}
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return b
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}
