package snapshot_test

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

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

// randomFile writes n random bytes to a new file.
func randomFile(t *testing.T, n int, seed uint64) (string, []byte) {
	t.Helper()
	b := make([]byte, n)
	var s [32]byte
	s[0] = byte(seed)
	rand.NewChaCha8(s).Read(b)
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

// blobCap makes the server refuse ByteStream uploads of blobs larger than
// max, without saying so in its capabilities, as some caches do.
type blobCap struct {
	max     int64
	refused atomic.Int32
}

func (f *blobCap) intercept(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if info.FullMethod != "/google.bytestream.ByteStream/Write" {
		return handler(srv, ss)
	}
	first := &bspb.WriteRequest{}
	if err := ss.RecvMsg(first); err != nil {
		return err
	}
	name := first.GetResourceName()
	size, err := strconv.ParseInt(name[strings.LastIndexByte(name, '/')+1:], 10, 64)
	if err != nil {
		return status.Errorf(codes.InvalidArgument, "resource name %q", name)
	}
	if size > f.max {
		f.refused.Add(1)
		return status.Errorf(codes.InvalidArgument, "Blob is %d bytes in size, while this backend is only capable of storing blobs of up to %d bytes", size, f.max)
	}
	return handler(srv, &replayFirst{ServerStream: ss, first: first})
}

// replayFirst gives the handler the message the interceptor read first.
type replayFirst struct {
	grpc.ServerStream
	first *bspb.WriteRequest
}

func (s *replayFirst) RecvMsg(m any) error {
	if s.first != nil {
		proto.Merge(m.(proto.Message), s.first)
		s.first = nil
		return nil
	}
	return s.ServerStream.RecvMsg(m)
}

// An artifact file larger than a blob size limit the remote does not
// state is refused once, then stored as chunks (and every larger one
// without trying), and restored as the same file, encrypted or not.
func TestArtifactRefusedForSizeIsStoredAsChunks(t *testing.T) {
	ctx := context.Background()
	for _, encrypt := range []bool{false, true} {
		t.Run(fmt.Sprintf("encrypted=%v", encrypt), func(t *testing.T) {
			var ring *encrypted.Keyring
			if encrypt {
				key, err := encrypted.NewKey(time.Now())
				if err != nil {
					t.Fatal(err)
				}
				if ring, err = encrypted.NewKeyring(key); err != nil {
					t.Fatal(err)
				}
			}
			capped := &blobCap{max: 1 << 20}
			p := newThirdParty(t, ring, grpc.ChainStreamInterceptor(capped.intercept))
			want := map[string][]byte{}
			paths := map[string]string{}
			for i, f := range []struct {
				name string
				size int
			}{{"vmstate", 10 << 10}, {"rootfs", 2 << 20}, {"kernel", 3 << 20}, {"mem", 1 << 20}} {
				paths[f.name], want[f.name] = randomFile(t, f.size, uint64(40+i))
			}
			l := p.host(openCache(t, t.TempDir()))
			keys, err := l.KeySet(ctx, thirdPartyTask, snapshot.KeySetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			res, err := l.CacheSnapshot(ctx, &snapshot.SaveRequest{Key: keys.GetWriteKey(),
				Files:        map[string]string{"vmstate": paths["vmstate"], "rootfs": paths["rootfs"], "kernel": paths["kernel"]},
				ChunkedFiles: []snapshot.NamedFile{{Name: "mem", Path: paths["mem"]}}, ChunkSize: 256 << 10, Local: true, Remote: true})
			if err != nil {
				t.Fatal(err)
			}
			if !res.PublishedRemote || !slices.Equal(res.ArtifactsAsChunks, []string{"rootfs", "kernel"}) {
				t.Errorf("published %v, artifacts as chunks %q; want published, rootfs and kernel", res.PublishedRemote, res.ArtifactsAsChunks)
			}
			if n := capped.refused.Load(); n != 1 {
				t.Errorf("the remote refused %d uploads; want 1 (then the learned limit is kept)", n)
			}
			got := p.restoreFiles(t)
			for name, b := range want {
				if !bytes.Equal(got[name], b) {
					t.Errorf("file %q restored with %d bytes, other than the %d saved", name, len(got[name]), len(b))
				}
			}
		})
	}
}
