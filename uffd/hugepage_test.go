package uffd

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cow"
	"github.com/snaploader/snaploader/internal/testutil"
)

const hugePage = 2 << 20

const nrHugepages = "/proc/sys/vm/nr_hugepages"

// meminfo returns the /proc/meminfo field name (e.g. "HugePages_Free").
func meminfo(t testing.TB, name string) int64 {
	t.Helper()
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if ok && k == name {
			n, err := strconv.ParseInt(strings.Fields(v)[0], 10, 64)
			if err != nil {
				t.Fatalf("/proc/meminfo %s: %v", name, err)
			}
			return n
		}
	}
	t.Fatalf("/proc/meminfo has no %s", name)
	return 0
}

func readInt(t testing.TB, path string) int64 {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return n
}

// reserveHugePages makes sure n free 2 MiB huge pages are available,
// growing the pool through /proc/sys/vm/nr_hugepages when needed and
// restoring its old size when the test ends. Missing huge pages skip the
// test, or fail it under CI.
func reserveHugePages(t testing.TB, n int64) {
	t.Helper()
	requireUffd(t)
	if _, err := os.Stat(nrHugepages); err != nil {
		testutil.Unavailable(t, "huge pages: "+err.Error())
		return
	}
	if sz := meminfo(t, "Hugepagesize"); sz != hugePage>>10 {
		testutil.Unavailable(t, fmt.Sprintf("default huge page size is %d KiB, not 2048", sz))
		return
	}
	avail := func() int64 { return meminfo(t, "HugePages_Free") - meminfo(t, "HugePages_Rsvd") }
	have := avail()
	if have >= n {
		return
	}
	old := readInt(t, nrHugepages)
	want := old + n - have
	if err := os.WriteFile(nrHugepages, []byte(strconv.FormatInt(want, 10)), 0o644); err != nil {
		testutil.Unavailable(t, fmt.Sprintf("reserving %d huge pages through %s: %v", want, nrHugepages, err))
		return
	}
	t.Cleanup(func() {
		if err := os.WriteFile(nrHugepages, []byte(strconv.FormatInt(old, 10)), 0o644); err != nil {
			t.Errorf("restoring %s to %d: %v", nrHugepages, old, err)
		}
	})
	if got := avail(); got < n {
		testutil.Unavailable(t, fmt.Sprintf("only %d of %d huge pages could be reserved (%s = %d)", got, n, nrHugepages, readInt(t, nrHugepages)))
	}
}

// TestServeHugePages serves MAP_HUGETLB guest memory in a separate VMM
// process: every 2 MiB page equals the snapshot, holes read zero and are
// installed without reading, and each fault installs one whole block.
func TestServeHugePages(t *testing.T) {
	const mib = 1 << 20
	const size = 32 * mib
	reserveHugePages(t, size/hugePage)
	tests := []struct {
		name    string
		chunk   int64 // Options.ChunkSize
		holes   []int64
		checker bool
		regions int
		args    []string
	}{
		{name: "4MiB chunks, holes in half a chunk", chunk: 4 * mib, holes: []int64{1, 6, 7, 15}, checker: true, regions: 2},
		{name: "one huge page per fault", holes: []int64{3}, checker: true, regions: 3},
		{name: "holes read without checker", chunk: 2 * mib, holes: []int64{0, 9}, regions: 2},
		{name: "legacy page_size_kib", chunk: 8 * mib, holes: []int64{4}, checker: true, regions: 1, args: []string{"-legacy"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path, _ := memFile(t, size, hugePage, tc.holes...)
			fm := openMem(t, path)
			var mem Memory = fm
			holes := map[int64]bool{}
			for _, h := range tc.holes {
				holes[h] = true
			}
			if tc.checker {
				mem = &holeMem{fileMem: fm, chunk: hugePage, holes: holes}
			}
			s := serve(t, context.Background(), mem, Options{ChunkSize: tc.chunk})
			st := startStub(t, s.sock, path, append([]string{"-huge", "-regions", fmt.Sprint(tc.regions)}, tc.args...)...)
			if err := st.finish(t, 60*time.Second); err != nil {
				t.Fatalf("stub: %v; stderr: %s", err, st.stderr.String())
			}
			if st.result == nil || st.result.Result != "ok" || st.result.Mismatches != 0 || st.result.Pages != size/hugePage {
				t.Fatalf("stub result %+v, want all %d huge pages equal to the snapshot", st.result, size/hugePage)
			}
			if err := s.wait(t, 10*time.Second); err != nil {
				t.Fatalf("Serve: %v", err)
			}

			stats := s.srv.Stats()
			block := max(tc.chunk, hugePage)
			var blocks, dataBlocks int
			for _, r := range stubRegions(size, tc.regions, hugePage) {
				for b := r[0] / block; b*block < r[1]; b++ {
					blocks++
					for off := max(b*block, r[0]); off < min((b+1)*block, r[1]); off += hugePage {
						if !tc.checker || !holes[off/hugePage] {
							dataBlocks++
							break
						}
					}
				}
			}
			wantZero := uint64(0)
			if tc.checker {
				wantZero = uint64(len(tc.holes))
			}
			if stats.ZeroPages != wantZero || stats.PagesCopied != size/hugePage-wantZero {
				t.Errorf("%d huge pages copied and %d zero, want %d and %d", stats.PagesCopied, stats.ZeroPages, size/hugePage-wantZero, wantZero)
			}
			if stats.BytesCopied != stats.PagesCopied*hugePage || stats.BytesRead != stats.BytesCopied {
				t.Errorf("BytesCopied %d, BytesRead %d for %d huge pages copied", stats.BytesCopied, stats.BytesRead, stats.PagesCopied)
			}
			if stats.Faults != uint64(blocks) || stats.Fetches != uint64(dataBlocks) {
				t.Errorf("Faults %d, Fetches %d; want one fault per %d-byte block (%d) and one fetch per block holding data (%d)",
					stats.Faults, stats.Fetches, block, blocks, dataBlocks)
			}
		})
	}
}

