package e2e

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/snaploader/snaploader/internal/testutil"
	"github.com/snaploader/snaploader/internal/toxic"
)

// BenchmarkRestoreAcrossRestart: a cold `snaploader restore` of a
// SNAPLOADER_BENCH_MIB (default 128) MiB VM-like file through a serve on a
// link capped at about 20 MB/s (so it takes about 6 s), alone and, in
// alternation, with the serve killed 2 s into it and started again 5 s
// later. It reports both medians and the extra time of the disturbed one
// over the blip: riding out a blip should cost about the blip (ratio near
// 1), not a multiple of it.
//
//	go test -run '^$' -bench RestoreAcrossRestart -benchtime 3x ./e2e/
func BenchmarkRestoreAcrossRestart(b *testing.B) {
	const blipAt, blipFor = 2 * time.Second, 5 * time.Second
	size := testutil.BenchMiB(b, 128) << 20
	dir := b.TempDir()
	srv := startServe(b, nil, "--cache-dir", filepath.Join(dir, "serve"))
	mem := filepath.Join(dir, "mem.img")
	want := writeVM(b, mem, int(size), 51)
	key := []string{"--instance", "bench", "--platform", "os=linux", "--config-hash", "blip", "--ref", "main"}
	cmdline := func(args ...string) []string { return append(args, key...) }
	if r := run(b.Context(), cmdline("save", "--cache-dir", filepath.Join(dir, "a"), "--chunked", "mem.img="+mem, "--remote", srv.url())...); r.err != nil {
		b.Fatalf("save: %v\n%s", r.err, r.stderr)
	}
	os.Remove(mem)
	proxy := toxic.Start(b, srv.addr)
	proxy.Add(b, "bandwidth", "downstream", `"rate":20000`)

	round := 0
	restore := func(disturb bool) time.Duration {
		round++
		out := filepath.Join(dir, fmt.Sprintf("r%d", round))
		defer os.RemoveAll(out)
		back := make(chan struct{})
		if disturb {
			time.AfterFunc(blipAt, func() {
				defer close(back)
				srv.stop()
				time.Sleep(blipFor)
				srv.start(b)
			})
		} else {
			close(back)
		}
		start := time.Now()
		r := run(b.Context(), cmdline("restore", "--cache-dir", out+"-cache", "--out", out, "--remote", "grpc://"+proxy.Addr(), "--remote-retry-for", "30s")...)
		d := time.Since(start)
		<-back // the serve is up again before the next round
		os.RemoveAll(out + "-cache")
		if r.err != nil {
			b.Fatalf("restore (restart: %v): %v\n%s", disturb, r.err, r.stderr)
		}
		if got, err := os.ReadFile(filepath.Join(out, "mem.img")); err != nil || !bytes.Equal(got, want) {
			b.Fatalf("restore (restart: %v): the restored bytes differ from the saved ones (%v)", disturb, err)
		}
		return d
	}
	var calm, disturbed []time.Duration
	for b.Loop() {
		calm = append(calm, restore(false))
		disturbed = append(disturbed, restore(true))
	}
	extra := median(disturbed) - median(calm)
	b.ReportMetric(median(calm).Seconds(), "s-undisturbed")
	b.ReportMetric(median(disturbed).Seconds(), "s-with-5s-restart")
	b.ReportMetric(extra.Seconds(), "s-extra")
	b.ReportMetric(extra.Seconds()/blipFor.Seconds(), "extra/blip")
}
