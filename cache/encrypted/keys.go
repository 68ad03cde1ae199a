package encrypted

import (
	"bufio"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/internal/fileio"
)

// keyLine starts every key line of a key file:
//
//	snaploader-key-v1 <key id> <base64 of 32 bytes> <created, RFC 3339>
//
// Lines starting with # and blank lines are ignored. The last key is the
// newest: new saves seal with it; every key opens what it sealed.
const keyLine = "snaploader-key-v1"

// Key is one group key.
type Key struct {
	// ID names the key in everything it seals; it reveals nothing of the
	// key.
	ID      string
	Secret  [32]byte
	Created time.Time
}

// Keyring is a group's keys, oldest first.
type Keyring struct {
	keys []Key
}

// NewKey makes a fresh random key.
func NewKey(now time.Time) (Key, error) {
	var k Key
	var id [8]byte
	if _, err := rand.Read(id[:]); err != nil {
		return k, fmt.Errorf("making a key id: %w", err)
	}
	if _, err := rand.Read(k.Secret[:]); err != nil {
		return k, fmt.Errorf("making a key: %w", err)
	}
	k.ID = hex.EncodeToString(id[:])
	k.Created = now.UTC().Truncate(time.Second)
	return k, nil
}

// NewKeyring holds keys, oldest first; it needs at least one.
func NewKeyring(keys ...Key) (*Keyring, error) {
	if len(keys) == 0 {
		return nil, status.Error(codes.InvalidArgument, "a keyring needs at least one key")
	}
	seen := map[string]bool{}
	for _, k := range keys {
		if !validID(k.ID) {
			return nil, status.Errorf(codes.InvalidArgument, "key id %q: want 1 to 64 characters of [0-9a-z]", k.ID)
		}
		if seen[k.ID] {
			return nil, status.Errorf(codes.InvalidArgument, "key id %s appears twice", k.ID)
		}
		seen[k.ID] = true
	}
	return &Keyring{keys: append([]Key(nil), keys...)}, nil
}

func validID(id string) bool {
	if id == "" || len(id) > 64 {
		return false
	}
	for _, c := range id {
		if (c < '0' || c > '9') && (c < 'a' || c > 'z') {
			return false
		}
	}
	return true
}

// Current is the newest key: what new saves seal with.
func (r *Keyring) Current() Key { return r.keys[len(r.keys)-1] }

// Get returns the key with id.
func (r *Keyring) Get(id string) (Key, bool) {
	for _, k := range r.keys {
		if k.ID == id {
			return k, true
		}
	}
	return Key{}, false
}

// Keys lists the keys, oldest first.
func (r *Keyring) Keys() []Key { return append([]Key(nil), r.keys...) }

// ReadKeyFile loads a key file. It refuses a file that its group or other
// users may read (a key must be mode 0600 or stricter) and anything that
// is not a regular file.
func ReadKeyFile(path string) (*Keyring, error) {
	// Never blocks: a FIFO or device is refused, not opened for reading.
	f, err := fileio.OpenRegular(path)
	if err != nil {
		return nil, fmt.Errorf("reading key file: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "reading key file %s: %v", path, err)
	}
	if !fi.Mode().IsRegular() {
		return nil, status.Errorf(codes.InvalidArgument, "key file %s is not a regular file", path)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, status.Errorf(codes.InvalidArgument, "key file %s has mode %04o: its group or other users can read it; chmod 600 it", path, fi.Mode().Perm())
	}
	var keys []Key
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, err := parseKeyLine(line)
		if err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "key file %s, line %d: %v", path, n, err)
		}
		keys = append(keys, k)
	}
	if err := sc.Err(); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "reading key file %s: %v", path, err)
	}
	if len(keys) == 0 {
		return nil, status.Errorf(codes.InvalidArgument, "key file %s holds no key", path)
	}
	r, err := NewKeyring(keys...)
	if err != nil {
		return nil, fmt.Errorf("key file %s: %w", path, err)
	}
	return r, nil
}

func parseKeyLine(line string) (Key, error) {
	var k Key
	f := strings.Fields(line)
	if len(f) != 4 || f[0] != keyLine {
		return k, fmt.Errorf("want %q, a key id, a base64 key and a creation time", keyLine)
	}
	k.ID = f[1]
	if !validID(k.ID) {
		return k, fmt.Errorf("key id %q: want 1 to 64 characters of [0-9a-z]", k.ID)
	}
	b, err := base64.StdEncoding.DecodeString(f[2])
	if err != nil || len(b) != len(k.Secret) {
		return k, fmt.Errorf("key %s: want the base64 of %d bytes", k.ID, len(k.Secret))
	}
	copy(k.Secret[:], b)
	if k.Created, err = time.Parse(time.RFC3339, f[3]); err != nil {
		return k, fmt.Errorf("key %s: creation time: %v", k.ID, err)
	}
	return k, nil
}

// FormatKey is a key's line in a key file.
func FormatKey(k Key) string {
	return fmt.Sprintf("%s %s %s %s\n", keyLine, k.ID, base64.StdEncoding.EncodeToString(k.Secret[:]), k.Created.UTC().Format(time.RFC3339))
}

// WriteKeyFile writes keys to path with mode 0600, atomically (a
// temporary file renamed into place), refusing to replace a file that is
// not a regular file.
func WriteKeyFile(path string, r *Keyring) error {
	if fi, err := os.Lstat(path); err == nil && !fi.Mode().IsRegular() {
		return status.Errorf(codes.InvalidArgument, "key file %s is not a regular file", path)
	}
	var b strings.Builder
	b.WriteString("# snaploader group keys, oldest first; the last one seals new snapshots.\n")
	for _, k := range r.keys {
		b.WriteString(FormatKey(k))
	}
	tmp := path + ".new"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|os.O_EXCL, 0o600)
	if err != nil {
		return status.Errorf(codes.InvalidArgument, "writing key file: %v", err)
	}
	if _, err := f.WriteString(b.String()); err != nil {
		f.Close()
		os.Remove(tmp)
		return status.Errorf(codes.Internal, "writing key file %s: %v", tmp, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		os.Remove(tmp)
		return status.Errorf(codes.Internal, "writing key file %s: %v", tmp, err)
	}
	f.Close()
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return status.Errorf(codes.Internal, "writing key file %s: %v", path, err)
	}
	return nil
}
