package e2e

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/encrypted"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/internal/testguest"
	"github.com/snaploader/snaploader/internal/testutil"
	"github.com/snaploader/snaploader/snapshot"
	"github.com/snaploader/snaploader/vmm"
)

const (
	memMarker  = "MEMORY-SECRET-4c1d"
	diskMarker = "DISK-SECRET-93ab"
	nameMarker = "NAMESECRET"
)

// secretVM writes a memory and a disk image of chunks chunks of 64 KiB,
// each holding a marker, plus a state file.
func secretVM(t *testing.T, dir string, chunks int, seed uint64) (mem, disk, state string) {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, 9))
	write := func(name, marker string) string {
		b := make([]byte, chunks*64<<10)
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		for off := 0; off < len(b); off += 64 << 10 {
			copy(b[off+100:], marker)
		}
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	mem, disk = write("mem", memMarker), write("disk", diskMarker)
	state = filepath.Join(dir, "state")
	os.WriteFile(state, []byte("vcpu registers "+memMarker), 0o644)
	return mem, disk, state
}

func keyFile(t *testing.T, dir, name string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	run(context.Background(), "keygen", "--out", p).must(t, "keygen")
	return p
}

// rawObjects calls f with every stored object's raw bytes: the files of a
// serve cache directory, or the objects of a bucket.
type rawStore func(t *testing.T, f func(name string, b []byte))

func serveDirObjects(dir string) rawStore {
	return func(t *testing.T, f func(string, []byte)) {
		filepath.WalkDir(dir, func(p string, de fs.DirEntry, err error) error {
			if err == nil && de.Type().IsRegular() {
				b, _ := os.ReadFile(p)
				f(p, b)
			}
			return nil
		})
	}
}

func bucketObjects(m testutil.MinIO, bucket string) rawStore {
	return func(t *testing.T, f func(string, []byte)) {
		ctx := context.Background()
		for o := range m.Client.ListObjects(ctx, bucket, minio.ListObjectsOptions{Recursive: true}) {
			if o.Err != nil {
				t.Fatal(o.Err)
			}
			obj, err := m.Client.GetObject(ctx, bucket, o.Key, minio.GetObjectOptions{})
			if err != nil {
				t.Fatal(err)
			}
			b, err := io.ReadAll(obj)
			obj.Close()
			if err != nil {
				t.Fatal(err)
			}
			f(o.Key, b)
		}
	}
}

