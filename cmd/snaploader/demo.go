package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"syscall"
	"text/tabwriter"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/cow"
	"github.com/snaploader/snaploader/internal/fileio"
	"github.com/snaploader/snaploader/proto/snapshotpb"
	"github.com/snaploader/snaploader/snapshot"
)

// demoOptions are what demo runs: a synthetic VM of MemMiB of memory and
// DiskMiB of disk, DirtyPercent of its chunks dirtied before the
// incremental save, host A's cache from Cache, files in WorkDir (see
// demoWorkDir), kept at the end with Keep.
type demoOptions struct {
	Cache           cacheOptions
	WorkDir         string
	MemMiB, DiskMiB int64
	DirtyPercent    float64
	Keep            bool
}

type demoRow struct {
	step   string
	bytes  int64
	chunks string
	took   time.Duration
	note   string
}

// runDemo saves, dirties, incrementally saves and restores a synthetic VM
// snapshot on two hosts' caches, and prints what each step took.
func runDemo(ctx context.Context, o demoOptions, s streams) error {
	work, cleanup, err := demoWorkDir(o.WorkDir, o.Keep, s.Err)
	if err != nil {
		return err
	}
	defer cleanup()
	vm := filepath.Join(work, "vm")
	if err := os.Mkdir(vm, 0o755); err != nil {
		return err
	}
	var rows []demoRow
	step := func(name string, bytes int64, chunks string, took time.Duration, note string) {
		rows = append(rows, demoRow{name, bytes, chunks, took, note})
		fmt.Fprintf(s.Err, "%-28s %s\n", name, took.Round(time.Millisecond))
	}

	// 1. A synthetic VM: memory with ~30% zero pages and repeated pages,
	// a half-empty sparse disk, small vmstate and kernel.
	t := time.Now()
	files := map[string]string{"vmstate.snap": filepath.Join(vm, "vmstate.snap"), "vmlinux": filepath.Join(vm, "vmlinux")}
	mem, disk := filepath.Join(vm, "memory.img"), filepath.Join(vm, "rootfs.img")
	// A fresh seed per run, so a reused cache does not already hold the data.
	seed := uint64(time.Now().UnixNano())
	rng := rand.New(rand.NewPCG(seed, seed>>7))
	if err := writeSynthetic(mem, o.MemMiB<<20, 0.30, 0.10, rng); err != nil {
		return err
	}
	if err := writeSynthetic(disk, o.DiskMiB<<20, 0.50, 0.05, rng); err != nil {
		return err
	}
	if err := writeSynthetic(files["vmstate.snap"], 300<<10, 0.1, 0, rng); err != nil {
		return err
	}
	if err := writeSynthetic(files["vmlinux"], 8<<20, 0, 0, rng); err != nil {
		return err
	}
	total := (o.MemMiB + o.DiskMiB) << 20
	step("generate VM files", total, "", time.Since(t), "synthetic memory + disk")

	// Baseline: cp of the same files.
	t = time.Now()
	for _, p := range []string{mem, disk} {
		if err := copyFile(p, p+".cp"); err != nil {
			return err
		}
		os.Remove(p + ".cp")
	}
	cpTook := time.Since(t)
	step("baseline: cp memory+disk", total, "", cpTook, "reference for ratios")

	// Host A: the embedded default cache, which also serves as the shared
	// tier host B reads from (as `snaploader serve` over it would).
	a, err := openEnv(ctx, o.Cache)
	if err != nil {
		return err
	}
	defer a.Close()
	if a.loader, err = snapshot.New(a.local, a.local, snapshot.Options{Group: o.Cache.Group, Logger: a.log}); err != nil {
		return err
	}
	cfg := &snapshotpb.VMConfiguration{Vcpus: 2, MemoryBytes: o.MemMiB << 20, Vmm: "demo", Disks: []*snapshotpb.Disk{{Name: "rootfs.img", SizeBytes: o.DiskMiB << 20}}}
	ch, err := snapshot.ConfigurationHash(cfg)
	if err != nil {
		return err
	}
	ph, err := snapshot.PlatformHash(map[string]string{"OSFamily": "linux", "Arch": "amd64", "workload": "demo"})
	if err != nil {
		return err
	}
	task := snapshot.Task{InstanceName: "demo", PlatformHash: ph, ConfigurationHash: ch,
		Env: map[string]string{snapshot.EnvBranch: "main", snapshot.EnvDefaultBranch: "main"}}
	keys, err := a.loader.KeySet(ctx, task, snapshot.KeySetOptions{})
	if err != nil {
		return err
	}
	ns := a.loader.Namespace(keys.GetWriteKey())

	// 2. First save: split memory and disk into chunks.
	t = time.Now()
	var stores []*cow.Store
	defer func() {
		for _, s := range stores {
			s.Close()
		}
	}()
	var split cow.SaveStats
	for _, p := range []string{mem, disk} {
		s, st, err := cow.FromFile(ctx, filepath.Base(p), p, a.local, a.local, cow.Options{Namespace: ns, TempDir: a.local.TempDir()})
		if err != nil {
			return err
		}
		stores = append(stores, s)
		split.ChunksTotal += st.ChunksTotal
		split.ChunksWritten += st.ChunksWritten
		split.BytesWritten += st.BytesWritten
		split.BytesSkippedZero += st.BytesSkippedZero
	}
	_, err = a.loader.CacheSnapshot(ctx, &snapshot.SaveRequest{Key: keys.GetWriteKey(), Config: cfg, Files: files, Chunked: stores, Local: true, Remote: true, LocalManifest: true})
	if err != nil {
		return err
	}
	firstTook := time.Since(t)
	step("first save (host A)", split.BytesWritten, fmt.Sprintf("%d/%d stored", split.ChunksWritten, split.ChunksTotal), firstTook,
		fmt.Sprintf("%.2fx cp; %s zeros skipped", ratio(firstTook, cpTook), humanBytes(split.BytesSkippedZero)))

	// 3. The VM dirties ~1% of chunks through the COW store.
	dirtied := 0
	for _, s := range stores {
		n := int((float64(s.Size())/float64(s.ChunkSize()))*o.DirtyPercent/100 + 0.5)
		for i := 0; i < n; i++ {
			off := rng.Int64N(s.Size()-4096) &^ 4095
			buf := make([]byte, 4096)
			fillRandom(buf, rng)
			if _, err := s.WriteAt(buf, off); err != nil {
				return err
			}
			// Keep the originals in step so the restore can be compared.
			if err := writeAtPath(filepath.Join(vm, s.Name()), buf, off); err != nil {
				return err
			}
		}
		dirtied += len(s.Dirty())
	}

	// 4. Incremental save: only the dirtied chunks are stored.
	t = time.Now()
	inc, err := a.loader.CacheSnapshot(ctx, &snapshot.SaveRequest{Key: keys.GetWriteKey(), Config: cfg, Files: files, Chunked: stores, Local: true, Remote: true, LocalManifest: true})
	if err != nil {
		return err
	}
	incTook := time.Since(t)
	it := inc.Totals()
	step("incremental save (host A)", it.BytesWritten, fmt.Sprintf("%d stored (%d dirtied)", it.ChunksWritten, dirtied), incTook,
		fmt.Sprintf("%.0fx faster than first save", ratio(firstTook, incTook)))
	if it.ChunksWritten > dirtied {
		return fmt.Errorf("incremental save stored %d chunks but only %d were dirtied", it.ChunksWritten, dirtied)
	}

	// 5. Host B: an empty cache whose second tier is host A's cache.
	bDir := filepath.Join(work, "host-b-cache")
	bCache, err := localcache.New(bDir, localcache.Options{MaxBytes: o.Cache.MaxBytes})
	if err != nil {
		return err
	}
	defer bCache.Close()
	bLoader, err := snapshot.New(bCache, a.local, snapshot.Options{Group: o.Cache.Group, Logger: a.log})
	if err != nil {
		return err
	}
	t = time.Now()
	bKeys, err := bLoader.KeySet(ctx, task, snapshot.KeySetOptions{})
	if err != nil {
		return err
	}
	snap, err := bLoader.GetSnapshot(ctx, bKeys, snapshot.GetOptions{ReadPolicy: snapshot.LocalFirst})
	if err != nil {
		return err
	}
	out := filepath.Join(work, "restored")
	u, err := bLoader.UnpackSnapshot(ctx, snap, out, snapshot.UnpackOptions{})
	if err != nil {
		return err
	}
	ready := time.Since(t)
	step("restore to ready (host B)", 0, fmt.Sprintf("%d lazy stores", len(u.Stores)), ready, fmt.Sprintf("manifest from %s tier", snap.Source))
	u.Close()
	eB := &env{local: bCache, loader: bLoader, log: a.log}
	t = time.Now()
	// out holds the artifact files the restore to ready just wrote.
	if _, err := restoreTo(ctx, eB, snap, out, restoreToOptions{replace: true}); err != nil {
		return err
	}
	full := time.Since(t)
	step("restore all bytes (host B)", total, "", full, fmt.Sprintf("%.2fx cp; each chunk fetched from A, verified, stored in B", ratio(full, cpTook)))

	// 6. Byte-for-byte check.
	t = time.Now()
	for _, name := range []string{"memory.img", "rootfs.img", "vmstate.snap", "vmlinux"} {
		same, err := sameFile(filepath.Join(vm, name), filepath.Join(out, name))
		if err != nil {
			return err
		}
		if !same {
			return fmt.Errorf("restored %s differs from the original", name)
		}
	}
	step("byte-for-byte check", total, "", time.Since(t), "restored files equal the VM's")

	w := tabwriter.NewWriter(s.Out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "STEP\tBYTES\tCHUNKS\tTIME\tNOTE")
	for _, r := range rows {
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", r.step, humanBytes(r.bytes), r.chunks, r.took.Round(time.Millisecond), r.note)
	}
	w.Flush()
	fmt.Fprintf(s.Out, "\nmemory %d MiB + disk %d MiB stored as %s: %s of zero chunks skipped, %s of identical chunks stored once; cache %s\n",
		o.MemMiB, o.DiskMiB, humanBytes(split.BytesWritten), humanBytes(split.BytesSkippedZero),
		humanBytes(max(0, total-split.BytesSkippedZero-split.BytesWritten)), a.local.Dir())
	return nil
}

