package cache_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"sync"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"

	"github.com/snaploader/snaploader/cache"
)

// TestReadThroughRecyclesBuffersSafely fetches blobs with a handoff budget
// of one byte, so that every buffer is dropped (and reused by the next
// fetches) as soon as its blob is stored, while readers hold the blobs
// open and read them: a buffer reused under a reader, or under a lent
// Contents, would show other bytes.
func TestReadThroughRecyclesBuffersSafely(t *testing.T) {
	ctx := context.Background()
	remote := newLocal(t, "")
	rt := cache.NewReadThroughOptions(newLocal(t, ""), remote, cache.ReadThroughOptions{HandoffBytes: mib + mib/2}) // the newest blob is held; the next fetch drops it
	const blobs = 12
	datas := make([][]byte, blobs)
	ds := make([]*repb.Digest, blobs)
	for i := range datas {
		datas[i] = randBytes(uint64(100+i), mib+4096*i)
		ds[i] = put(t, remote, datas[i])
	}

	// A lent buffer stays as it is while the blob's buffer is dropped
	// and later fetches run.
	first, err := rt.Open(ctx, ns, ds[0])
	if err != nil {
		t.Fatal(err)
	}
	err = first.WithContents(func(c cache.Contents) error {
		if c.Mem == nil {
			return fmt.Errorf("a blob just fetched lends no memory (file %v)", c.File != nil)
		}
		for _, d := range ds[1:4] {
			if err := rt.Fetch(ctx, ns, d); err != nil {
				return err
			}
		}
		if !bytes.Equal(c.Mem, datas[0]) {
			return fmt.Errorf("the lent bytes changed while later blobs were fetched")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// Dropped by now: the blob lends the local tier's file.
	for i := 4; i < 6; i++ {
		if err := rt.Fetch(ctx, ns, ds[i]); err != nil {
			t.Fatal(err)
		}
	}
	if err := first.WithContents(func(c cache.Contents) error {
		if c.File == nil && c.Mem == nil {
			return fmt.Errorf("the blob lends nothing")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	checkBlob(t, first, datas[0])
	first.Close()

	// Readers of every blob race the fetches that recycle the buffers.
	var wg sync.WaitGroup
	errs := make(chan error, blobs)
	for i := 6; i < blobs; i++ {
		b, err := rt.Open(ctx, ns, ds[i])
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer b.Close()
			got := make([]byte, b.Size())
			for range 5 {
				if _, err := b.ReadAt(got, 0); err != nil && err != io.EOF {
					errs <- err
					return
				}
				if !bytes.Equal(got, datas[i]) {
					errs <- fmt.Errorf("blob %d read other bytes", i)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func checkBlob(t *testing.T, b cache.Blob, want []byte) {
	t.Helper()
	got := make([]byte, b.Size())
	if _, err := b.ReadAt(got, 0); err != nil && err != io.EOF {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("blob read other bytes")
	}
}

// TestReadAllFitsTheBlob: a whole blob is read into exactly its size (no
// buffer grown to twice the blob to find the end of the stream).
func TestReadAllFitsTheBlob(t *testing.T) {
	c := newLocal(t, "")
	for _, n := range []int{1, 4096, mib + 3} {
		data := randBytes(uint64(n), n)
		d := put(t, c, data)
		got, err := cache.ReadAll(context.Background(), c, ns, d)
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("%d bytes: %v", n, err)
		}
		if cap(got) != n {
			t.Errorf("%d bytes read into a buffer of %d", n, cap(got))
		}
	}
}
