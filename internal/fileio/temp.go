package fileio

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// TempPrefix starts the name of every temporary file CreateTemp makes. A
// name with this prefix in a directory snaploader writes into is either a
// temporary file some live process holds locked, or one a killed process
// left behind, which RemoveStaleTemps removes.
const TempPrefix = ".snaploader-tmp-"

// TempNameLen is the length in bytes of every name CreateTemp makes: the
// prefix and 16 hex digits. It does not depend on the name of the file
// being written, so a temporary file fits NAME_MAX whatever that name is.
const TempNameLen = len(TempPrefix) + 16

// CreateTemp creates a new temporary file in dir, mode 0600, holding an
// exclusive flock on it for as long as the returned file stays open (the
// lock follows the file through a rename). While it is held,
// RemoveStaleTemps in any process leaves the file alone; once the process
// dies the lock is gone and the file is stale.
func CreateTemp(dir string) (*os.File, error) {
	for range 16 {
		var r [8]byte
		rand.Read(r[:])
		path := filepath.Join(dir, TempPrefix+hex.EncodeToString(r[:]))
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL|unix.O_NOFOLLOW, 0o600)
		if errors.Is(err, os.ErrExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("creating a temporary file in %s: %w", dir, err)
		}
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
			f.Close()
			os.Remove(path)
			return nil, fmt.Errorf("locking temporary file %s: %w", path, err)
		}
		// Between the create and the lock another process's
		// RemoveStaleTemps may have taken the lock and removed the name:
		// keep the file only if its name still leads to it.
		if same, err := namesFile(path, f); err != nil || !same {
			f.Close()
			continue
		}
		return f, nil
	}
	return nil, fmt.Errorf("creating a temporary file in %s: no free name after 16 attempts", dir)
}

// IsTempName reports whether name (a base name) has the form CreateTemp
// gives its files.
func IsTempName(name string) bool {
	if len(name) != TempNameLen || !strings.HasPrefix(name, TempPrefix) {
		return false
	}
	_, err := hex.DecodeString(name[len(TempPrefix):])
	return err == nil
}

// RemoveStaleTemps removes the temporary files in dir that CreateTemp made
// and no live process holds: each one whose lock can be taken without
// waiting. Files another process still writes, names in keep (which may be
// nil), files of any other name, and anything that is not a regular file
// are left alone. It returns the paths removed; a missing dir is not an
// error.
func RemoveStaleTemps(dir string, keep map[string]bool) ([]string, error) {
	ents, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("listing %s for stale temporary files: %w", dir, err)
	}
	var removed []string
	var errs []error
	for _, de := range ents {
		if !IsTempName(de.Name()) || !de.Type().IsRegular() || keep[de.Name()] {
			continue
		}
		path := filepath.Join(dir, de.Name())
		ok, err := removeIfStale(path)
		if err != nil {
			errs = append(errs, err)
		}
		if ok {
			removed = append(removed, path)
		}
	}
	return removed, errors.Join(errs...)
}

func removeIfStale(path string) (bool, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC|unix.O_NOCTTY, 0)
	if errors.Is(err, unix.ENOENT) {
		return false, nil // renamed into place or removed meanwhile
	}
	if err != nil {
		return false, fmt.Errorf("opening temporary file %s: %w", path, err)
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close()
	fi, err := f.Stat()
	if err != nil || !fi.Mode().IsRegular() {
		return false, err
	}
	if err := unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB); err != nil {
		if errors.Is(err, unix.EWOULDBLOCK) {
			return false, nil // a live process is writing it
		}
		return false, fmt.Errorf("locking temporary file %s: %w", path, err)
	}
	// The name might have been replaced since it was opened.
	if same, err := namesFile(path, f); err != nil || !same {
		return false, nil
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return false, fmt.Errorf("removing stale temporary file %s: %w", path, err)
	}
	return true, nil
}

// namesFile reports whether path (not following a final symlink) is the
// file f has open.
func namesFile(path string, f *os.File) (bool, error) {
	var a, b unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &a); err != nil {
		return false, err
	}
	if err := unix.Lstat(path, &b); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return false, nil
		}
		return false, err
	}
	return a.Dev == b.Dev && a.Ino == b.Ino, nil
}

// UserEntries lists the names in dir, sorted, leaving out the temporary
// files CreateTemp makes (snaploader's own, whether a live process writes
// them or a killed one left them): what someone else put there. A missing
// dir has none.
func UserEntries(dir string) ([]string, error) {
	ents, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("listing %s: %w", dir, err)
	}
	var names []string
	for _, de := range ents {
		if IsTempName(de.Name()) && de.Type().IsRegular() {
			continue
		}
		names = append(names, de.Name())
	}
	return names, nil
}

// NameList formats names for a message: the first max of them quoted,
// then how many more there are.
func NameList(names []string, max int) string {
	var b strings.Builder
	for i, n := range names {
		if i == max {
			fmt.Fprintf(&b, " and %d more", len(names)-max)
			break
		}
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprintf(&b, "%q", n)
	}
	return b.String()
}