// demoWorkDir returns the directory the demo writes in and a function
// that removes it, or with keep says where it is. The demo removes only
// what it created: without --work-dir, a new temporary directory; with a
// --work-dir that does not exist, that directory, created with its
// missing parents (the topmost of which goes again); with an existing
// directory, a new directory inside it, whatever else it holds left
// alone. A --work-dir that is not a directory is refused untouched. With
// keep, cleanup says on notes where the directory is.
func demoWorkDir(dir string, keep bool, notes io.Writer) (work string, cleanup func(), err error) {
	var created string // the topmost directory the demo made
	fi, err := os.Stat(dir)
	switch {
	case dir == "":
		if work, err = os.MkdirTemp("", "snaploader-demo-"); err != nil {
			return "", nil, err
		}
		created = work
	case errors.Is(err, fs.ErrNotExist):
		if _, lerr := os.Lstat(dir); lerr == nil {
			return "", nil, status.Errorf(codes.InvalidArgument, "--work-dir %s is a symbolic link to nothing, not a directory", dir)
		}
		top := filepath.Clean(dir)
		for {
			parent := filepath.Dir(top)
			if parent == top {
				break
			}
			if _, err := os.Lstat(parent); err == nil {
				break
			}
			top = parent
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			os.RemoveAll(top)
			return "", nil, fmt.Errorf("--work-dir: %w", err)
		}
		work, created = dir, top
	case errors.Is(err, syscall.ENOTDIR):
		return "", nil, status.Errorf(codes.InvalidArgument, "--work-dir %s: a parent of it is not a directory", dir)
	case err != nil:
		return "", nil, fmt.Errorf("--work-dir: %w", err)
	case !fi.IsDir():
		kind := "not a directory"
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			kind = fileio.Kind(st.Mode)
		}
		return "", nil, status.Errorf(codes.InvalidArgument, "--work-dir %s is %s, not a directory", dir, kind)
	default:
		if work, err = os.MkdirTemp(dir, "snaploader-demo-"); err != nil {
			return "", nil, fmt.Errorf("--work-dir: %w", err)
		}
		created = work
	}
	return work, func() {
		if keep {
			fmt.Fprintf(notes, "kept the work directory %s\n", work)
			return
		}
		os.RemoveAll(created)
	}, nil
}

