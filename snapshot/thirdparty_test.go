package snapshot_test

import (
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/encrypted"
	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/internal/testserve"
	"github.com/snaploader/snaploader/remote"
	"github.com/snaploader/snaploader/server"
	"github.com/snaploader/snaploader/snapshot"
)

// thirdParty is a real server, made to behave like another cache by
// interceptors, and the hosts that use it.
type thirdParty struct {
	t    *testing.T
	addr string
	keys *encrypted.Keyring // hosts encrypt when set
}

func newThirdParty(t *testing.T, keys *encrypted.Keyring, extra ...grpc.ServerOption) *thirdParty {
	t.Helper()
	backend := openCache(t, t.TempDir())
	addr := testserve.Serve(t, backend, server.Options{TempDir: backend.TempDir()}, extra...)
	return &thirdParty{t: t, addr: addr, keys: keys}
}

func openCache(t *testing.T, dir string) *localcache.Cache {
	t.Helper()
	lc, err := localcache.New(dir, localcache.Options{MaxBytes: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lc.Close() })
	return lc
}

// host is a new process on a host whose cache is local: its own
// connection and, with keys, its own encrypted tier.
func (p *thirdParty) host(local *localcache.Cache) *snapshot.Loader {
	p.t.Helper()
	c, err := remote.Dial(context.Background(), "grpc://"+p.addr, remote.Options{RetryBackoff: time.Millisecond})
	if err != nil {
		p.t.Fatal(err)
	}
	p.t.Cleanup(func() { c.Close() })
	var tier cache.Tier = c
	if p.keys != nil {
		if tier, err = encrypted.New(c, encrypted.Options{Keys: p.keys, TempDir: p.t.TempDir()}); err != nil {
			p.t.Fatal(err)
		}
	}
	l, err := snapshot.New(local, tier, snapshot.Options{Function: c.DigestFunction()})
	if err != nil {
		p.t.Fatal(err)
	}
	return l
}

var thirdPartyTask = snapshot.Task{InstanceName: "ci", PlatformHash: "p", ConfigurationHash: "c"}

// randomFile writes n random bytes (no zero page) to a new file.
func randomFile(t *testing.T, n int, seed uint64) (string, []byte) {
	t.Helper()
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(seed, 2))
	for i := range b {
		b[i] = byte(r.Uint32()) | 1
	}
	p := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p, b
}

// restoreFiles restores the snapshot of the task on a new host and returns
// its files' bytes.
func (p *thirdParty) restoreFiles(t *testing.T) map[string][]byte {
	t.Helper()
	ctx := context.Background()
	l := p.host(openCache(t, t.TempDir()))
	keys, err := l.KeySet(ctx, thirdPartyTask, snapshot.KeySetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	snap, err := l.GetSnapshot(ctx, keys, snapshot.GetOptions{ReadPolicy: snapshot.LocalFirst})
	if err != nil {
		t.Fatal(err)
	}
	res, err := l.Restore(ctx, snap, t.TempDir(), snapshot.RestoreOptions{})
	if err != nil {
		t.Fatal(err)
	}
	out := map[string][]byte{}
	for name, path := range res.Files {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		out[name] = b
	}
	return out
}

// An encrypted incremental save in a new process reports the chunks it
// uploaded, not those it sealed: the encrypted tier cannot tell which
// ciphertexts the remote holds before sealing them.
func TestEncryptedIncrementalSaveCountsUploads(t *testing.T) {
	ctx := context.Background()
	key, err := encrypted.NewKey(time.Now())
	if err != nil {
		t.Fatal(err)
	}
	ring, err := encrypted.NewKeyring(key)
	if err != nil {
		t.Fatal(err)
	}
	p := newThirdParty(t, ring)
	local := openCache(t, t.TempDir())
	const chunk, chunks = 64 << 10, 11
	mem, data := randomFile(t, chunks*chunk, 31)
	save := func() *snapshot.SaveResult {
		t.Helper()
		l := p.host(local)
		keys, err := l.KeySet(ctx, thirdPartyTask, snapshot.KeySetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		res, err := l.CacheSnapshot(ctx, &snapshot.SaveRequest{Key: keys.GetWriteKey(), ChunkedFiles: []snapshot.NamedFile{{Name: "mem", Path: mem}},
			ChunkSize: chunk, Local: true, Remote: true})
		if err != nil {
			t.Fatal(err)
		}
		return res
	}
	if got := save().Totals().RemoteChunksWritten; got != chunks {
		t.Fatalf("first save uploaded %d chunks, want %d", got, chunks)
	}
	for _, c := range []int{2, 7} {
		data[c*chunk+100] ^= 0xff
	}
	if err := os.WriteFile(mem, data, 0o644); err != nil {
		t.Fatal(err)
	}
	tot := save().Totals()
	if tot.RemoteChunksWritten != 2 || tot.RemoteBytesWritten != 2*chunk {
		t.Errorf("incremental save reports %d chunks (%d bytes) uploaded; it changed 2 (%d bytes)", tot.RemoteChunksWritten, tot.RemoteBytesWritten, 2*chunk)
	}
	if got := p.restoreFiles(t)["mem"]; !bytes.Equal(got, data) {
		t.Error("the incremental snapshot restores other bytes")
	}
}
