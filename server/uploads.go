package server

import (
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"golang.org/x/sys/unix"

	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/internal/fileio"
)

type uploadKey struct{ group, name string }

// upload is a ByteStream upload's file in the scratch directory. Its disk
// space is reserved from creation until it is stored, deleted or expires:
// the claimed size while a Write call uses it, the bytes it holds while it
// is parked.
type upload struct {
	key    uploadKey
	mu     sync.Mutex // held by the Write call using it
	path   string
	f      *os.File // open while a Write call uses it
	space  space
	size   int64            // bytes received; under mu
	seen   atomic.Int64     // size, for QueryWriteStatus without waiting for mu
	v      *digest.Verifier // hashes the first hashed bytes; nil once invalid
	hashed int64
	timer  *time.Timer // expiry while parked
	stored bool        // the backend took the file
	gone   atomic.Bool
	werr   error // a failure writing compressed bytes to f
}

func (u *upload) write(b []byte) error {
	if err := fileio.WriteSparse(u.f, b, u.size); err != nil {
		return err
	}
	if u.v != nil && u.hashed == u.size {
		u.v.Write(b)
		u.hashed += int64(len(b))
	}
	u.size += int64(len(b))
	u.seen.Store(u.size)
	return nil
}

func (u *upload) truncate(n int64) error {
	if err := u.f.Truncate(n); err != nil {
		return err
	}
	if n < u.hashed {
		u.v = nil
	}
	u.size = n
	u.seen.Store(n)
	return nil
}

// uploads holds uploads in flight and interrupted ones, which a client
// may resume until they expire.
type uploads struct {
	dir string
	ttl time.Duration
	log *slog.Logger
	mu  sync.Mutex
	m   map[uploadKey]*upload
}

const uploadPrefix = "upload-"

func newUploads(dir string, ttl time.Duration, log *slog.Logger) *uploads {
	return &uploads{dir: dir, ttl: ttl, log: log, m: map[uploadKey]*upload{}}
}

// cleanStale removes upload files that no live server holds (left by a
// server that was killed): a server holds a lock on each file it writes.
func (us *uploads) cleanStale() {
	ents, _ := os.ReadDir(us.dir)
	for _, de := range ents {
		if !strings.HasPrefix(de.Name(), uploadPrefix) || !de.Type().IsRegular() {
			continue
		}
		p := filepath.Join(us.dir, de.Name())
		f, err := os.Open(p)
		if err != nil {
			continue
		}
		if unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB) == nil {
			os.Remove(p)
		}
		f.Close()
	}
}

// get returns the upload for key, locked, creating it (with the disk space
// reserve promises) when there is none.
func (us *uploads) get(key uploadKey, fn digest.Function, d *repb.Digest, reserve func() (space, error)) (*upload, error) {
	for {
		us.mu.Lock()
		u := us.m[key]
		if u == nil {
			sp, err := reserve()
			if err != nil {
				us.mu.Unlock()
				return nil, err
			}
			f, err := os.CreateTemp(us.dir, uploadPrefix+"*")
			if err != nil {
				us.mu.Unlock()
				sp.Release()
				us.log.Error("creating an upload file", "err", err)
				return nil, scratchErr(err, "creating an upload file")
			}
			unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
			u = &upload{key: key, path: f.Name(), f: f, space: sp}
			u.v, _ = digest.NewVerifier(fn, d)
			u.mu.Lock()
			us.m[key] = u
			us.mu.Unlock()
			return u, nil
		}
		us.mu.Unlock()
		u.mu.Lock()
		if u.gone.Load() {
			u.mu.Unlock()
			continue
		}
		if u.timer != nil {
			u.timer.Stop()
			u.timer = nil
		}
		if u.f == nil {
			// Parked, it held only the space its bytes take: reserve the
			// whole claim again.
			if err := u.space.Resize(d.SizeBytes); err != nil {
				us.park(u)
				u.mu.Unlock()
				return nil, err
			}
			f, err := os.OpenFile(u.path, os.O_RDWR, 0)
			if err != nil {
				us.drop(u)
				u.mu.Unlock()
				us.log.Error("reopening an upload file", "err", err)
				return nil, scratchErr(err, "reopening an interrupted upload")
			}
			unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
			u.f = f
		}
		return u, nil
	}
}

// release ends a Write call's use of u (whose lock it holds): a partial
// upload worth resuming is parked (its file closed) until it expires;
// anything else is deleted at once.
func (us *uploads) release(u *upload, keep bool) {
	defer u.mu.Unlock()
	if !keep || u.stored {
		us.drop(u)
		return
	}
	u.f.Close()
	u.f = nil
	// A parked upload takes no more disk than the bytes it holds.
	u.space.Resize(u.size)
	us.park(u)
}

// park (re)starts the expiry of a parked upload, whose lock the caller
// holds.
func (us *uploads) park(u *upload) {
	u.timer = time.AfterFunc(us.ttl, func() { us.expire(u) })
}

// drop deletes u (whose lock the caller holds) and frees its space.
func (us *uploads) drop(u *upload) {
	us.mu.Lock()
	if us.m[u.key] == u {
		delete(us.m, u.key)
	}
	us.mu.Unlock()
	u.gone.Store(true)
	if u.timer != nil {
		u.timer.Stop()
	}
	if u.f != nil {
		u.f.Close()
		u.f = nil
	}
	if !u.stored {
		os.Remove(u.path)
	}
	u.space.Release()
}

// expire deletes a parked upload unless a Write call resumed it meanwhile.
func (us *uploads) expire(u *upload) {
	if !u.mu.TryLock() {
		return // in use: parked again with a fresh timer when released
	}
	defer u.mu.Unlock()
	if !u.gone.Load() && u.f == nil {
		us.drop(u)
	}
}

func (us *uploads) committed(key uploadKey) (int64, bool) {
	us.mu.Lock()
	u := us.m[key]
	us.mu.Unlock()
	if u == nil {
		return 0, false
	}
	return u.seen.Load(), !u.gone.Load()
}

// pending is the number of uploads held (in flight or parked).
func (us *uploads) pending() int {
	us.mu.Lock()
	defer us.mu.Unlock()
	return len(us.m)
}

// closeAll deletes the uploads no Write call is using.
func (us *uploads) closeAll() {
	us.mu.Lock()
	all := make([]*upload, 0, len(us.m))
	for _, u := range us.m {
		all = append(all, u)
	}
	us.mu.Unlock()
	for _, u := range all {
		if u.mu.TryLock() {
			if !u.gone.Load() {
				us.drop(u)
			}
			u.mu.Unlock()
		}
	}
}
