package cachetest

import (
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/protobuf/proto"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
)

// entryKey is the action-cache key named name.
func entryKey(name string) *repb.Digest {
	return &repb.Digest{Hash: digest.StringListHash("cachetest", name), SizeBytes: 1}
}

// entry stores an output blob in ns and returns an entry naming it, as a
// snapshot manifest names its files (tiers that check that an entry's
// blobs are present find it).
func entry(t *testing.T, c cache.Cache, ns cache.Namespace, tag string) *repb.ActionResult {
	t.Helper()
	d := write(t, c, ns, []byte("the output of "+tag))
	return &repb.ActionResult{
		ExitCode:    int32(len(tag)),
		StdoutRaw:   []byte(tag),
		OutputFiles: []*repb.OutputFile{{Path: "out/" + tag, Digest: d}},
	}
}

func update(t *testing.T, c cache.Cache, ns cache.Namespace, key *repb.Digest, ar *repb.ActionResult) {
	t.Helper()
	if err := c.UpdateActionResult(ctxT(t), ns, key, ar); err != nil {
		t.Fatalf("UpdateActionResult %s: %v", digest.String(key), err)
	}
}

// mustGet fails t unless the entry under key in ns is want.
func mustGet(t *testing.T, c cache.Cache, ns cache.Namespace, key *repb.Digest, want *repb.ActionResult) {
	t.Helper()
	got, err := c.GetActionResult(ctxT(t), ns, key)
	if err != nil {
		t.Fatalf("GetActionResult %s (group %q, instance %q, %v): %v", digest.String(key), ns.Group, ns.Instance, ns.Function, err)
	}
	if !proto.Equal(got, want) {
		t.Fatalf("GetActionResult %s (group %q, instance %q, %v) = %v, want %v", digest.String(key), ns.Group, ns.Instance, ns.Function, got, want)
	}
}

func (s *suite) actionCache(t *testing.T) {
	key := entryKey("manifest")
	t.Run("round trip", func(t *testing.T) {
		c := s.h.New(t).Cache
		ns := s.ns()
		ar := entry(t, c, ns, "first")
		update(t, c, ns, key, ar)
		mustGet(t, c, ns, key, ar)
	})
	t.Run("reopened", func(t *testing.T) {
		tier := s.h.New(t)
		if tier.Reopen == nil {
			t.Skip("the harness cannot reopen the tier")
		}
		ns := s.ns()
		ar := entry(t, tier.Cache, ns, "first")
		update(t, tier.Cache, ns, key, ar)
		mustGet(t, tier.Reopen(t), ns, key, ar)
	})
	t.Run("replace", func(t *testing.T) {
		c := s.h.New(t).Cache
		ns := s.ns()
		update(t, c, ns, key, entry(t, c, ns, "first"))
		second := entry(t, c, ns, "second")
		update(t, c, ns, key, second)
		mustGet(t, c, ns, key, second)
	})
	t.Run("namespaces", func(t *testing.T) {
		ns := s.ns()
		type namespace struct {
			name string
			ns   cache.Namespace
		}
		others := []namespace{
			{"other instance", cache.Namespace{Group: ns.Group, Instance: "ci/other", Function: ns.Function}},
			{"no instance", cache.Namespace{Group: ns.Group, Function: ns.Function}},
		}
		if !s.h.GroupFromCredentials {
			others = append(others,
				namespace{"other group", cache.Namespace{Group: ns.Group + "-b", Instance: ns.Instance, Function: ns.Function}},
				namespace{"anonymous group", cache.Namespace{Instance: ns.Instance, Function: ns.Function}})
		}
		for _, fn := range s.h.Functions[1:] {
			others = append(others, namespace{"function " + digest.FunctionName(fn), cache.Namespace{Group: ns.Group, Instance: ns.Instance, Function: fn}})
		}
		for _, o := range others {
			t.Run(o.name, func(t *testing.T) {
				c := s.h.New(t).Cache
				mine := entry(t, c, ns, "mine")
				update(t, c, ns, key, mine)
				_, err := c.GetActionResult(ctxT(t), o.ns, key)
				wantKind(t, err, errkind.NotFound, "GetActionResult in another namespace", key.Hash)
				theirs := entry(t, c, o.ns, "theirs")
				update(t, c, o.ns, key, theirs)
				mustGet(t, c, o.ns, key, theirs)
				mustGet(t, c, ns, key, mine)
			})
		}
	})
	t.Run("corrupt", func(t *testing.T) {
		tier := s.h.New(t)
		if tier.CorruptActionResult == nil {
			t.Skip("the harness cannot damage the tier's action-cache entries")
		}
		ns := s.ns()
		ar := entry(t, tier.Cache, ns, "first")
		update(t, tier.Cache, ns, key, ar)
		tier.CorruptActionResult(t, ns, key)
		c := tier.Cache
		if tier.Reopen != nil {
			c = tier.Reopen(t)
		}
		got, err := c.GetActionResult(ctxT(t), ns, key)
		if err == nil {
			t.Fatalf("GetActionResult of the damaged entry succeeded (equal to what was written: %v)", proto.Equal(got, ar))
		}
		wantKind(t, err, errkind.DataLoss, "GetActionResult of the damaged entry", key.Hash)
		// The next update repairs it.
		update(t, c, ns, key, ar)
		mustGet(t, c, ns, key, ar)
	})
}
