package snapshot_test

import (
	"bytes"
	"context"
	"fmt"
	"log"
	"net"
	"os"
	"path/filepath"

	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/remote"
	"github.com/snaploader/snaploader/server"
	"github.com/snaploader/snaploader/snapshot"
)

// vm writes a small VM into dir: 8 MiB of guest memory (a quarter of it
// zeros) and a device state file.
func vm(dir string) (mem, state string) {
	b := make([]byte, 8<<20)
	for i := 2 << 20; i < len(b); i++ {
		b[i] = byte(i * 7 / 4096)
	}
	mem, state = filepath.Join(dir, "mem"), filepath.Join(dir, "vmstate")
	if err := os.WriteFile(mem, b, 0o644); err != nil {
		log.Fatal(err)
	}
	if err := os.WriteFile(state, []byte("device state"), 0o644); err != nil {
		log.Fatal(err)
	}
	return mem, state
}

// task names what a snapshot is for: the key set derived from it falls back
// from the branch to the base and default branches.
var task = snapshot.Task{
	InstanceName: "ci", PlatformHash: "linux-amd64", ConfigurationHash: "vm-v1",
	Env: map[string]string{snapshot.EnvBranch: "main"},
}

// Save a VM's files into a host's local cache and restore them as regular
// files.
func Example() {
	ctx := context.Background()
	dir, _ := os.MkdirTemp("", "snaploader-example")
	defer os.RemoveAll(dir)
	mem, state := vm(dir)

	lc, err := localcache.New(filepath.Join(dir, "cache"), localcache.Options{MaxBytes: 1 << 30})
	if err != nil {
		log.Fatal(err)
	}
	defer lc.Close()
	l, err := snapshot.New(lc, nil, snapshot.Options{})
	if err != nil {
		log.Fatal(err)
	}
	keys, err := l.KeySet(ctx, task, snapshot.KeySetOptions{})
	if err != nil {
		log.Fatal(err)
	}
	saved, err := l.CacheSnapshot(ctx, &snapshot.SaveRequest{
		Key:           keys.GetWriteKey(),
		Files:         map[string]string{"vmstate": state},
		ChunkedFiles:  []snapshot.NamedFile{{Name: "mem", Path: mem}},
		Local:         true,
		LocalManifest: true,
	})
	if err != nil {
		log.Fatal(err)
	}
	snap, err := l.GetSnapshot(ctx, keys, snapshot.GetOptions{ReadPolicy: snapshot.LocalFirst})
	if err != nil {
		log.Fatal(err)
	}
	restored, err := l.Restore(ctx, snap, filepath.Join(dir, "out"), snapshot.RestoreOptions{})
	if err != nil {
		log.Fatal(err)
	}
	got, _ := os.ReadFile(restored.Files["mem"])
	want, _ := os.ReadFile(mem)
	fmt.Println("same snapshot:", snap.Manifest.GetVmMetadata().GetSnapshotId() == saved.SnapshotID)
	fmt.Println("from:", snap.Source)
	fmt.Println("memory restored intact:", bytes.Equal(got, want))
	// Output:
	// same snapshot: true
	// from: local
	// memory restored intact: true
}

