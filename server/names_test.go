package server

import (
	"strings"
	"testing"

	"github.com/snaploader/snaploader/digest"
)

func TestParseNames(t *testing.T) {
	h := strings.Repeat("0a", 32)
	for _, tc := range []struct {
		name       string
		write      bool
		ok         bool
		instance   string
		compressed bool
		fn         digest.Function
	}{
		{name: "blobs/" + h + "/5", ok: true, fn: digest.SHA256},
		{name: "a/b/blobs/blake3/" + h + "/5", ok: true, instance: "a/b", fn: digest.BLAKE3},
		{name: "i/compressed-blobs/zstd/" + h + "/0", ok: true, instance: "i", compressed: true, fn: digest.SHA256},
		{name: "uploads/u-1/blobs/" + h + "/5", write: true, ok: true, fn: digest.SHA256},
		{name: "x/uploads/u/compressed-blobs/zstd/blake3/" + h + "/5/meta", write: true, ok: true, instance: "x", compressed: true, fn: digest.BLAKE3},
		{name: "blobs/" + h + "/5/extra"},
		{name: "../blobs/" + h + "/5"},
		{name: "a/../blobs/" + h + "/5"},
		{name: "a//b/blobs/" + h + "/5"},
		{name: "/blobs/" + h + "/5"},
		{name: "./blobs/" + h + "/5"},
		{name: "a\\b/blobs/" + h + "/5"},
		{name: "a\x00/blobs/" + h + "/5"},
		{name: "blobs/" + strings.ToUpper(h) + "/5"},
		{name: "blobs/" + h[:62] + "/5"},
		{name: "blobs/../../" + h + "/5"},
		{name: "blobs/" + h + "/-1"},
		{name: "blobs/" + h + "/05"},
		{name: "blobs/" + h + "/99999999999999999999"},
		{name: "blobs/md5/" + h + "/5"},
		{name: "compressed-blobs/gzip/" + h + "/5"},
		{name: "blobs/" + h},
		{name: h + "/5"},
		{name: "uploads/../blobs/" + h + "/5", write: true},
		{name: "uploads/u/blobs/" + h + "/5/../../x", write: true},
		{name: "uploads/u/" + h + "/5", write: true},
		{name: "blobs/" + h + "/5", write: true},
	} {
		var r *resource
		var err error
		if tc.write {
			r, _, err = parseWrite(tc.name)
		} else {
			r, err = parseRead(tc.name)
		}
		if (err == nil) != tc.ok {
			t.Errorf("%q: err %v, want ok=%v", tc.name, err, tc.ok)
			continue
		}
		if err == nil && (r.instance != tc.instance || r.compressed != tc.compressed || r.fn != tc.fn) {
			t.Errorf("%q: got %+v", tc.name, r)
		}
	}
}