// TestServeHugePagesDontneed: huge pages the VMM releases read zero after.
func TestServeHugePagesDontneed(t *testing.T) {
	const size = 16 << 20
	reserveHugePages(t, size/hugePage)
	path, _ := memFile(t, size, hugePage)
	s := serve(t, context.Background(), openMem(t, path), Options{ChunkSize: 4 << 20})
	// Two huge pages straddling the boundary between the stub's regions.
	lo, n := int64(size/2-hugePage), int64(2*hugePage)
	st := startStub(t, s.sock, path, "-huge", "-dontneed", fmt.Sprintf("%d:%d", lo, n))
	if err := st.finish(t, 60*time.Second); err != nil {
		t.Fatalf("stub: %v (result %+v); stderr: %s", err, st.result, st.stderr.String())
	}
	if st.result.DontneedPages != 2 || st.result.DontneedNonzero != 0 || st.result.Mismatches != 0 {
		t.Fatalf("stub result %+v, want 2 released huge pages reading zero", st.result)
	}
	if err := s.wait(t, 10*time.Second); err != nil {
		t.Fatalf("Serve: %v", err)
	}
	if stats := s.srv.Stats(); stats.RemovedPages != 2 || stats.ZeroPages != 2 || stats.PagesCopied != size/hugePage {
		t.Errorf("RemovedPages %d, ZeroPages %d, PagesCopied %d; want 2, 2, %d", stats.RemovedPages, stats.ZeroPages, stats.PagesCopied, size/hugePage)
	}
}

// TestServeHugePagesChunkMismatch: a huge-page region whose page size does
// not divide the chunk size is refused at the handshake, naming both.
func TestServeHugePagesChunkMismatch(t *testing.T) {
	const size = 8 << 20
	reserveHugePages(t, size/hugePage)
	path, _ := memFile(t, size, hugePage)
	for _, chunk := range []int64{cow.DefaultChunkSize, 1 << 20, 3 << 20} {
		t.Run(fmt.Sprint(chunk), func(t *testing.T) {
			s := serve(t, context.Background(), openMem(t, path), Options{ChunkSize: chunk})
			st := startStub(t, s.sock, path, "-huge", "-touch", "none")
			err := s.wait(t, 30*time.Second)
			if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), fmt.Sprintf("%d-byte pages, which do not divide the memory snapshot's chunk size %d", hugePage, chunk)) {
				t.Fatalf("Serve: %v, want InvalidArgument naming the page and chunk sizes", err)
			}
			st.finish(t, 30*time.Second)
			if s.srv.Stats().PagesCopied != 0 {
				t.Error("pages were served after a refused handshake")
			}
		})
	}
}

// TestServeHugePagesFromStore serves huge pages lazily from a real
// copy-on-write store, and a chunk that fails verification kills the VMM.
func TestServeHugePagesFromStore(t *testing.T) {
	const size, chunk = 32 << 20, 4 << 20
	reserveHugePages(t, size/hugePage)
	t.Run("restores", func(t *testing.T) {
		path, _ := memFile(t, size, chunk, 2, 5)
		st := storeFromFile(t, path, chunk, nil)
		s := serve(t, context.Background(), st, Options{ChunkSize: st.ChunkSize()})
		stub := startStub(t, s.sock, path, "-huge", "-regions", "2")
		if err := stub.finish(t, 60*time.Second); err != nil {
			t.Fatalf("stub: %v; stderr: %s", err, stub.stderr.String())
		}
		if stub.result == nil || stub.result.Result != "ok" || stub.result.Pages != size/hugePage {
			t.Fatalf("stub result %+v, want every huge page equal to the snapshot", stub.result)
		}
		if err := s.wait(t, 10*time.Second); err != nil {
			t.Fatalf("Serve: %v", err)
		}
		if z := s.srv.Stats().ZeroPages; z != 2*chunk/hugePage {
			t.Errorf("zero pages = %d, want the %d huge pages of the 2 holes", z, 2*chunk/hugePage)
		}
		if f := st.Stats().Fetched; f != size/chunk-2 {
			t.Errorf("store fetched %d chunks, want %d (every data chunk once)", f, size/chunk-2)
		}
	})
	t.Run("corrupt chunk kills the VMM", func(t *testing.T) {
		path, _ := memFile(t, size, chunk)
		var victim string
		st := storeFromFile(t, path, chunk, corruptChunk(t, 5, 3<<20, &victim)) // in the chunk's second huge page
		s := serve(t, context.Background(), st, Options{ChunkSize: chunk})
		stub := startStub(t, s.sock, path, "-huge")
		err := s.wait(t, 60*time.Second)
		if status.Code(err) != codes.DataLoss || !strings.Contains(err.Error(), victim) {
			t.Fatalf("Serve error %v, want Internal naming digest %s", err, victim)
		}
		werr := stub.finish(t, 10*time.Second)
		var ee *exec.ExitError
		if !errors.As(werr, &ee) || !ee.Sys().(syscall.WaitStatus).Signaled() || stub.result != nil {
			t.Fatalf("stub ended with %v and result %+v, want it killed without a result", werr, stub.result)
		}
		if c := s.srv.Stats().PagesCopied; c > 5*chunk/hugePage {
			t.Errorf("%d huge pages copied: pages of or beyond the corrupt chunk were served", c)
		}
	})
}
