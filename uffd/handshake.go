package uffd

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"net"
	"os"
	"sort"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

const (
	maxHandshakeBytes = 1 << 20
	maxRegions        = 4096
	maxPageSize       = 1 << 30
	// How long to wait for the rest of a handshake split across reads.
	continuationWait = 250 * time.Millisecond
)

// peer is the accepted VMM connection after a valid handshake.
type peer struct {
	uffd    int
	pid     int // from SO_PEERCRED; 0 if unknown
	pidfd   int // -1 if unavailable
	regions []Mapping
}

func (p *peer) close() {
	if p.uffd >= 0 {
		unix.Close(p.uffd)
		p.uffd = -1
	}
	if p.pidfd >= 0 {
		unix.Close(p.pidfd)
		p.pidfd = -1
	}
}

func invalidf(format string, args ...any) error {
	return status.Errorf(codes.InvalidArgument, format, args...)
}

// readHandshake reads the VMM's message and descriptor from conn.
func readHandshake(ctx context.Context, conn *net.UnixConn, timeout time.Duration) (data []byte, fds []int, err error) {
	deadline := time.Now().Add(timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	conn.SetReadDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { conn.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()

	buf := make([]byte, 64<<10)
	oob := make([]byte, unix.CmsgSpace(16*4))
	defer func() {
		if err != nil {
			for _, fd := range fds {
				unix.Close(fd)
			}
			fds = nil
		}
	}()
	for {
		n, oobn, flags, _, rerr := conn.ReadMsgUnix(buf, oob)
		n, oobn = max(n, 0), max(oobn, 0)
		if oobn > 0 {
			got, perr := parseRights(oob[:oobn])
			fds = append(fds, got...)
			if perr != nil {
				return nil, fds, invalidf("parsing handshake control message: %v", perr)
			}
		}
		if flags&unix.MSG_CTRUNC != 0 {
			return nil, fds, invalidf("handshake carried too many file descriptors (control message truncated)")
		}
		data = append(data, buf[:n]...)
		if len(data) > maxHandshakeBytes {
			return nil, fds, invalidf("handshake larger than %d bytes", maxHandshakeBytes)
		}
		if len(data) > 0 && json.Valid(data) {
			return data, fds, nil
		}
		if errors.Is(rerr, io.EOF) || (rerr == nil && n == 0 && oobn == 0) {
			if len(data) == 0 {
				return nil, fds, invalidf("VMM closed the connection without sending a handshake")
			}
			return nil, fds, invalidf("handshake is not valid JSON (%d bytes)", len(data))
		}
		if rerr != nil {
			if ctx.Err() != nil {
				return nil, fds, fmt.Errorf("reading VMM handshake: %w", ctx.Err())
			}
			var ne net.Error
			if errors.As(rerr, &ne) && ne.Timeout() && len(data) > 0 {
				return nil, fds, invalidf("handshake is not valid JSON (%d bytes)", len(data))
			}
			return nil, fds, status.Errorf(codes.Unavailable, "reading VMM handshake (%d bytes so far): %v", len(data), rerr)
		}
		// Partial message: the rest must follow promptly.
		if d := time.Now().Add(continuationWait); d.Before(deadline) {
			conn.SetReadDeadline(d)
		}
	}
}

func parseRights(oob []byte) ([]int, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, err
	}
	var fds []int
	for _, m := range msgs {
		if m.Header.Level != unix.SOL_SOCKET || m.Header.Type != unix.SCM_RIGHTS {
			continue
		}
		got, err := unix.ParseUnixRights(&m)
		if err != nil {
			return fds, err
		}
		fds = append(fds, got...)
	}
	return fds, nil
}

// rawMapping distinguishes absent required fields from zeros.
type rawMapping struct {
	BaseHostVirtAddr *uint64 `json:"base_host_virt_addr"`
	Size             *uint64 `json:"size"`
	Offset           *uint64 `json:"offset"`
	PageSize         *uint64 `json:"page_size"`
	PageSizeKiB      *uint64 `json:"page_size_kib"`
}

// parseMappings decodes and validates the handshake's regions against a
// memory of memSize bytes. PageSize is filled in for every returned region.
func parseMappings(data []byte, memSize int64, sysPage uint64) ([]Mapping, error) {
	var raw []rawMapping
	if err := json.Unmarshal(data, &raw); err != nil {
		return nil, invalidf("decoding handshake regions: %v", err)
	}
	if len(raw) == 0 {
		return nil, invalidf("handshake lists no memory regions")
	}
	if len(raw) > maxRegions {
		return nil, invalidf("handshake lists %d regions, more than %d", len(raw), maxRegions)
	}
	out := make([]Mapping, len(raw))
	for i, r := range raw {
		if r.BaseHostVirtAddr == nil || r.Size == nil || r.Offset == nil {
			return nil, invalidf("region %d: missing base_host_virt_addr, size or offset", i)
		}
		m := Mapping{BaseHostVirtAddr: *r.BaseHostVirtAddr, Size: *r.Size, Offset: *r.Offset}
		switch {
		case r.PageSize != nil:
			m.PageSize = *r.PageSize
		case r.PageSizeKiB != nil:
			// Despite its name, VMMs have sent bytes in this field; a
			// value below the base page size can only be KiB.
			m.PageSizeKiB = *r.PageSizeKiB
			m.PageSize = m.PageSizeKiB
			if m.PageSize < sysPage {
				m.PageSize = m.PageSizeKiB << 10
			}
		default:
			m.PageSize = sysPage
		}
		if err := validateMapping(m, memSize, sysPage); err != nil {
			return nil, invalidf("region %d (base %#x, size %d, offset %d): %v", i, m.BaseHostVirtAddr, m.Size, m.Offset, err)
		}
		out[i] = m
	}
	byAddr := append([]Mapping(nil), out...)
	sort.Slice(byAddr, func(i, j int) bool { return byAddr[i].BaseHostVirtAddr < byAddr[j].BaseHostVirtAddr })
	for i := 1; i < len(byAddr); i++ {
		prev, cur := byAddr[i-1], byAddr[i]
		if prev.BaseHostVirtAddr+prev.Size > cur.BaseHostVirtAddr {
			return nil, invalidf("regions at %#x and %#x overlap", prev.BaseHostVirtAddr, cur.BaseHostVirtAddr)
		}
	}
	return out, nil
}

func validateMapping(m Mapping, memSize int64, sysPage uint64) error {
	ps := m.PageSize
	if ps < sysPage || ps > maxPageSize || bits.OnesCount64(ps) != 1 {
		return fmt.Errorf("unsupported page size %d", ps)
	}
	if m.Size == 0 {
		return errors.New("empty region")
	}
	if m.BaseHostVirtAddr%ps != 0 || m.Size%ps != 0 || m.Offset%ps != 0 {
		return fmt.Errorf("base, size and offset must be multiples of the page size %d", ps)
	}
	if m.BaseHostVirtAddr+m.Size < m.BaseHostVirtAddr {
		return errors.New("address range overflows")
	}
	end := m.Offset + m.Size
	if end < m.Offset || memSize < 0 || end > uint64(memSize) {
		return fmt.Errorf("offset %d + size %d lies beyond the memory snapshot's %d bytes", m.Offset, m.Size, memSize)
	}
	return nil
}

// checkChunkPages rejects huge-page regions whose page size does not divide
// the memory snapshot's chunk size: every fault on such a region installs a
// whole huge page, which must lie inside one chunk so that a fetch never
// needs two chunks and a chunk boundary never splits a page.
func checkChunkPages(regions []Mapping, chunk int64, sysPage uint64) error {
	if chunk <= 0 {
		return nil
	}
	for i, m := range regions {
		if m.PageSize > sysPage && uint64(chunk)%m.PageSize != 0 {
			return invalidf("region %d (base %#x, offset %d) has %d-byte pages, which do not divide the memory snapshot's chunk size %d: "+
				"huge-page-backed memory must be saved with a chunk size that is a multiple of %d (save --page-size %d --chunk-size N*%d)",
				i, m.BaseHostVirtAddr, m.Offset, m.PageSize, chunk, m.PageSize, m.PageSize, m.PageSize)
		}
	}
	return nil
}

// checkUffd verifies fd is an initialised userfaultfd and makes it
// non-blocking (required for poll).
func checkUffd(fd int) error {
	link, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(fd))
	if err != nil {
		return invalidf("inspecting received descriptor: %v", err)
	}
	if link != "anon_inode:[userfaultfd]" {
		return invalidf("received descriptor is %q, not a userfaultfd", link)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		return invalidf("setting userfaultfd non-blocking: %v", err)
	}
	p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	if _, err := unix.Poll(p, 0); err != nil {
		return invalidf("polling userfaultfd: %v", err)
	}
	if p[0].Revents&(unix.POLLERR|unix.POLLNVAL) != 0 {
		return invalidf("userfaultfd is not initialised (no UFFDIO_API handshake)")
	}
	return nil
}

