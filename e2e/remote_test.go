package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/cow"
	"github.com/snaploader/snaploader/internal/cachecount"
	"github.com/snaploader/snaploader/internal/testutil"
	"github.com/snaploader/snaploader/proto/snapshotpb"
	"github.com/snaploader/snaploader/remote"
	"github.com/snaploader/snaploader/snapshot"
)

const chunk = 64 << 10

var task = snapshot.Task{InstanceName: "fleet", PlatformHash: "plat", ConfigurationHash: "conf",
	Env: map[string]string{snapshot.EnvBranch: "main", snapshot.EnvDefaultBranch: "main"}}

// host is one machine: its own cache directory and a remote tier.
type host struct {
	local  *localcache.Cache
	remote *cachecount.Counting
	loader *snapshot.Loader
}

func newHost(t *testing.T, rc cache.Tier) *host {
	t.Helper()
	lc, err := localcache.New(t.TempDir(), localcache.Options{MaxBytes: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lc.Close() })
	h := &host{local: lc, remote: cachecount.NewCounting(rc)}
	if h.loader, err = snapshot.New(lc, h.remote, snapshot.Options{}); err != nil {
		t.Fatal(err)
	}
	return h
}

func dial(t testing.TB, url string) *remote.Client {
	t.Helper()
	c, err := remote.Dial(ctxT(t), url, remote.Options{MaxRetries: 1, DisableCompression: os.Getenv("SNAPLOADER_ZSTD") == ""})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func (h *host) keys(t *testing.T) *snapshotpb.SnapshotKeySet {
	ks, err := h.loader.KeySet(ctxT(t), task, snapshot.KeySetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return ks
}

// saveFile saves mem as a chunked file, locally and remotely.
func (h *host) saveFile(t *testing.T, mem string) (*snapshot.SaveResult, *cow.Store) {
	t.Helper()
	ks := h.keys(t)
	s, _, err := cow.FromFile(ctxT(t), "memory.img", mem, h.local, h.local, cow.Options{Namespace: h.loader.Namespace(ks.GetWriteKey()), ChunkSize: chunk, TempDir: h.local.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	res, err := h.loader.CacheSnapshot(ctxT(t), &snapshot.SaveRequest{Key: ks.GetWriteKey(), Chunked: []*cow.Store{s}, Local: true, Remote: true, LocalManifest: true})
	if err != nil {
		t.Fatal(err)
	}
	return res, s
}

func (h *host) unpack(t *testing.T) (*snapshot.Snapshot, *cow.Store) {
	t.Helper()
	snap, err := h.loader.GetSnapshot(ctxT(t), h.keys(t), snapshot.GetOptions{ReadPolicy: snapshot.LocalFirst})
	if err != nil {
		t.Fatal(err)
	}
	u, err := h.loader.UnpackSnapshot(ctxT(t), snap, t.TempDir(), snapshot.UnpackOptions{ReadAhead: -1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { u.Close() })
	return snap, u.Stores["memory.img"]
}

func readAll(t *testing.T, s *cow.Store) []byte {
	t.Helper()
	b := make([]byte, s.Size())
	if _, err := s.ReadAt(b, 0); err != nil && !errors.Is(err, io.EOF) {
		t.Fatal(err)
	}
	return b
}

// storedIn counts the stored chunks among [from, to) offsets.
func storedIn(snap *snapshot.Snapshot, from, to int64) int64 {
	var n int64
	for _, c := range snap.Manifest.GetChunkedFiles()[0].GetChunks() {
		if c.GetOffset() >= from && c.GetOffset() < to {
			n++
		}
	}
	return n
}

// hostToHost saves on host A and restores lazily on host B through the
// remote URLs given (A's and B's may be different servers over one store).
func hostToHost(t *testing.T, urlA, urlB string) {
	dir := t.TempDir()
	want := writeVM(t, filepath.Join(dir, "mem.img"), 4<<20, 1)
	a := newHost(t, dial(t, urlA))
	a.saveFile(t, filepath.Join(dir, "mem.img"))

	b := newHost(t, dial(t, urlB))
	snap, s := b.unpack(t)
	if snap.Source != snapshot.SourceRemote {
		t.Errorf("host B got the manifest from %s, want remote", snap.Source)
	}
	before := b.remote.Stats().Reads
	got := make([]byte, 5*chunk)
	if _, err := s.ReadAt(got, 10*chunk); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want[10*chunk:15*chunk]) {
		t.Error("lazily read bytes differ")
	}
	if n, wantN := b.remote.Stats().Reads-before, storedIn(snap, 10*chunk, 15*chunk); n != wantN {
		t.Errorf("host B fetched %d chunks for a 5-chunk read, want %d", n, wantN)
	}
	if !bytes.Equal(readAll(t, s), want) {
		t.Error("restored memory differs")
	}
}

func TestHostToHostThroughServe(t *testing.T) {
	srv := startServe(t, nil, "--cache-dir", t.TempDir())
	hostToHost(t, srv.url(), srv.url())
}

func TestHostToHostThroughMinIO(t *testing.T) {
	m := testutil.StartMinIO(t)
	bucket := m.NewBucket(t)
	env := []string{"AWS_ACCESS_KEY_ID=" + m.AccessKey, "AWS_SECRET_ACCESS_KEY=" + m.SecretKey}
	s3url := fmt.Sprintf("s3://%s/snaps?endpoint=%s&secure=false", bucket, m.Endpoint)
	t.Run("two serve processes over one bucket", func(t *testing.T) {
		one := startServe(t, env, "--s3", s3url)
		two := startServe(t, env, "--s3", s3url)
		hostToHost(t, one.url(), two.url())
	})
	t.Run("s3 remote without a server", func(t *testing.T) {
		dir := t.TempDir()
		want := writeVM(t, filepath.Join(dir, "mem.img"), 2<<20, 5)
		args := []string{"--remote", fmt.Sprintf("s3://%s/direct?endpoint=%s&secure=false", bucket, m.Endpoint),
			"--instance", "ci", "--platform", "os=linux", "--config-hash", "c1", "--ref", "main"}
		cli(t, env, append([]string{"save", "--cache-dir", filepath.Join(dir, "a"), "--chunk-size", "65536", "--chunked", "mem.img=" + filepath.Join(dir, "mem.img")}, args...)...)
		out := cli(t, env, append([]string{"restore", "--json", "--cache-dir", filepath.Join(dir, "b"), "--out", filepath.Join(dir, "out")}, args...)...)
		var rep struct{ Source string }
		json.Unmarshal([]byte(out), &rep)
		if rep.Source != "remote" {
			t.Errorf("restore on an empty cache: source %q, want remote", rep.Source)
		}
		got, err := os.ReadFile(filepath.Join(dir, "out", "mem.img"))
		if err != nil || !bytes.Equal(got, want) {
			t.Errorf("restored file differs (err %v)", err)
		}
	})
}

// cli runs the snaploader binary and returns stdout.
func cli(t *testing.T, env []string, args ...string) string {
	t.Helper()
	cmd := exec.Command(binary, args...)
	cmd.Env = append(os.Environ(), env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("snaploader %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return stdout.String()
}

func TestIncrementalRemoteSaveUploadsDirtyChunks(t *testing.T) {
	srv := startServe(t, nil, "--cache-dir", t.TempDir())
	dir := t.TempDir()
	writeVM(t, filepath.Join(dir, "mem.img"), 2<<20, 2)
	a := newHost(t, dial(t, srv.url()))
	a.saveFile(t, filepath.Join(dir, "mem.img"))

	// Another host restores, dirties 3 chunks and publishes.
	b := newHost(t, dial(t, srv.url()))
	_, s := b.unpack(t)
	for _, off := range []int64{0, 7 * chunk, 20*chunk + 5} {
		if _, err := s.WriteAt([]byte("dirty"), off); err != nil {
			t.Fatal(err)
		}
	}
	writes := b.remote.Stats().Writes
	res, err := b.loader.CacheSnapshot(ctxT(t), &snapshot.SaveRequest{Key: b.keys(t).GetWriteKey(), Chunked: []*cow.Store{s}, Local: true, Remote: true})
	if err != nil {
		t.Fatal(err)
	}
	if n := res.Totals().RemoteChunksWritten; n != 3 {
		t.Errorf("incremental save uploaded %d chunks, want 3", n)
	}
	if n := b.remote.Stats().Writes - writes; n != 7 {
		t.Errorf("remote blob writes = %d, want 7 (3 chunks, their outboards, tree)", n)
	}
}

func TestRemoteDownMidRestore(t *testing.T) {
	srv := startServe(t, nil, "--cache-dir", t.TempDir())
	dir := t.TempDir()
	want := writeVM(t, filepath.Join(dir, "mem.img"), 2<<20, 3)
	a := newHost(t, dial(t, srv.url()))
	a.saveFile(t, filepath.Join(dir, "mem.img"))
	b := newHost(t, dial(t, srv.url()))
	snap, s := b.unpack(t)
	chunks := snap.Manifest.GetChunkedFiles()[0].GetChunks()
	first, later := chunks[0], chunks[len(chunks)-1]
	buf := make([]byte, 100)
	if _, err := s.ReadAt(buf, first.GetOffset()); err != nil {
		t.Fatal(err)
	}
	// The read was served from a verified range; wait for the whole chunk
	// streaming in behind it.
	if _, err := s.WithCleanChunk(first.GetOffset(), func(cache.Blob) error { return nil }); err != nil {
		t.Fatal(err)
	}

	srv.stop()
	_, err := s.ReadAt(buf, later.GetOffset())
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), later.GetDigest().GetHash()) || !strings.Contains(err.Error(), fmt.Sprint(later.GetOffset())) {
		t.Errorf("read of an unfetched chunk with the remote down: got %v, want Unavailable naming offset %d and digest %s", err, later.GetOffset(), later.GetDigest().GetHash())
	}
	if _, err := s.ReadAt(buf, first.GetOffset()); err != nil || !bytes.Equal(buf, want[first.GetOffset():first.GetOffset()+100]) {
		t.Errorf("a chunk already local must keep working with the remote down: %v", err)
	}

	// The server restarts over the same directory and has lost nothing.
	srv.start(t)
	b2 := newHost(t, dial(t, srv.url()))
	_, s2 := b2.unpack(t)
	if !bytes.Equal(readAll(t, s2), want) {
		t.Error("after the server restarted the snapshot differs")
	}
}

func TestCorruptBlobOnServerNeverServed(t *testing.T) {
	srvDir := t.TempDir()
	srv := startServe(t, nil, "--cache-dir", srvDir)
	dir := t.TempDir()
	writeVM(t, filepath.Join(dir, "mem.img"), 1<<20, 4)
	a := newHost(t, dial(t, srv.url()))
	a.saveFile(t, filepath.Join(dir, "mem.img"))
	b := newHost(t, dial(t, srv.url()))
	snap, s := b.unpack(t)
	victim := snap.Manifest.GetChunkedFiles()[0].GetChunks()[1]

	// Flip a byte of the chunk in the server's backing file.
	srvCache, err := localcache.New(srvDir, localcache.Options{MaxBytes: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	p := srvCache.Path(b.loader.Namespace(snap.Key), victim.GetDigest())
	srvCache.Close()
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	data[42] ^= 0x80
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	_, err = s.ReadAt(buf, victim.GetOffset())
	if err == nil || !strings.Contains(err.Error(), victim.GetDigest().GetHash()) {
		t.Errorf("reading a chunk corrupted on the server: got %v, want an error naming %s", err, victim.GetDigest().GetHash())
	}
	missing, err := b.local.FindMissing(context.Background(), b.loader.Namespace(snap.Key), []*repb.Digest{victim.GetDigest()})
	if err != nil || len(missing) != 1 {
		t.Errorf("the corrupt chunk must not be stored locally (missing=%v, err=%v)", missing, err)
	}
}

func TestCLIAgainstServeWithAPIKeys(t *testing.T) {
	srv := startServe(t, nil, "--cache-dir", t.TempDir(), "--api-key", "k-rw=team", "--api-key", "k-ro=team:ro", "--api-key", "k-other=other")
	dir := t.TempDir()
	want := writeVM(t, filepath.Join(dir, "mem.img"), 1<<20, 6)
	key := []string{"--remote", srv.url(), "--instance", "ci", "--platform", "os=linux", "--config-hash", "c1", "--ref", "main"}
	save := append([]string{"save", "--cache-dir", filepath.Join(dir, "a"), "--chunk-size", "65536", "--chunked", "mem.img=" + filepath.Join(dir, "mem.img")}, key...)

	// No key: rejected.
	cmd := exec.Command(binary, save...)
	if out, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(out), "Unauthenticated") {
		t.Errorf("save without an API key: err %v, output %s; want Unauthenticated", err, out)
	}
	// Read-only key: cannot publish.
	cmd = exec.Command(binary, append(save, "--api-key", "k-ro")...)
	if out, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(out), "PermissionDenied") {
		t.Errorf("save with a read-only key: err %v, output %s; want PermissionDenied", err, out)
	}
	cli(t, nil, append(save, "--api-key", "k-rw")...)
	// The read-only key of the same group can restore on an empty cache.
	cli(t, nil, append([]string{"restore", "--api-key", "k-ro", "--cache-dir", filepath.Join(dir, "b"), "--out", filepath.Join(dir, "out")}, key...)...)
	if got, err := os.ReadFile(filepath.Join(dir, "out", "mem.img")); err != nil || !bytes.Equal(got, want) {
		t.Errorf("restored file differs (err %v)", err)
	}
	// Another group sees nothing under the same instance and key.
	cmd = exec.Command(binary, append([]string{"restore", "--api-key", "k-other", "--cache-dir", filepath.Join(dir, "c"), "--out", filepath.Join(dir, "out2")}, key...)...)
	if out, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(out), "NotFound") {
		t.Errorf("restore by another group: err %v, output %s; want NotFound", err, out)
	}
}

func TestServeMetricsEndpoint(t *testing.T) {
	metrics := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	srv := startServe(t, nil, "--cache-dir", t.TempDir(), "--metrics-addr", metrics)
	dir := t.TempDir()
	writeVM(t, filepath.Join(dir, "mem.img"), 1<<20, 8)
	cli(t, nil, "save", "--remote", srv.url(), "--cache-dir", filepath.Join(dir, "a"), "--instance", "ci", "--platform", "os=linux",
		"--config-hash", "c1", "--ref", "main", "--chunk-size", "65536", "--chunked", "mem.img="+filepath.Join(dir, "mem.img"))
	resp, err := http.Get("http://" + metrics + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for _, want := range []string{
		`snaploader_server_requests_total{code="OK",method="UpdateActionResult"}`,
		`snaploader_server_cas_lookups_total{result="miss"}`,
		`snaploader_server_evictions_total 0`,
		`snaploader_server_blob_bytes_total{direction="in"}`,
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
}

// TestSlowRemote: a server that stops answering (SIGSTOP) makes a read of an
// unfetched chunk fail at the per-call deadline with an error naming the
// chunk, instead of hanging the VM forever; once it answers again, reads work.
func TestSlowRemote(t *testing.T) {
	srv := startServe(t, nil, "--cache-dir", t.TempDir())
	dir := t.TempDir()
	want := writeVM(t, filepath.Join(dir, "mem.img"), 1<<20, 12)
	a := newHost(t, dial(t, srv.url()))
	a.saveFile(t, filepath.Join(dir, "mem.img"))

	c, err := remote.Dial(ctxT(t), srv.url(), remote.Options{CallTimeout: 2 * time.Second, MaxRetries: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	b := newHost(t, c)
	snap, s := b.unpack(t)
	victim := snap.Manifest.GetChunkedFiles()[0].GetChunks()[2]

	if err := srv.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	waitStopped(t, srv.cmd.Process.Pid)
	buf := make([]byte, 64)
	_, err = s.ReadAt(buf, victim.GetOffset())
	srv.cmd.Process.Signal(syscall.SIGCONT)
	if code := status.Code(err); (code != codes.DeadlineExceeded && code != codes.Unavailable) || !strings.Contains(err.Error(), victim.GetDigest().GetHash()) {
		t.Fatalf("read with the remote stalled: %v (code %v), want DeadlineExceeded or Unavailable naming %s", err, status.Code(err), victim.GetDigest().GetHash())
	}
	if _, err := s.ReadAt(buf, victim.GetOffset()); err != nil || !bytes.Equal(buf, want[victim.GetOffset():victim.GetOffset()+64]) {
		t.Errorf("read after the remote recovered: %v", err)
	}
}

// waitStopped waits until process pid is stopped (state T in
// /proc/PID/stat): a signal is delivered asynchronously.
func waitStopped(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			t.Fatal(err)
		}
		if i := bytes.LastIndexByte(b, ')'); i >= 0 && i+2 < len(b) && (b[i+2] == 'T' || b[i+2] == 't') {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("process %d did not stop", pid)
}