// Everything an encrypted save stores is unreadable to the tier: no object
// holds a marker written into the VM's memory, disk or state, nor a file
// name; a host with the key restores byte-for-byte, one without it (or with
// another group's key) gets an error naming the key id.
func TestEncryptedSnapshotsHideContents(t *testing.T) {
	m := testutil.StartMinIO(t)
	bucket := m.NewBucket(t)
	s3env := []string{"AWS_ACCESS_KEY_ID=" + m.AccessKey, "AWS_SECRET_ACCESS_KEY=" + m.SecretKey}
	for _, s := range s3env {
		k, v, _ := strings.Cut(s, "=")
		t.Setenv(k, v)
	}
	dir := t.TempDir()
	serveDir := filepath.Join(dir, "serve")
	srv := startServe(t, nil, "--cache-dir", serveDir)
	for _, tc := range []struct {
		name   string
		remote string
		stored rawStore
	}{
		{"serve", srv.url(), serveDirObjects(serveDir)},
		{"minio", fmt.Sprintf("s3://%s/enc?endpoint=%s&secure=false", bucket, m.Endpoint), bucketObjects(m, bucket)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := ctxT(t)
			work := t.TempDir()
			mem, disk, state := secretVM(t, work, 8, 1)
			keys := keyFile(t, work, "keys")
			args := func(host string, extra ...string) []string {
				return append([]string{"--cache-dir", filepath.Join(work, host), "--remote", tc.remote,
					"--instance", "tenant", "--config-hash", "cfg", "--ref", "main"}, extra...)
			}
			run(ctx, append([]string{"save", "--chunk-size", "65536", "--encryption-key-file", keys, "--chunked", "mem-" + nameMarker + "=" + mem, "--chunked", "disk=" + disk, "--file", "state-" + nameMarker + "=" + state}, args("a")...)...).must(t, "encrypted save")
			objects := 0
			tc.stored(t, func(name string, b []byte) {
				objects++
				for _, mk := range []string{memMarker, diskMarker, nameMarker, "state-", "mem-"} {
					if bytes.Contains(b, []byte(mk)) {
						t.Errorf("stored object %s holds the plaintext %q", name, mk)
					}
				}
			})
			if objects < 16 {
				t.Fatalf("found only %d stored objects", objects)
			}
			out := filepath.Join(work, "out")
			run(ctx, append([]string{"restore", "--encryption-key-file", keys, "--out", out}, args("b")...)...).must(t, "restore with the key")
			for name, want := range map[string]string{"mem-" + nameMarker: mem, "disk": disk, "state-" + nameMarker: state} {
				got, _ := os.ReadFile(filepath.Join(out, name))
				w, _ := os.ReadFile(want)
				if !bytes.Equal(got, w) {
					t.Errorf("restored %s differs", name)
				}
			}
			id := strings.Fields(string(must(os.ReadFile(keys))))
			keyID := id[len(id)-3]
			r := run(ctx, append([]string{"restore", "--out", filepath.Join(work, "nokey")}, args("c")...)...)
			if r.err == nil || !strings.Contains(r.stderr, keyID) {
				t.Errorf("restore without the key: %v, stderr %q; want an error naming key id %s", r.err, r.stderr, keyID)
			}
			other := keyFile(t, work, "other-group")
			r = run(ctx, append([]string{"restore", "--encryption-key-file", other, "--out", filepath.Join(work, "other")}, args("d")...)...)
			if r.err == nil || !strings.Contains(r.stderr, keyID) {
				t.Errorf("restore with another group's key: %v, stderr %q; want an error naming key id %s", r.err, r.stderr, keyID)
			}
			if entries, _ := os.ReadDir(filepath.Join(work, "d", "cas")); len(entries) > 0 {
				t.Errorf("a failed restore wrote %d entries into the local cache", len(entries))
			}
		})
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

// duOf is the disk usage of a directory tree in bytes.
func duOf(dir string) int64 {
	var n int64
	filepath.WalkDir(dir, func(p string, de fs.DirEntry, err error) error {
		if err == nil && de.Type().IsRegular() {
			if fi, err := de.Info(); err == nil {
				n += fi.Size()
			}
		}
		return nil
	})
	return n
}

// One group's second snapshot sharing 99% of its chunks stores at most 2%
// more; another group's copy of the same data shares nothing.
func TestEncryptedDeduplication(t *testing.T) {
	ctx := ctxT(t)
	work := t.TempDir()
	serveDir := filepath.Join(work, "serve")
	srv := startServe(t, nil, "--cache-dir", serveDir)
	mem, _, _ := secretVM(t, work, 100, 2)
	keys := keyFile(t, work, "keys")
	save := func(host, kf, ref string) {
		run(ctx, "save", "--cache-dir", filepath.Join(work, host), "--remote", srv.url(), "--chunk-size", "65536", "--encryption-key-file", kf,
			"--instance", "tenant", "--config-hash", "cfg", "--ref", ref, "--default-ref", "main", "--save-policy", "always", "--chunked", "mem="+mem).must(t, "save "+ref)
	}
	save("a", keys, "main")
	first := duOf(filepath.Join(serveDir, "cas"))
	// Change one chunk of 100 and save from another host of the group.
	f, _ := os.OpenFile(mem, os.O_WRONLY, 0)
	f.WriteAt([]byte("changed"), 5*64<<10+7)
	f.Close()
	save("b", keys, "feature")
	second := duOf(filepath.Join(serveDir, "cas"))
	if grow := float64(second-first) / float64(first); grow > 0.02 {
		t.Errorf("a snapshot sharing 99%% of its chunks grew the store by %.1f%% (%d -> %d bytes)", 100*grow, first, second)
	}
	save("c", keyFile(t, work, "other"), "main")
	third := duOf(filepath.Join(serveDir, "cas"))
	if third-second < first*98/100 {
		t.Errorf("another group's copy added %d bytes, want about %d: it shares chunks", third-second, first)
	}
	t.Logf("store: first snapshot %d bytes, +%d for the 99%%-shared second, +%d for another group", first, second-first, third-second)
}

// Rotation: snapshots sealed under key 1 restore after key 2 is added; new
// saves use key 2; removing key 1 breaks only the old snapshots, naming it.
func TestEncryptionKeyRotation(t *testing.T) {
	ctx := ctxT(t)
	work := t.TempDir()
	srv := startServe(t, nil, "--cache-dir", filepath.Join(work, "serve"))
	mem, _, _ := secretVM(t, work, 4, 3)
	keys := keyFile(t, work, "keys")
	key1 := strings.Fields(string(must(os.ReadFile(keys))))
	id1 := key1[len(key1)-3]
	common := func(host string) []string {
		return []string{"--cache-dir", filepath.Join(work, host), "--remote", srv.url(), "--encryption-key-file", keys,
			"--instance", "tenant", "--config-hash", "cfg", "--ref", "main"}
	}
	old := run(ctx, append([]string{"save", "--json", "--chunk-size", "65536", "--chunked", "mem=" + mem}, common("a")...)...).must(t, "save under key 1").report(t)["snapshot_id"].(string)
	run(ctx, "keygen", "--add-to", keys).must(t, "keygen --add-to")
	run(ctx, append([]string{"restore", "--out", filepath.Join(work, "o1")}, common("b")...)...).must(t, "restore after adding key 2")
	f, _ := os.OpenFile(mem, os.O_WRONLY, 0)
	f.WriteAt([]byte("v2"), 0)
	f.Close()
	newID := run(ctx, append([]string{"save", "--json", "--chunk-size", "65536", "--save-policy", "always", "--chunked", "mem=" + mem}, common("a")...)...).must(t, "save after rotation").report(t)["snapshot_id"].(string)
	// Remove key 1.
	lines := strings.Split(strings.TrimSpace(string(must(os.ReadFile(keys)))), "\n")
	var kept []string
	for _, l := range lines {
		if !strings.Contains(l, id1) {
			kept = append(kept, l)
		}
	}
	os.WriteFile(keys, []byte(strings.Join(kept, "\n")+"\n"), 0o600)
	run(ctx, append([]string{"restore", "--snapshot-id", newID, "--out", filepath.Join(work, "o2")}, common("c")...)...).must(t, "new snapshot with key 2 only")
	r := run(ctx, append([]string{"restore", "--snapshot-id", old, "--out", filepath.Join(work, "o3")}, common("d")...)...)
	if r.err == nil || !strings.Contains(r.stderr, id1) {
		t.Errorf("old snapshot with key 1 removed: %v, stderr %q; want an error naming %s", r.err, r.stderr, id1)
	}
}

// The lazy QEMU restore on another host works on an encrypted snapshot.
func TestQEMURestoredLazilyEncrypted(t *testing.T) {
	needGuest(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	url := serveProc(t)
	k, err := encrypted.NewKey(time.Now())
	if err != nil {
		t.Fatal(err)
	}
	keys, _ := encrypted.NewKeyring(k)
	seal := func(c cache.Tier) cache.Tier {
		e, err := encrypted.New(c, encrypted.Options{Keys: keys, TempDir: t.TempDir()})
		if err != nil {
			t.Fatal(err)
		}
		return cache.Verifying(e)
	}
	a := newVMHostWith(t, url, seal)
	bootSerial, _ := bootAndSave(ctx, t, a)
	before := testguest.ParseCounters(bootSerial)
	last := before[len(before)-1]

	b := newVMHostWith(t, url, seal)
	snap := b.get(ctx, t)
	if snap.Source != snapshot.SourceRemote {
		t.Errorf("host B found the snapshot in %s, want remote", snap.Source)
	}
	r := restoreLazily(ctx, t, b, snap, snapshot.UnpackOptions{})
	if r.first != last+1 && r.first != last+2 {
		t.Errorf("first counter after an encrypted restore is %d, want %d", r.first, last+1)
	}
	final := nextCounter(ctx, t, r.vm.Guest(), last+3)
	diskImg := filepath.Join(t.TempDir(), "disk.img")
	if err := vmm.WriteFile(ctx, r.vm.Stores()[vmm.DiskPrefix+"root"], diskImg); err != nil {
		t.Fatal(err)
	}
	log, err := testguest.ReadTestLog(ctx, diskImg)
	if err != nil {
		t.Fatal(err)
	}
	contiguous(t, "disk log", log)
	if len(log) < final-1 {
		t.Errorf("disk log ends at %d, want at least %d", len(log), final-1)
	}
	t.Logf("encrypted: restore to running %v, first counter %d after %v; fetched %.1f MiB", r.toRunning, r.first, r.toCounter, float64(r.remoteBytes)/(1<<20))

	// An incremental save from host B, restored on host C with its
	// working set prefetched.
	saveB := b.save(ctx, t, r.vm)
	lastB := testguest.ParseCounters(readFile(t, r.serial))
	r.vm.Close()
	if tot := saveB.Result.Totals(); tot.ChunksWritten == 0 || tot.ChunksWritten*4 > tot.ChunksTotal {
		t.Errorf("encrypted incremental save wrote %d of %d chunks", tot.ChunksWritten, tot.ChunksTotal)
	}
	hc := newVMHostWith(t, url, seal)
	snapC := hc.get(ctx, t)
	if snapC.Manifest.GetVmMetadata().GetSnapshotId() != saveB.Result.SnapshotID {
		t.Fatalf("host C found %s, want host B's %s", snapC.Manifest.GetVmMetadata().GetSnapshotId(), saveB.Result.SnapshotID)
	}
	rc := restoreLazily(ctx, t, hc, snapC, snapshot.UnpackOptions{PrefetchWorkingSet: true})
	if want := lastB[len(lastB)-1]; rc.first != want+1 && rc.first != want+2 {
		t.Errorf("host C: first counter %d, want %d", rc.first, want+1)
	}

	// A host without the key cannot read it.
	c := newVMHost(t, url)
	if _, err := c.loader.GetSnapshot(ctx, c.keys(ctx, t), snapshot.GetOptions{ReadPolicy: snapshot.Newest}); err == nil || !strings.Contains(err.Error(), k.ID) {
		t.Errorf("a host without the key: %v, want an error naming key id %s", err, k.ID)
	}
}

// A flipped byte in any stored object of an encrypted snapshot is detected:
// the restore either gives the exact bytes (the object was not needed) or
// fails with an error, and the local cache never keeps a blob that does not
// match its digest.
func TestEncryptedObjectsTamperedInTheBucket(t *testing.T) {
	ctx := ctxT(t)
	m := testutil.StartMinIO(t)
	bucket := m.NewBucket(t)
	t.Setenv("AWS_ACCESS_KEY_ID", m.AccessKey)
	t.Setenv("AWS_SECRET_ACCESS_KEY", m.SecretKey)
	work := t.TempDir()
	mem, _, state := secretVM(t, work, 6, 4)
	want, _ := os.ReadFile(mem)
	keys := keyFile(t, work, "keys")
	url := fmt.Sprintf("s3://%s/t?endpoint=%s&secure=false", bucket, m.Endpoint)
	common := []string{"--remote", url, "--encryption-key-file", keys, "--instance", "tenant", "--config-hash", "cfg", "--ref", "main"}
	run(ctx, append([]string{"save", "--cache-dir", filepath.Join(work, "a"), "--chunk-size", "65536", "--chunked", "mem=" + mem, "--file", "state=" + state}, common...)...).must(t, "save")
	var objects []string
	raw := map[string][]byte{}
	bucketObjects(m, bucket)(t, func(name string, b []byte) { objects = append(objects, name); raw[name] = b })
	detected := 0
	for i, name := range objects {
		b := append([]byte(nil), raw[name]...)
		b[len(b)/2] ^= 0x10
		m.PutRaw(t, bucket, name, b)
		host := filepath.Join(work, fmt.Sprintf("h%d", i))
		out := filepath.Join(work, fmt.Sprintf("o%d", i))
		r := run(ctx, append([]string{"restore", "--cache-dir", host, "--out", out}, common...)...)
		if r.err == nil {
			if got, _ := os.ReadFile(filepath.Join(out, "mem")); !bytes.Equal(got, want) {
				t.Errorf("object %s flipped: restore succeeded with wrong bytes", name)
			}
		} else {
			detected++
			if !strings.Contains(r.stderr, "error kind") {
				t.Errorf("object %s flipped: unclear error %q", name, r.stderr)
			}
		}
		badLocal(t, host)
		m.PutRaw(t, bucket, name, raw[name])
	}
	if detected == 0 {
		t.Fatal("no flipped object was detected")
	}
	t.Logf("%d objects flipped one at a time: %d restores failed clearly, the rest restored exact bytes", len(objects), detected)
}

// badLocal fails the test if a blob in the local cache at dir does not
// match the digest its file name gives.
func badLocal(t *testing.T, dir string) {
	t.Helper()
	filepath.WalkDir(filepath.Join(dir, "cas"), func(p string, de fs.DirEntry, err error) error {
		if err != nil || !de.Type().IsRegular() {
			return nil
		}
		fn := filepath.Base(filepath.Dir(filepath.Dir(p)))
		hash, _, _ := strings.Cut(de.Name(), "-")
		b, _ := os.ReadFile(p)
		if got := hashHex(fn, b); got != "" && got != hash {
			t.Errorf("local cache keeps %s, whose content does not match its digest", p)
		}
		return nil
	})
}

// hashHex is the hash of b under the digest function named fn, "" when fn
// names none.
func hashHex(fn string, b []byte) string {
	f, err := digest.ParseFunction(fn)
	if err != nil {
		return ""
	}
	return digest.Compute(f, b).GetHash()
}
