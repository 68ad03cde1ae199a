package uffd

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"math/rand"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/internal/testutil"
	"github.com/snaploader/snaploader/uffd/internal/uffdio"
	"golang.org/x/sys/unix"
)

var (
	stubPath string
	stubErr  error
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "vmmstub")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	stubPath = filepath.Join(dir, "vmmstub")
	goBin, err := exec.LookPath("go")
	if err == nil {
		out, berr := exec.Command(goBin, "build", "-o", stubPath, "./internal/vmmstub").CombinedOutput()
		if berr != nil {
			stubErr = fmt.Errorf("building vmmstub: %v\n%s", berr, out)
		}
	} else {
		stubErr = err
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// requireUffd skips (fails under CI) unless userfaultfd works here.
func requireUffd(t testing.TB) {
	t.Helper()
	testutil.RequireRoot(t)
	fd, err := uffdio.New(unix.O_CLOEXEC | unix.O_NONBLOCK)
	if err != nil {
		testutil.Unavailable(t, "userfaultfd: "+err.Error())
		return
	}
	unix.Close(fd)
	if stubErr != nil {
		t.Fatal(stubErr)
	}
}

const page = 4096

// memFile writes a memory file of size bytes: random data, with the chunks
// listed in holes (chunk-sized, chunk-aligned) all zeros.
func memFile(t testing.TB, size, chunk int64, holes ...int64) (string, []byte) {
	t.Helper()
	data := make([]byte, size)
	rand.New(rand.NewSource(size)).Read(data)
	for _, h := range holes {
		clear(data[h*chunk : min((h+1)*chunk, size)])
	}
	path := filepath.Join(t.TempDir(), "mem")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return path, data
}

// fileMem is a Memory over a real file.
type fileMem struct {
	f    *os.File
	size int64
}

func openMem(t testing.TB, path string) *fileMem {
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	st, _ := f.Stat()
	return &fileMem{f: f, size: st.Size()}
}

func (m *fileMem) ReadAt(p []byte, off int64) (int, error) { return m.f.ReadAt(p, off) }
func (m *fileMem) Size() int64                             { return m.size }

// holeMem adds HoleChecker over chunk-granular holes.
type holeMem struct {
	*fileMem
	chunk int64
	holes map[int64]bool
}

func (m *holeMem) IsHole(off int64) bool { return m.holes[off/m.chunk] }

// failMem fails every read touching offset bad, like a chunk whose
// digest does not verify.
type failMem struct {
	*fileMem
	bad int64
}

func (m *failMem) ReadAt(p []byte, off int64) (int, error) {
	if m.bad >= off && m.bad < off+int64(len(p)) {
		return 0, status.Errorf(codes.DataLoss, "chunk at offset %d failed digest verification", m.bad)
	}
	return m.fileMem.ReadAt(p, off)
}

// gateMem blocks reads touching [lo, hi) until open is closed.
type gateMem struct {
	*fileMem
	lo, hi  int64
	open    chan struct{}
	blocked chan struct{}
	once    sync.Once
}

func (m *gateMem) ReadAt(p []byte, off int64) (int, error) {
	if off < m.hi && off+int64(len(p)) > m.lo {
		m.once.Do(func() { close(m.blocked) })
		<-m.open
	}
	return m.fileMem.ReadAt(p, off)
}

type served struct {
	lis  *net.UnixListener
	srv  *Server
	sock string
	errc chan error
}

func serve(t testing.TB, ctx context.Context, mem Memory, opts Options) *served {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "uffd.sock")
	lis, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lis.Close() })
	s := &served{lis: lis, srv: NewServer(mem, opts), sock: sock, errc: make(chan error, 1)}
	go func() { s.errc <- s.srv.Serve(ctx, lis) }()
	return s
}

func (s *served) wait(t testing.TB, timeout time.Duration) error {
	t.Helper()
	select {
	case err := <-s.errc:
		return err
	case <-time.After(timeout):
		t.Fatalf("Serve did not return within %v", timeout)
		return nil
	}
}

type stubResult struct {
	Result            string `json:"result"`
	Pages             int    `json:"pages"`
	Mismatches        int    `json:"mismatches"`
	FirstMismatch     int64  `json:"first_mismatch"`
	DontneedPages     int    `json:"dontneed_pages"`
	DontneedNonzero   int    `json:"dontneed_nonzero"`
	ElapsedNs         int64  `json:"elapsed_ns"`
	BackgroundChecked bool   `json:"background_checked"`
}

type stub struct {
	cmd    *exec.Cmd
	lines  chan string
	stderr strings.Builder
	done   chan struct{}
	result *stubResult
	events []string
}

// startStub runs the VMM stand-in as a separate process.
func startStub(t testing.TB, sock, expect string, args ...string) *stub {
	t.Helper()
	cmd := exec.Command(stubPath, append([]string{"-sock", sock, "-expect", expect}, args...)...)
	cmd.Env = append(os.Environ(), "GODEBUG=asyncpreemptoff=1")
	st := &stub{cmd: cmd, lines: make(chan string, 100), done: make(chan struct{})}
	cmd.Stderr = &st.stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); <-st.done })
	go func() {
		defer close(st.done)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			st.lines <- sc.Text()
		}
		close(st.lines)
	}()
	return st
}

// waitEvent waits for an event line {"event": name}.
func (st *stub) waitEvent(t testing.TB, name string, timeout time.Duration) {
	t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case l, ok := <-st.lines:
			if !ok {
				t.Fatalf("stub output ended before event %q; stderr: %s", name, st.stderr.String())
			}
			st.record(l)
			if strings.Contains(l, `"event":"`+name+`"`) {
				return
			}
		case <-deadline:
			t.Fatalf("no event %q from the stub within %v", name, timeout)
		}
	}
}

func (st *stub) record(l string) {
	if strings.Contains(l, `"result"`) {
		var r stubResult
		if json.Unmarshal([]byte(l), &r) == nil {
			st.result = &r
		}
		return
	}
	st.events = append(st.events, l)
}

// finish waits for the stub to exit and returns its exit error.
func (st *stub) finish(t testing.TB, timeout time.Duration) error {
	t.Helper()
	timer := time.After(timeout)
	for {
		select {
		case l, ok := <-st.lines:
			if !ok {
				return st.cmd.Wait()
			}
			st.record(l)
		case <-timer:
			t.Fatalf("stub did not exit within %v", timeout)
		}
	}
}

func openFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}