func ratio(a, b time.Duration) float64 {
	if b <= 0 {
		return 0
	}
	return float64(a) / float64(b)
}

// writeSynthetic writes size bytes of VM-like data: a share of zero pages
// (left as holes), a share of pages repeating an earlier page, the rest
// random.
func writeSynthetic(path string, size int64, zeroShare, repeatShare float64, rng *rand.Rand) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		return err
	}
	const page = 4096
	const run = 1000 // pages per run (one default chunk): whole runs are zero, repeated or random
	buf := make([]byte, page*run)
	repeat := make([]byte, page*run)
	fillRandom(repeat, rng)
	for off := int64(0); off < size; off += int64(len(buf)) {
		n := min(int64(len(buf)), size-off)
		switch x := rng.Float64(); {
		case x < zeroShare:
			continue
		case x < zeroShare+repeatShare:
			if _, err := f.WriteAt(repeat[:n], off); err != nil {
				return err
			}
		default:
			fillRandom(buf[:n], rng)
			if _, err := f.WriteAt(buf[:n], off); err != nil {
				return err
			}
		}
	}
	return f.Close()
}

func fillRandom(b []byte, rng *rand.Rand) {
	for i := 0; i+8 <= len(b); i += 8 {
		v := rng.Uint64()
		b[i], b[i+1], b[i+2], b[i+3], b[i+4], b[i+5], b[i+6], b[i+7] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24), byte(v>>32), byte(v>>40), byte(v>>48), byte(v>>56)
	}
}

func writeAtPath(path string, b []byte, off int64) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = f.WriteAt(b, off)
	return err
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	defer out.Close()
	if _, err := io.Copy(out, in); err != nil {
		return err
	}
	return out.Close()
}

func sameFile(a, b string) (bool, error) {
	fa, err := os.Open(a)
	if err != nil {
		return false, err
	}
	defer fa.Close()
	fb, err := os.Open(b)
	if err != nil {
		return false, err
	}
	defer fb.Close()
	ba, bb := make([]byte, 1<<20), make([]byte, 1<<20)
	for {
		na, ea := io.ReadFull(fa, ba)
		nb, eb := io.ReadFull(fb, bb)
		if na != nb || !bytes.Equal(ba[:na], bb[:nb]) {
			return false, nil
		}
		if ea != nil || eb != nil {
			return ea == eb || (ea == io.ErrUnexpectedEOF && eb == io.ErrUnexpectedEOF), nil
		}
	}
}
