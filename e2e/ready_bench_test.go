package e2e

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/snaploader/snaploader/internal/testutil"
	"github.com/snaploader/snaploader/internal/toxic"
)

// bucketModel puts the bucket model in front of m: a proxy adding 50 ms
// to every answer (to first byte) and capping each connection at 100 MB/s.
func bucketModel(b testing.TB, m testutil.MinIO) *toxic.Proxy {
	b.Helper()
	p := toxic.Start(b, m.Endpoint)
	p.Add(b, "latency", "downstream", `"latency": 50`)
	p.Add(b, "bandwidth", "downstream", `"rate": 100000`)
	return p
}

// baselineBinary builds cmd/snaploader at revision rev of this repository
// (SNAPLOADER_BENCH_BASELINE), "" when unset.
func baselineBinary(b testing.TB) string {
	b.Helper()
	rev := os.Getenv("SNAPLOADER_BENCH_BASELINE")
	if rev == "" {
		return ""
	}
	src := b.TempDir()
	archive := exec.Command("git", "archive", rev)
	archive.Dir = ".."
	var tarball, errb bytes.Buffer
	archive.Stdout, archive.Stderr = &tarball, &errb
	if err := archive.Run(); err != nil {
		b.Fatalf("git archive %s: %v\n%s", rev, err, errb.String())
	}
	untar := exec.Command("tar", "-x", "-C", src)
	untar.Stdin = &tarball
	if out, err := untar.CombinedOutput(); err != nil {
		b.Fatalf("unpacking %s: %v\n%s", rev, err, out)
	}
	bin := filepath.Join(b.TempDir(), "snaploader-"+rev)
	build := exec.Command("go", "build", "-o", bin, "./cmd/snaploader")
	build.Dir = src
	if out, err := build.CombinedOutput(); err != nil {
		b.Fatalf("building %s: %v\n%s", rev, err, out)
	}
	return bin
}

// timedRun runs bin with args and env and returns how long it took from
// start to exit.
func timedRun(b testing.TB, bin string, env []string, args ...string) time.Duration {
	b.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), env...)
	var errb bytes.Buffer
	cmd.Stderr = &errb
	start := time.Now()
	err := cmd.Run()
	d := time.Since(start)
	if err != nil {
		b.Fatalf("%s %s: %v\n%s", filepath.Base(bin), strings.Join(args, " "), err, errb.String())
	}
	return d
}

// bucketKey is the key of the snapshots the bucket benchmarks and tests
// save and restore (with --ref and --default-ref added).
var bucketKey = []string{"--instance", "ci", "--platform", "os=linux", "--config-hash", "c1"}

// bucketEnv gives the snaploader processes m's credentials and no
// region or profile of the machine's.
func bucketEnv(m testutil.MinIO) []string {
	return []string{"AWS_ACCESS_KEY_ID=" + m.AccessKey, "AWS_SECRET_ACCESS_KEY=" + m.SecretKey, "AWS_REGION=", "AWS_PROFILE="}
}

// saveOneFile saves a snapshot of one file of size random bytes under ref
// main to url with the binary under test and returns the bytes.
func saveOneFile(t testing.TB, env []string, url, dir string, size int) []byte {
	t.Helper()
	state := filepath.Join(dir, "vmstate")
	data := make([]byte, size)
	rand.Read(data)
	if err := os.WriteFile(state, data, 0o644); err != nil {
		t.Fatal(err)
	}
	timedRun(t, binary, env, append([]string{"save", "--remote", url, "--cache-dir", filepath.Join(dir, "saver"), "--ref", "main", "--file", "vmstate=" + state}, bucketKey...)...)
	return data
}

// seeVersion runs a restore of a key without snapshot with bin, which
// leaves the key's version id in the cache at dir.
func seeVersion(t testing.TB, bin string, env []string, url, cache, out string) {
	t.Helper()
	cmd := exec.Command(bin, append([]string{"restore", "--remote", url, "--cache-dir", cache, "--ref", "nothing-here", "--out", out}, bucketKey...)...)
	cmd.Env = append(os.Environ(), env...)
	// Exit 3 (1 before exit codes had kinds): nothing to restore.
	if out, err := cmd.CombinedOutput(); err == nil || !bytes.Contains(out, []byte("no snapshot for")) {
		t.Fatalf("restore of a key without snapshot: %v (want no snapshot)\n%s", err, out)
	}
}