// peerProcess identifies the VMM process on conn: its pid and a pidfd.
func peerProcess(conn *net.UnixConn) (pid, pidfd int) {
	pidfd = -1
	rc, err := conn.SyscallConn()
	if err != nil {
		return 0, -1
	}
	rc.Control(func(fd uintptr) {
		if cred, err := unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED); err == nil {
			pid = int(cred.Pid)
		}
		if pfd, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PEERPIDFD); err == nil && pfd >= 0 {
			unix.CloseOnExec(pfd)
			pidfd = pfd
		}
	})
	if pidfd < 0 && pid > 0 {
		if pfd, err := unix.PidfdOpen(pid, 0); err == nil {
			pidfd = pfd
		}
	}
	return pid, pidfd
}

// handshake reads and validates the VMM's handshake. On error every
// received descriptor is closed.
func (s *Server) handshake(ctx context.Context, conn *net.UnixConn) (*peer, error) {
	data, fds, err := readHandshake(ctx, conn, s.opts.HandshakeTimeout)
	if err != nil {
		return nil, err
	}
	closeAll := func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}
	regions, err := parseMappings(data, s.mem.Size(), uint64(os.Getpagesize()))
	if err == nil {
		err = checkChunkPages(regions, s.opts.ChunkSize, uint64(os.Getpagesize()))
	}
	if err != nil {
		closeAll()
		return nil, err
	}
	if len(fds) != 1 {
		closeAll()
		return nil, invalidf("handshake carried %d file descriptors, want exactly one userfaultfd", len(fds))
	}
	if err := checkUffd(fds[0]); err != nil {
		closeAll()
		return nil, err
	}
	p := &peer{uffd: fds[0], regions: regions}
	p.pid, p.pidfd = peerProcess(conn)
	return p, nil
}
