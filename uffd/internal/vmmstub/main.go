// Command vmmstub stands in for a VMM restoring guest memory through an
// external userfaultfd page server, doing what Firecracker does: it maps
// anonymous private memory (MAP_NORESERVE) for each guest region, creates a
// userfaultfd (O_CLOEXEC|O_NONBLOCK), enables UFFD_FEATURE_EVENT_REMOVE,
// registers the regions in missing mode, connects to the server's socket
// and sends the regions as JSON with the userfaultfd as SCM_RIGHTS. It then
// touches guest memory and checks it against the expected memory file.
// With -huge it maps the regions with MAP_HUGETLB (2 MiB pages, as
// Firecracker does for huge_pages "2M") and announces page_size 2 MiB.
//
// It prints JSON lines on stdout; the last is the result. It exits 1 when
// memory differs from what is expected, 2 on a setup error.
package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/snaploader/snaploader/uffd/internal/uffdio"
)

type mapping struct {
	BaseHostVirtAddr uint64 `json:"base_host_virt_addr"`
	Size             uint64 `json:"size"`
	Offset           uint64 `json:"offset"`
	PageSize         uint64 `json:"page_size,omitempty"`
	PageSizeKiB      uint64 `json:"page_size_kib,omitempty"`
}

type result struct {
	Result            string `json:"result"`
	Pages             int    `json:"pages"`
	Mismatches        int    `json:"mismatches"`
	FirstMismatch     int64  `json:"first_mismatch"`
	DontneedPages     int    `json:"dontneed_pages"`
	DontneedNonzero   int    `json:"dontneed_nonzero"`
	ElapsedNs         int64  `json:"elapsed_ns"`
	BackgroundChecked bool   `json:"background_checked"`
}

type rangeSpec struct{ off, n int64 }

func parseRanges(s string) ([]rangeSpec, error) {
	var out []rangeSpec
	if s == "" {
		return nil, nil
	}
	for _, part := range strings.Split(s, ",") {
		a, b, ok := strings.Cut(part, ":")
		if !ok {
			return nil, fmt.Errorf("range %q: want off:len", part)
		}
		off, err1 := strconv.ParseInt(a, 0, 64)
		n, err2 := strconv.ParseInt(b, 0, 64)
		if err1 != nil || err2 != nil {
			return nil, fmt.Errorf("range %q: bad number", part)
		}
		out = append(out, rangeSpec{off, n})
	}
	return out, nil
}

func die(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "vmmstub: "+format+"\n", args...)
	os.Exit(2)
}

func emit(v any) {
	b, _ := json.Marshal(v)
	os.Stdout.Write(append(b, '\n'))
}

var sink byte

const (
	hugePage = 2 << 20
	// MAP_HUGE_2MB: log2(2 MiB) << MAP_HUGE_SHIFT.
	hugeShift = 21 << 26
	// _UFFDIO_COPY: the bit of struct uffdio_register.ioctls for UFFDIO_COPY.
	ioctlCopyBit = 0x03
)

type guest struct {
	regions []mapping
	mems    [][]byte
	page    int64
}

// at returns the mapped page of guest memory holding memory-file offset off.
func (g *guest) at(off int64) []byte {
	for i, r := range g.regions {
		if uint64(off) >= r.Offset && uint64(off) < r.Offset+r.Size {
			p := int64(uint64(off)-r.Offset) / g.page * g.page
			return g.mems[i][p : p+g.page]
		}
	}
	die("offset %d outside guest memory", off)
	return nil
}