// BenchmarkRestoreToReadyFromBucket runs `snaploader restore --remote
// s3://...` of a one-file snapshot (256 KiB) found through one fallback
// key (the branch key misses, the default branch's key hits), as a whole
// process from start to exit, against MinIO behind the bucket model (50 ms
// to first byte, 100 MB/s per connection) and against MinIO directly, and
// counts the requests MinIO received per API. Two hosts: a cold one (empty
// cache) and one that has seen the key's version before (its cache holds
// the version entry only), each with the bucket's region in the URL or not
// (the client then asks for it first). With SNAPLOADER_BENCH_BASELINE=REV the binary of
// that revision runs the same cases, interleaved, for an A/B in one run, and
// with SNAPLOADER_BENCH_OTHER=NAME=PATH the binary at PATH too.
// Reported per binary and host: ms at 50 ms (median and fastest), ms
// without latency, the difference of the fastest runs in 50-ms round trips,
// and requests per restore (-v prints them as a table).
//
//	SNAPLOADER_BENCH_BASELINE=6a03955 go test -run '^$' -bench RestoreToReadyFromBucket -benchtime 10x -v ./e2e/
func BenchmarkRestoreToReadyFromBucket(b *testing.B) {
	m := testutil.StartMinIO(b)
	bucket := m.NewBucket(b)
	proxy := bucketModel(b, m)
	env := bucketEnv(m)
	url := func(endpoint string) string {
		return fmt.Sprintf("s3://%s/ready?endpoint=%s&secure=false", bucket, endpoint)
	}
	regionURL := func(endpoint string, region bool) string {
		if region {
			return url(endpoint) + "&region=us-east-1"
		}
		return url(endpoint)
	}
	dir := b.TempDir()
	data := saveOneFile(b, env, url(m.Endpoint), dir, 256<<10)

	bins := []struct{ name, path string }{{"new", binary}}
	if old := baselineBinary(b); old != "" {
		bins = append(bins, struct{ name, path string }{"base", old})
	}
	if other := os.Getenv("SNAPLOADER_BENCH_OTHER"); other != "" {
		name, path, ok := strings.Cut(other, "=")
		if !ok || name == "" || path == "" {
			b.Fatalf("SNAPLOADER_BENCH_OTHER=%q: want NAME=PATH of a snaploader binary", other)
		}
		bins = append(bins, struct{ name, path string }{name, path})
	}
	// A host that has seen the version: its cache holds the version entry
	// a restore of a key without snapshot left behind.
	primed := map[string]string{}
	for _, bin := range bins {
		p := filepath.Join(dir, "primed-"+bin.name)
		seeVersion(b, bin.path, env, url(m.Endpoint), p, filepath.Join(dir, "nothing-"+bin.name))
		primed[bin.name] = p
	}

	type kase struct {
		bin, host string
		region    bool
		latency   bool
		ms        []time.Duration
		reqs      []map[string]float64
	}
	var cases []*kase
	for _, bin := range bins {
		for _, host := range []string{"cold", "seen"} {
			for _, region := range []bool{false, true} {
				for _, lat := range []bool{true, false} {
					cases = append(cases, &kase{bin: bin.name, host: host, region: region, latency: lat})
				}
			}
		}
	}
	binPath := map[string]string{}
	for _, bin := range bins {
		binPath[bin.name] = bin.path
	}
	run := 0
	one := func(k *kase) {
		run++
		cache := filepath.Join(dir, fmt.Sprintf("cache-%d", run))
		if k.host == "seen" {
			if out, err := exec.Command("cp", "-a", primed[k.bin], cache).CombinedOutput(); err != nil {
				b.Fatalf("copying the primed cache: %v\n%s", err, out)
			}
		}
		endpoint := m.Endpoint
		if k.latency {
			endpoint = proxy.Addr()
		}
		args := append([]string{"restore", "--remote", regionURL(endpoint, k.region), "--cache-dir", cache, "--ref", "feature", "--default-ref", "main",
			"--out", filepath.Join(dir, fmt.Sprintf("out-%d", run))}, bucketKey...)
		before := minioRequests(b, m)
		d := timedRun(b, binPath[k.bin], env, args...)
		after := minioRequests(b, m)
		got, err := os.ReadFile(filepath.Join(dir, fmt.Sprintf("out-%d", run), "vmstate"))
		if err != nil || !bytes.Equal(got, data) {
			b.Fatalf("%s restored vmstate differs (err %v)", k.bin, err)
		}
		diff := map[string]float64{}
		for api, n := range after {
			if d := n - before[api]; d > 0 {
				diff[api] = d
			}
		}
		k.ms = append(k.ms, d)
		k.reqs = append(k.reqs, diff)
		os.RemoveAll(cache)
		os.RemoveAll(filepath.Join(dir, fmt.Sprintf("out-%d", run)))
	}
	for _, k := range cases { // warm-up: page cache, binaries, connections of MinIO
		one(k)
		k.ms, k.reqs = nil, nil
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for j := range cases {
			one(cases[(i+j)%len(cases)])
		}
	}
	b.StopTimer()
	byName := map[string]*kase{}
	for _, k := range cases {
		byName[fmt.Sprintf("%s/%s/%v/%v", k.bin, k.host, k.region, k.latency)] = k
	}
	var table strings.Builder
	fmt.Fprintf(&table, "\n| binary | host | ms at 50 ms: median (min-max) | ms without latency: median (min) | 50-ms trips (from the minimums) | requests (median per restore) |\n|---|---|---|---|---|---|\n")
	for _, bin := range bins {
		for _, hr := range []struct {
			host   string
			region bool
		}{{"cold", false}, {"seen", false}, {"cold", true}, {"seen", true}} {
			host := hr.host
			if hr.region {
				host += "+region"
			}
			slow := byName[fmt.Sprintf("%s/%s/%v/true", bin.name, hr.host, hr.region)]
			fast := byName[fmt.Sprintf("%s/%s/%v/false", bin.name, hr.host, hr.region)]
			ms, ms0 := median(slow.ms), median(fast.ms)
			// From the fastest runs: a loaded machine adds time to some
			// runs, never removes any.
			trips := float64(slices.Min(slow.ms)-slices.Min(fast.ms)) / float64(50*time.Millisecond)
			reqs := medianRequests(slow.reqs)
			total := 0.0
			var parts []string
			for _, api := range sortedKeys(reqs) {
				total += reqs[api]
				parts = append(parts, fmt.Sprintf("%s %.0f", api, reqs[api]))
			}
			fmt.Fprintf(&table, "| %s | %s | %d (%d-%d) | %d (%d) | %.1f | %.0f: %s |\n", bin.name, host, ms.Milliseconds(),
				slices.Min(slow.ms).Milliseconds(), slices.Max(slow.ms).Milliseconds(), ms0.Milliseconds(), slices.Min(fast.ms).Milliseconds(), trips, total, strings.Join(parts, ", "))
			b.ReportMetric(float64(ms.Microseconds())/1000, bin.name+"-"+host+"-ms")
			b.ReportMetric(float64(slices.Min(slow.ms).Microseconds())/1000, bin.name+"-"+host+"-ms-min")
			b.ReportMetric(float64(ms0.Microseconds())/1000, bin.name+"-"+host+"-ms-no-latency")
			b.ReportMetric(trips, bin.name+"-"+host+"-trips")
			b.ReportMetric(total, bin.name+"-"+host+"-requests")
		}
	}
	b.Log(table.String())
}

