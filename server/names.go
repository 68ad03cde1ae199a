package server

import (
	"fmt"
	"strconv"
	"strings"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/digest"
)

// reserved are the path segments an instance name may not contain (REAPI).
var reserved = map[string]bool{
	"blobs": true, "uploads": true, "actions": true, "actionResults": true,
	"operations": true, "capabilities": true, "compressed-blobs": true,
}

// resource is a parsed ByteStream resource name.
type resource struct {
	instance   string
	compressed bool // zstd compressed-blobs
	fn         digest.Function
	d          *repb.Digest
}

// checkInstance rejects instance names that are malformed or could
// traverse paths: empty segments, "." and "..", reserved words, control
// characters and backslashes.
func checkInstance(instance string) error {
	if instance == "" {
		return nil
	}
	if len(instance) > 1024 {
		return fmt.Errorf("instance name is longer than 1024 bytes")
	}
	for _, seg := range strings.Split(instance, "/") {
		if err := checkSegment(seg); err != nil {
			return fmt.Errorf("instance name %q: %w", instance, err)
		}
		if reserved[seg] {
			return fmt.Errorf("instance name %q: segment %q is reserved", instance, seg)
		}
	}
	return nil
}

func checkSegment(seg string) error {
	if seg == "" || seg == "." || seg == ".." {
		return fmt.Errorf("bad path segment %q", seg)
	}
	for _, c := range seg {
		if c < 0x20 || c == 0x7f || c == '\\' {
			return fmt.Errorf("path segment %q has a forbidden character", seg)
		}
	}
	return nil
}

// parseRead parses "{instance}/blobs/{fn/}{hash}/{size}" or
// "{instance}/compressed-blobs/zstd/{fn/}{hash}/{size}".
func parseRead(name string) (*resource, error) {
	segs := strings.Split(name, "/")
	for i, s := range segs {
		if s == "blobs" || s == "compressed-blobs" {
			r, err := parseBlob(segs[:i], segs[i:], false)
			if err != nil {
				return nil, badName(name, err)
			}
			return r, nil
		}
	}
	return nil, badName(name, fmt.Errorf("no blobs segment"))
}

// parseWrite parses "{instance}/uploads/{uuid}/blobs/{fn/}{hash}/{size}{/meta}"
// and its compressed-blobs form. It returns the resource and the upload id.
func parseWrite(name string) (*resource, string, error) {
	segs := strings.Split(name, "/")
	for i, s := range segs {
		if s != "uploads" {
			continue
		}
		if i+2 >= len(segs) {
			break
		}
		id := segs[i+1]
		if err := checkSegment(id); err != nil || len(id) > 128 {
			return nil, "", badName(name, fmt.Errorf("bad upload id %q", id))
		}
		r, err := parseBlob(segs[:i], segs[i+2:], true)
		if err != nil {
			return nil, "", badName(name, err)
		}
		return r, id, nil
	}
	return nil, "", badName(name, fmt.Errorf("no uploads/{uuid}/ segment"))
}

func badName(name string, err error) error {
	if len(name) > 300 {
		name = name[:300] + "..."
	}
	return status.Errorf(codes.InvalidArgument, "resource name %q: %v", name, err)
}

// parseBlob parses the instance segments and the "blobs/..." or
// "compressed-blobs/..." tail.
func parseBlob(inst, tail []string, metaAllowed bool) (*resource, error) {
	r := &resource{instance: strings.Join(inst, "/")}
	if len(inst) > 0 && r.instance == "" {
		return nil, fmt.Errorf("leading slash")
	}
	if err := checkInstance(r.instance); err != nil {
		return nil, err
	}
	if tail[0] == "compressed-blobs" {
		if len(tail) < 2 || tail[1] != "zstd" {
			return nil, fmt.Errorf("unsupported compressor")
		}
		r.compressed = true
		tail = tail[2:]
	} else {
		tail = tail[1:]
	}
	r.fn = digest.SHA256
	if len(tail) > 0 && len(tail[0]) != digest.HashLen {
		switch tail[0] {
		case "blake3":
			r.fn = digest.BLAKE3
		case "sha256":
			// Tolerated although REAPI says to omit it.
		default:
			return nil, fmt.Errorf("unsupported digest function %q", tail[0])
		}
		tail = tail[1:]
	}
	if len(tail) < 2 {
		return nil, fmt.Errorf("missing hash or size")
	}
	if len(tail) > 2 {
		if !metaAllowed {
			return nil, fmt.Errorf("trailing path segments")
		}
		for _, s := range tail[2:] {
			if err := checkSegment(s); err != nil {
				return nil, err
			}
		}
	}
	size, err := strconv.ParseInt(tail[1], 10, 64)
	if err != nil || size < 0 || strconv.FormatInt(size, 10) != tail[1] {
		return nil, fmt.Errorf("bad size %q", tail[1])
	}
	r.d = &repb.Digest{Hash: tail[0], SizeBytes: size}
	if err := digest.Validate(r.d); err != nil {
		return nil, err
	}
	return r, nil
}