func main() {
	sock := flag.String("sock", "", "server socket")
	expectPath := flag.String("expect", "", "expected memory file (its size is the guest memory size)")
	nregions := flag.Int("regions", 2, "number of guest memory regions")
	legacy := flag.Bool("legacy", false, "send page_size_kib instead of page_size")
	touch := flag.String("touch", "all", `"all", "none" or off:len[,off:len...] memory-file ranges to read`)
	verify := flag.Bool("verify", true, "compare touched pages with the expected file")
	dontneed := flag.String("dontneed", "", "off:len ranges to madvise(MADV_DONTNEED) after touching, then read again expecting zeros")
	exitAfter := flag.Int("exit-after", -1, "exit after touching this many pages")
	background := flag.Int64("background", -1, "offset touched by a second thread while the main thread touches the rest")
	keepSocket := flag.Bool("keep-socket", false, "keep the socket open after the handshake (Firecracker closes it)")
	huge := flag.Bool("huge", false, "back guest memory with 2 MiB huge pages (MAP_HUGETLB)")
	flag.Parse()
	debug.SetGCPercent(-1) // no stop-the-world while a thread waits on a fault

	st, err := os.Stat(*expectPath)
	if err != nil {
		die("%v", err)
	}
	size := st.Size()
	sysPage := int64(os.Getpagesize())
	page := sysPage
	mapFlags := unix.MAP_PRIVATE | unix.MAP_ANONYMOUS | unix.MAP_NORESERVE
	features := uint64(uffdio.FeatureEventRemove)
	if *huge {
		// Reserved at mmap, so a missing huge page pool fails here,
		// not as a SIGBUS later.
		page = hugePage
		mapFlags = unix.MAP_PRIVATE | unix.MAP_ANONYMOUS | unix.MAP_HUGETLB | hugeShift
		features |= uffdio.FeatureMissingHugetlbf
	}
	if size%page != 0 || size == 0 {
		die("memory size %d is not a positive multiple of the page size", size)
	}
	var expect []byte
	if *verify {
		if expect, err = os.ReadFile(*expectPath); err != nil {
			die("%v", err)
		}
	}

	uffd, err := uffdio.New(unix.O_CLOEXEC | unix.O_NONBLOCK)
	if err != nil {
		die("userfaultfd: %v", err)
	}
	api, err := uffdio.Handshake(uffd, features)
	if err != nil {
		die("UFFDIO_API: %v", err)
	}
	if api.Features&features != features {
		die("kernel lacks userfaultfd features %#x (has %#x)", features, api.Features)
	}
	g := &guest{page: page}
	per := size / int64(*nregions) / page * page
	for i := 0; i < *nregions; i++ {
		off := int64(i) * per
		n := per
		if i == *nregions-1 {
			n = size - off
		}
		mem, err := unix.Mmap(-1, 0, int(n), unix.PROT_READ|unix.PROT_WRITE, mapFlags)
		if err != nil {
			die("mmap of %d bytes (huge pages: %v): %v", n, *huge, err)
		}
		addr := uint64(uintptr(unsafe.Pointer(&mem[0])))
		reg, err := uffdio.Register(uffd, addr, uint64(n), uffdio.RegisterModeMissing)
		if err != nil {
			die("UFFDIO_REGISTER: %v", err)
		}
		if reg.Ioctls&(1<<ioctlCopyBit) == 0 {
			die("UFFDIO_COPY is not available on the registered region (ioctls %#x)", reg.Ioctls)
		}
		m := mapping{BaseHostVirtAddr: addr, Size: uint64(n), Offset: uint64(off)}
		switch {
		case *legacy && *huge:
			m.PageSizeKiB = uint64(page) >> 10
		case *legacy:
			m.PageSizeKiB = uint64(page)
		default:
			m.PageSize = uint64(page)
		}
		g.regions = append(g.regions, m)
		g.mems = append(g.mems, mem)
	}
	// List the regions last-first so that offsets, not order, place them.
	var msg []mapping
	for i := len(g.regions) - 1; i >= 0; i-- {
		msg = append(msg, g.regions[i])
	}
	body, _ := json.Marshal(msg)
	conn, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: *sock, Net: "unix"})
	if err != nil {
		die("connect: %v", err)
	}
	if _, _, err := conn.WriteMsgUnix(body, unix.UnixRights(uffd), nil); err != nil {
		die("send handshake: %v", err)
	}
	if !*keepSocket {
		conn.Close()
	}
	emit(map[string]any{"event": "handshake", "pid": os.Getpid()})

	res := result{Result: "ok", FirstMismatch: -1}
	start := time.Now()
	check := func(off int64) {
		p := g.at(off)
		res.Pages++
		if *verify {
			if !bytes.Equal(p, expect[off:off+page]) {
				if res.Mismatches == 0 {
					res.FirstMismatch = off
				}
				res.Mismatches++
			}
		} else {
			for i := int64(0); i < page; i += sysPage {
				sink += p[i]
			}
		}
		if *exitAfter >= 0 && res.Pages >= *exitAfter {
			emit(map[string]any{"event": "exiting", "pages": res.Pages})
			os.Exit(0)
		}
	}

	var wg sync.WaitGroup
	var bgOK bool
	if *background >= 0 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			runtime.LockOSThread()
			p := g.at(*background)
			bgOK = !*verify || bytes.Equal(p, expect[*background/page*page:][:page])
		}()
	}

	var ranges []rangeSpec
	switch *touch {
	case "all":
		ranges = []rangeSpec{{0, size}}
	case "none":
	default:
		if ranges, err = parseRanges(*touch); err != nil {
			die("%v", err)
		}
	}
	for _, r := range ranges {
		for off := r.off / page * page; off < r.off+r.n; off += page {
			check(off)
		}
	}
	if *background >= 0 {
		emit(map[string]any{"event": "touched", "pages": res.Pages})
		wg.Wait()
		res.BackgroundChecked = true
		if !bgOK {
			res.Mismatches++
			if res.FirstMismatch < 0 {
				res.FirstMismatch = *background
			}
		}
	}

	dn, err := parseRanges(*dontneed)
	if err != nil {
		die("%v", err)
	}
	for _, r := range dn {
		for off := r.off / page * page; off < r.off+r.n; off += page {
			p := g.at(off)
			if err := unix.Madvise(p, unix.MADV_DONTNEED); err != nil {
				die("madvise: %v", err)
			}
		}
		zero := make([]byte, page)
		for off := r.off / page * page; off < r.off+r.n; off += page {
			res.DontneedPages++
			if !bytes.Equal(g.at(off), zero) {
				res.DontneedNonzero++
			}
		}
	}
	res.ElapsedNs = int64(time.Since(start))
	if res.Mismatches > 0 || res.DontneedNonzero > 0 {
		res.Result = "mismatch"
	}
	emit(res)
	if *keepSocket {
		conn.Close()
	}
	if res.Result != "ok" {
		os.Exit(1)
	}
}
