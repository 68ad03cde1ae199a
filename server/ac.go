package server

import (
	"context"
	"fmt"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
)

// GetActionResult returns an action-cache entry of the caller's group, or
// NotFound when it is absent or any blob it references is gone.
func (s *Server) GetActionResult(ctx context.Context, req *repb.GetActionResultRequest) (_ *repb.ActionResult, err error) {
	defer s.m.observe("GetActionResult", time.Now(), &err)
	ns, _, err := s.namespace(ctx, req.InstanceName, req.DigestFunction)
	if err != nil {
		return nil, err
	}
	if err := digest.Validate(req.ActionDigest); err != nil {
		return nil, err
	}
	ar, err := s.backend.GetActionResult(ctx, ns, req.ActionDigest)
	if err == nil {
		err = s.complete(ctx, ns, ar)
	}
	if err != nil {
		if status.Code(err) == codes.NotFound {
			s.m.acLookup(false)
		}
		return nil, fmt.Errorf("getting action result %s: %w", digest.String(req.ActionDigest), err)
	}
	s.m.acLookup(true)
	s.reads.record(readKey{ns.Group, ns.Instance, req.ActionDigest.GetHash()}, time.Now())
	return ar, nil
}

// complete checks that every blob ar references is present: output files,
// stdout/stderr, output directory trees and every file inside them.
func (s *Server) complete(ctx context.Context, ns cache.Namespace, ar *repb.ActionResult) error {
	var ds []*repb.Digest
	add := func(d *repb.Digest) {
		if d != nil && d.SizeBytes > 0 {
			ds = append(ds, d)
		}
	}
	for _, f := range ar.OutputFiles {
		add(f.Digest)
	}
	add(ar.StdoutDigest)
	add(ar.StderrDigest)
	var trees []*repb.Digest
	for _, d := range ar.OutputDirectories {
		if d.TreeDigest == nil {
			return status.Errorf(codes.NotFound, "output directory %q has no tree digest", d.Path)
		}
		add(d.TreeDigest)
		trees = append(trees, d.TreeDigest)
	}
	if err := s.allPresent(ctx, ns, ds); err != nil {
		return err
	}
	ds = ds[:0]
	for _, td := range trees {
		if td.SizeBytes == 0 {
			continue
		}
		b, err := s.readVerified(ctx, ns, td)
		if err != nil {
			return fmt.Errorf("reading output tree %s: %w", digest.String(td), err)
		}
		t := &repb.Tree{}
		if err := proto.Unmarshal(b, t); err != nil {
			return status.Errorf(codes.NotFound, "output tree %s is not a Tree: %v", digest.String(td), err)
		}
		for _, dir := range append([]*repb.Directory{t.Root}, t.Children...) {
			for _, f := range dir.GetFiles() {
				add(f.Digest)
			}
		}
	}
	return s.allPresent(ctx, ns, ds)
}

func (s *Server) allPresent(ctx context.Context, ns cache.Namespace, ds []*repb.Digest) error {
	if len(ds) == 0 {
		return nil
	}
	for _, d := range ds {
		if err := digest.Validate(d); err != nil {
			return status.Errorf(codes.NotFound, "entry references a malformed digest: %v", err)
		}
	}
	missing, err := s.backend.FindMissing(ctx, ns, ds)
	if err != nil {
		return err
	}
	if len(missing) > 0 {
		return status.Errorf(codes.NotFound, "%d referenced blobs are missing, e.g. %s", len(missing), digest.String(missing[0]))
	}
	return nil
}

// UpdateActionResult stores an action-cache entry for the caller's group.
func (s *Server) UpdateActionResult(ctx context.Context, req *repb.UpdateActionResultRequest) (_ *repb.ActionResult, err error) {
	defer s.m.observe("UpdateActionResult", time.Now(), &err)
	ns, c, err := s.namespace(ctx, req.InstanceName, req.DigestFunction)
	if err != nil {
		return nil, err
	}
	if err := c.checkWrite("updating action result"); err != nil {
		return nil, err
	}
	if err := digest.Validate(req.ActionDigest); err != nil {
		return nil, err
	}
	if req.ActionResult == nil {
		return nil, status.Errorf(codes.InvalidArgument, "action result %s: missing action_result", digest.String(req.ActionDigest))
	}
	if err := s.backend.UpdateActionResult(ctx, ns, req.ActionDigest, req.ActionResult); err != nil {
		return nil, fmt.Errorf("updating action result %s: %w", digest.String(req.ActionDigest), err)
	}
	return req.ActionResult, nil
}
