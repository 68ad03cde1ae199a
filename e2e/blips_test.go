package e2e

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/snaploader/snaploader/internal/toxic"
)

// A cold `snaploader restore` through a serve on a slow link, disturbed in
// the middle for two seconds: the serve killed and restarted, its
// connections reset, or the link stalled. Each restore rides the blip out
// (its fetches retry and resume, verified) and writes the snapshot's bytes.
func TestRestoreRidesOutBlips(t *testing.T) {
	ctx := ctxT(t)
	dir := t.TempDir()
	srv := startServe(t, nil, "--cache-dir", filepath.Join(dir, "serve"))
	mem := filepath.Join(dir, "mem.img")
	want := writeVM(t, mem, 24<<20, 31)
	key := []string{"--instance", "ci", "--platform", "os=linux", "--config-hash", "c1", "--ref", "main"}
	run(ctx, append([]string{"save", "--cache-dir", filepath.Join(dir, "a"), "--chunked", "mem.img=" + mem, "--remote", srv.url()}, key...)...).must(t, "save through serve")

	proxy := toxic.Start(t, srv.addr)
	// About 8 MB/s: the restore takes a few seconds, so the blip lands in
	// the middle of it.
	proxy.Add(t, "bandwidth", "downstream", `"rate":8000`)
	for _, tc := range blipKinds(srv, proxy) {
		t.Run(tc.name, func(t *testing.T) {
			out := filepath.Join(dir, "out-"+strings.ReplaceAll(tc.name, " ", "-"))
			args := append([]string{"restore", "--json", "--cache-dir", filepath.Join(dir, "cold-"+strings.ReplaceAll(tc.name, " ", "-")),
				"--out", out, "--remote", "grpc://" + proxy.Addr(), "--remote-retry-for", "30s"}, key...)
			done := make(chan cliResult, 1)
			go func() { done <- run(ctx, args...) }()
			time.Sleep(time.Second)
			end := tc.start(t)
			time.Sleep(blipFor)
			end()
			r := (<-done).must(t, fmt.Sprintf("restore across a blip (%s)", tc.name))
			if rep := r.report(t); rep["source"] != "remote" {
				t.Errorf("restore reported %v, want it served by the remote", rep)
			}
			if got, err := os.ReadFile(filepath.Join(out, "mem.img")); err != nil || !bytes.Equal(got, want) {
				t.Fatalf("restored bytes differ after a blip (%s): %v", tc.name, err)
			}
		})
	}
}

// blip is one way a remote goes away for a while: start begins it and
// returns the function that ends it.
type blip struct {
	name  string
	start func(t *testing.T) (end func())
	// fails: calls under way fail and are retried (a stall shorter than
	// the attempt timeout only delays them).
	fails bool
}

// blipKinds are the blips a client of srv through proxy rides out: srv
// killed and restarted, every connection through the proxy reset, and the
// link stalled (no byte passes, connections stay open).
func blipKinds(srv *server, proxy *toxic.Proxy) []blip {
	return []blip{
		{"serve restarted", func(t *testing.T) func() {
			srv.stop()
			return func() { srv.start(t) }
		}, true},
		{"connections reset", func(t *testing.T) func() {
			name := proxy.Add(t, "reset_peer", "downstream", `"timeout":0`)
			return func() { proxy.Remove(t, name) }
		}, true},
		{"link stalled", func(t *testing.T) func() {
			name := proxy.Add(t, "timeout", "downstream", `"timeout":0`)
			return func() { proxy.Remove(t, name) }
		}, false},
	}
}

// A host with ordered remotes whose first is dead restores from the second;
// its save publishes to the second too (the first writable one that is up).
func TestOrderedRemotesFirstDead(t *testing.T) {
	ctx := ctxT(t)
	dir := t.TempDir()
	srv := startServe(t, nil, "--cache-dir", filepath.Join(dir, "serve"))
	dead := fmt.Sprintf("grpc://127.0.0.1:%d", freePort(t))
	mem := filepath.Join(dir, "mem.img")
	want := writeVM(t, mem, 2<<20, 32)
	key := []string{"--instance", "ci", "--platform", "os=linux", "--config-hash", "c1", "--ref", "main", "--remote", dead, "--remote", srv.url()}
	saved := run(ctx, append([]string{"save", "--json", "--cache-dir", filepath.Join(dir, "a"), "--chunked", "mem.img=" + mem, "--chunk-size", "65536"}, key...)...).must(t, "save with the first remote dead")
	if rep := saved.report(t); rep["published_remote"] != true {
		t.Fatalf("save reported %v, want it published to the second remote", rep)
	}
	out := filepath.Join(dir, "out")
	r := run(ctx, append([]string{"restore", "--json", "--cache-dir", filepath.Join(dir, "b"), "--out", out}, key...)...).must(t, "restore with the first remote dead")
	rep := r.report(t)
	if rep["source"] != "remote" {
		t.Errorf("restore reported %v, want it served by a remote", rep)
	}
	if served, _ := rep["remotes_served"].([]any); len(served) != 1 || served[0] != srv.url() {
		t.Errorf("remotes_served = %v, want only the second remote %s", rep["remotes_served"], srv.url())
	}
	if got, err := os.ReadFile(filepath.Join(out, "mem.img")); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("restored bytes differ: %v", err)
	}
}