// medianRequests is the per-API median of request counts.
func medianRequests(runs []map[string]float64) map[string]float64 {
	apis := map[string]bool{}
	for _, r := range runs {
		for api := range r {
			apis[api] = true
		}
	}
	out := map[string]float64{}
	for api := range apis {
		var xs []float64
		for _, r := range runs {
			xs = append(xs, r[api])
		}
		sort.Float64s(xs)
		if v := xs[len(xs)/2]; v > 0 {
			out[api] = v
		}
	}
	return out
}

func sortedKeys[V any](m map[string]V) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

// minioRequests is m.Requests, failing b on an error.
func minioRequests(b testing.TB, m testutil.MinIO) map[string]float64 {
	b.Helper()
	r, err := m.Requests()
	if err != nil {
		b.Fatal(err)
	}
	return r
}

// TestRestoreFromBucketRequestBudget: a restore of a one-file snapshot
// found through a fallback key, from a bucket whose region the URL names,
// by a host that saw the key's version before, sends MinIO at most: one
// bucket check, the version entry and both keys' manifests under both
// digest functions (5 GETs, together), and one read of the file (a GET,
// and a HEAD while reads ask for the object's size first); nothing is
// asked about the file before it is read, and the region is never asked.
func TestRestoreFromBucketRequestBudget(t *testing.T) {
	m := testutil.StartMinIO(t)
	bucket := m.NewBucket(t)
	env := bucketEnv(m)
	url := fmt.Sprintf("s3://%s/budget?endpoint=%s&secure=false&region=us-east-1", bucket, m.Endpoint)
	dir := t.TempDir()
	data := saveOneFile(t, env, url, dir, 64<<10)
	host := filepath.Join(dir, "host")
	seeVersion(t, binary, env, url, host, filepath.Join(dir, "none"))

	before, err := m.Requests()
	if err != nil {
		t.Fatal(err)
	}
	cli(t, env, append([]string{"restore", "--remote", url, "--cache-dir", host, "--ref", "feature", "--default-ref", "main", "--out", filepath.Join(dir, "out")}, bucketKey...)...)
	after, err := m.Requests()
	if err != nil {
		t.Fatal(err)
	}
	if got, err := os.ReadFile(filepath.Join(dir, "out", "vmstate")); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("restored vmstate differs (err %v)", err)
	}
	reqs := map[string]float64{}
	for api, n := range after {
		if d := n - before[api]; d > 0 {
			reqs[api] = d
		}
	}
	budget := map[string]float64{"HeadBucket": 1, "GetObject": 6, "HeadObject": 1}
	for api, n := range reqs {
		if n > budget[api] {
			t.Errorf("%v %s requests, want at most %v (all: %v)", n, api, budget[api], reqs)
		}
	}
}
