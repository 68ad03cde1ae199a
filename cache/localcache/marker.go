package localcache

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// verifiedAttr is the extended attribute of a blob file whose content a
// process of this boot verified against the digest its name gives: the
// boot id and the file's name.
//
// Blob files are immutable and appear only by rename of verified content,
// so within one boot such a file still holds what was verified (a process
// that writes into a cache file in place is outside the contract, as it is
// for any content-addressed store; one that truncates or extends it is
// caught by the size check). What verification guards against
// across processes is a crash: nothing is fsynced, so a file renamed just
// before a power loss may come back torn. A crash starts a new boot, whose
// id no marker carries, so every blob written before it is verified again
// on first use (and marked again). A marker thus lets a new process, like
// each CLI restore, read blobs at the speed of the disk instead of hashing
// each one first.
//
// The value is short (a truncated hash of the boot id and the name) so that
// it fits in the inode: an attribute that needed a block of its own would
// double the disk usage of small blobs.
const verifiedAttr = "user.snaploader.v"

// markerValue is the marker of the entry rel for this boot ("" if the boot
// is unknown).
func (c *Cache) markerValue(rel string) string {
	if c.opts.BootID == "" || !strings.HasPrefix(rel, casDir+"/") {
		return ""
	}
	h := sha256.Sum256([]byte(c.opts.BootID + " " + path.Base(rel)))
	return hex.EncodeToString(h[:12])
}

// markVerified records that the content of the entry rel (open as f, or
// at its path when f is nil) was verified in this boot. It is best effort:
// a filesystem without user extended attributes only costs re-hashing.
func (c *Cache) markVerified(f *os.File, rel string) {
	v := c.markerValue(rel)
	if v == "" {
		return
	}
	if f != nil {
		unix.Fsetxattr(int(f.Fd()), verifiedAttr, []byte(v), 0)
		return
	}
	unix.Setxattr(filepath.Join(c.dir, rel), verifiedAttr, []byte(v), 0)
}

// markedVerified reports whether the open entry file f carries this boot's
// marker for rel and still has the size of the raw blob its name gives (a
// compressed blob is verified as it is decoded).
func (c *Cache) markedVerified(f *os.File, rel string) bool {
	v := c.markerValue(rel)
	if v == "" {
		return false
	}
	_, size, _ := strings.Cut(path.Base(rel), "-")
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil || strconv.FormatInt(st.Size, 10) != size {
		return false
	}
	buf := make([]byte, len(v)+1)
	n, err := unix.Fgetxattr(int(f.Fd()), verifiedAttr, buf)
	return err == nil && string(buf[:n]) == v
}
