// Package uffdio holds the Linux userfaultfd kernel ABI (structs, ioctl
// numbers, event and feature constants) that golang.org/x/sys/unix lacks,
// plus thin wrappers around the ioctls.
package uffdio

import (
	"encoding/binary"
	"unsafe"

	"golang.org/x/sys/unix"
)

// API is the userfaultfd API version passed in UFFDIO_API.
const API = 0xAA

// Ioctl request numbers (x86-64 / arm64 encoding).
const (
	IoctlAPI        = 0xc018aa3f // _IOWR(0xAA, 0x3F, struct uffdio_api)
	IoctlRegister   = 0xc020aa00 // _IOWR(0xAA, 0x00, struct uffdio_register)
	IoctlUnregister = 0x8010aa01 // _IOR(0xAA, 0x01, struct uffdio_range)
	IoctlWake       = 0x8010aa02 // _IOR(0xAA, 0x02, struct uffdio_range)
	IoctlCopy       = 0xc028aa03 // _IOWR(0xAA, 0x03, struct uffdio_copy)
	IoctlZeropage   = 0xc020aa04 // _IOWR(0xAA, 0x04, struct uffdio_zeropage)
	IoctlNew        = 0xaa00     // USERFAULTFD_IOC_NEW on /dev/userfaultfd
)

// Event types in uffd_msg.event.
const (
	EventPagefault = 0x12
	EventFork      = 0x13
	EventRemap     = 0x14
	EventRemove    = 0x15
	EventUnmap     = 0x16
)

// Feature bits for uffdio_api.features.
const (
	FeaturePagefaultFlagWP = 1 << 0
	FeatureEventFork       = 1 << 1
	FeatureEventRemap      = 1 << 2
	FeatureEventRemove     = 1 << 3
	FeatureMissingHugetlbf = 1 << 4
	FeatureMissingShmem    = 1 << 5
	FeatureEventUnmap      = 1 << 6
	FeatureSigbus          = 1 << 7
	FeatureThreadID        = 1 << 8
)

// Register modes, copy modes and page-fault flags.
const (
	RegisterModeMissing  = 1 << 0
	RegisterModeWP       = 1 << 1
	CopyModeDontwake     = 1 << 0
	ZeropageModeDontwake = 1 << 0
	PagefaultFlagWrite   = 1 << 0
	PagefaultFlagWP      = 1 << 1
)

// MsgSize is sizeof(struct uffd_msg).
const MsgSize = 32

// APIArg is struct uffdio_api.
type APIArg struct {
	API      uint64
	Features uint64
	Ioctls   uint64
}

// Range is struct uffdio_range.
type Range struct {
	Start uint64
	Len   uint64
}

// RegisterArg is struct uffdio_register.
type RegisterArg struct {
	Range  Range
	Mode   uint64
	Ioctls uint64
}

// CopyArg is struct uffdio_copy.
type CopyArg struct {
	Dst  uint64
	Src  uint64
	Len  uint64
	Mode uint64
	Copy int64
}

// ZeropageArg is struct uffdio_zeropage.
type ZeropageArg struct {
	Range    Range
	Mode     uint64
	Zeropage int64
}

// Compile-time size checks against the kernel ABI.
var (
	_ [24]byte = [unsafe.Sizeof(APIArg{})]byte{}
	_ [16]byte = [unsafe.Sizeof(Range{})]byte{}
	_ [32]byte = [unsafe.Sizeof(RegisterArg{})]byte{}
	_ [40]byte = [unsafe.Sizeof(CopyArg{})]byte{}
	_ [32]byte = [unsafe.Sizeof(ZeropageArg{})]byte{}
)

// Msg is a decoded struct uffd_msg. For EventPagefault, Flags and Address
// are set; for EventRemove and EventUnmap, Start and End.
type Msg struct {
	Event   uint8
	Flags   uint64
	Address uint64
	Start   uint64
	End     uint64
}

// ParseMsg decodes one 32-byte uffd_msg (host byte order; all supported
// architectures are little-endian).
func ParseMsg(b []byte) Msg {
	m := Msg{Event: b[0]}
	a := binary.LittleEndian.Uint64(b[8:16])
	c := binary.LittleEndian.Uint64(b[16:24])
	switch m.Event {
	case EventPagefault:
		m.Flags, m.Address = a, c
	case EventRemove, EventUnmap:
		m.Start, m.End = a, c
	}
	return m
}

func ioctl(fd int, req uintptr, arg unsafe.Pointer) error {
	_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(arg))
	if e != 0 {
		return e
	}
	return nil
}

// New creates a userfaultfd with the given open flags (e.g.
// unix.O_CLOEXEC|unix.O_NONBLOCK) through the userfaultfd system call.
func New(flags int) (int, error) {
	fd, _, e := unix.Syscall(unix.SYS_USERFAULTFD, uintptr(flags), 0, 0)
	if e != 0 {
		return -1, e
	}
	return int(fd), nil
}

// Handshake performs UFFDIO_API requesting features and returns the
// features and ioctls the kernel reports.
func Handshake(fd int, features uint64) (APIArg, error) {
	a := APIArg{API: API, Features: features}
	err := ioctl(fd, IoctlAPI, unsafe.Pointer(&a))
	return a, err
}

// Register registers [start, start+length) with the given mode.
func Register(fd int, start, length, mode uint64) (RegisterArg, error) {
	r := RegisterArg{Range: Range{Start: start, Len: length}, Mode: mode}
	err := ioctl(fd, IoctlRegister, unsafe.Pointer(&r))
	return r, err
}

// Copy performs UFFDIO_COPY of length bytes from src to dst. It returns the
// number of bytes copied (which may be less than length on error).
func Copy(fd int, dst uint64, src unsafe.Pointer, length uint64, mode uint64) (int64, error) {
	c := CopyArg{Dst: dst, Src: uint64(uintptr(src)), Len: length, Mode: mode}
	err := ioctl(fd, IoctlCopy, unsafe.Pointer(&c))
	if c.Copy < 0 {
		return 0, err
	}
	return c.Copy, err
}

// Zeropage performs UFFDIO_ZEROPAGE on [start, start+length). It returns
// the number of bytes mapped (which may be less than length on error).
func Zeropage(fd int, start, length uint64, mode uint64) (int64, error) {
	z := ZeropageArg{Range: Range{Start: start, Len: length}, Mode: mode}
	err := ioctl(fd, IoctlZeropage, unsafe.Pointer(&z))
	if z.Zeropage < 0 {
		return 0, err
	}
	return z.Zeropage, err
}

// Wake wakes threads waiting on faults in [start, start+length).
func Wake(fd int, start, length uint64) error {
	r := Range{Start: start, Len: length}
	return ioctl(fd, IoctlWake, unsafe.Pointer(&r))
}