// One host saves through a shared tier (here a server on loopback over a
// directory, as `snaploader serve` runs it); another host, whose local
// cache is empty, finds the snapshot there and restores it.
func Example_remoteTier() {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	dir, _ := os.MkdirTemp("", "snaploader-example")
	defer os.RemoveAll(dir)
	mem, state := vm(dir)

	shared, err := localcache.New(filepath.Join(dir, "shared"), localcache.Options{MaxBytes: 1 << 30})
	if err != nil {
		log.Fatal(err)
	}
	defer shared.Close()
	srv, err := server.New(shared, server.Options{TempDir: shared.TempDir()})
	if err != nil {
		log.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	go srv.Serve(ctx, lis)

	host := func(name string) *snapshot.Loader {
		lc, err := localcache.New(filepath.Join(dir, name), localcache.Options{MaxBytes: 1 << 30})
		if err != nil {
			log.Fatal(err)
		}
		r, err := remote.Dial(ctx, "grpc://"+lis.Addr().String(), remote.Options{})
		if err != nil {
			log.Fatal(err)
		}
		l, err := snapshot.New(lc, r, snapshot.Options{Function: r.DigestFunction()})
		if err != nil {
			log.Fatal(err)
		}
		return l
	}
	a, b := host("host-a"), host("host-b")
	keys, err := a.KeySet(ctx, task, snapshot.KeySetOptions{})
	if err != nil {
		log.Fatal(err)
	}
	if _, err := a.CacheSnapshot(ctx, &snapshot.SaveRequest{
		Key:          keys.GetWriteKey(),
		Files:        map[string]string{"vmstate": state},
		ChunkedFiles: []snapshot.NamedFile{{Name: "mem", Path: mem}},
		Local:        true,
		Remote:       true,
	}); err != nil {
		log.Fatal(err)
	}

	keys, err = b.KeySet(ctx, task, snapshot.KeySetOptions{})
	if err != nil {
		log.Fatal(err)
	}
	snap, err := b.GetSnapshot(ctx, keys, snapshot.GetOptions{ReadPolicy: snapshot.LocalFirst})
	if err != nil {
		log.Fatal(err)
	}
	restored, err := b.Restore(ctx, snap, filepath.Join(dir, "out"), snapshot.RestoreOptions{})
	if err != nil {
		log.Fatal(err)
	}
	got, _ := os.ReadFile(restored.Files["mem"])
	want, _ := os.ReadFile(mem)
	fmt.Println("from:", snap.Source)
	fmt.Println("memory restored intact:", bytes.Equal(got, want))
	// Output:
	// from: remote
	// memory restored intact: true
}

// A VM starts before its memory is fetched: unpacking opens a lazy store per
// chunked file, and a read fetches only the chunks it touches.
func ExampleLoader_UnpackSnapshot() {
	ctx := context.Background()
	dir, _ := os.MkdirTemp("", "snaploader-example")
	defer os.RemoveAll(dir)
	mem, state := vm(dir)

	lc, err := localcache.New(filepath.Join(dir, "cache"), localcache.Options{MaxBytes: 1 << 30})
	if err != nil {
		log.Fatal(err)
	}
	defer lc.Close()
	l, err := snapshot.New(lc, nil, snapshot.Options{})
	if err != nil {
		log.Fatal(err)
	}
	keys, err := l.KeySet(ctx, task, snapshot.KeySetOptions{})
	if err != nil {
		log.Fatal(err)
	}
	if _, err := l.CacheSnapshot(ctx, &snapshot.SaveRequest{
		Key: keys.GetWriteKey(), Files: map[string]string{"vmstate": state},
		ChunkedFiles: []snapshot.NamedFile{{Name: "mem", Path: mem}}, Local: true, LocalManifest: true,
	}); err != nil {
		log.Fatal(err)
	}
	snap, err := l.GetSnapshot(ctx, keys, snapshot.GetOptions{ReadPolicy: snapshot.LocalFirst})
	if err != nil {
		log.Fatal(err)
	}
	u, err := l.UnpackSnapshot(ctx, snap, filepath.Join(dir, "vm"), snapshot.UnpackOptions{ReadAhead: -1})
	if err != nil {
		log.Fatal(err)
	}
	defer u.Close()
	store := u.Stores["mem"]
	page := make([]byte, 4096)
	if _, err := store.ReadAt(page, 6<<20); err != nil {
		log.Fatal(err)
	}
	want, _ := os.ReadFile(mem)
	fmt.Println("page intact:", bytes.Equal(page, want[6<<20:6<<20+4096]))
	fmt.Println("chunks read:", store.Stats().Touched, "of", len(snap.Manifest.GetChunkedFiles()[0].GetChunks()))
	// Output:
	// page intact: true
	// chunks read: 1 of 3
}
