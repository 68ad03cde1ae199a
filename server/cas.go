package server

import (
	"context"
	"fmt"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	spb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
)

// FindMissingBlobs reports which of the digests the backend lacks. The empty
// blob is always present.
func (s *Server) FindMissingBlobs(ctx context.Context, req *repb.FindMissingBlobsRequest) (_ *repb.FindMissingBlobsResponse, err error) {
	defer s.m.observe("FindMissingBlobs", time.Now(), &err)
	ns, _, err := s.namespace(ctx, req.InstanceName, req.DigestFunction)
	if err != nil {
		return nil, err
	}
	ds := make([]*repb.Digest, 0, len(req.BlobDigests))
	for _, d := range req.BlobDigests {
		if err := digest.Validate(d); err != nil {
			return nil, err
		}
		if d.SizeBytes > 0 {
			ds = append(ds, d)
		}
	}
	missing, err := s.backend.FindMissing(ctx, ns, ds)
	if err != nil {
		return nil, fmt.Errorf("finding missing blobs among %d: %w", len(ds), err)
	}
	s.m.lookups(len(ds), len(missing))
	return &repb.FindMissingBlobsResponse{MissingBlobDigests: missing}, nil
}

// rpcStatus is the per-blob status of a batch entry, sanitized like a
// call's error.
func (s *Server) rpcStatus(err error) *spb.Status {
	if err == nil {
		return &spb.Status{}
	}
	return status.Convert(s.san.clean(err)).Proto()
}

// BatchUpdateBlobs verifies and stores small blobs.
func (s *Server) BatchUpdateBlobs(ctx context.Context, req *repb.BatchUpdateBlobsRequest) (_ *repb.BatchUpdateBlobsResponse, err error) {
	defer s.m.observe("BatchUpdateBlobs", time.Now(), &err)
	ns, c, err := s.namespace(ctx, req.InstanceName, req.DigestFunction)
	if err != nil {
		return nil, err
	}
	if err := c.checkWrite("updating blobs"); err != nil {
		return nil, err
	}
	var total int64
	for _, r := range req.Requests {
		total += int64(len(r.Data))
	}
	if total > s.opts.MaxBatchBytes {
		return nil, status.Errorf(codes.InvalidArgument, "batch of %d bytes exceeds the limit of %d", total, s.opts.MaxBatchBytes)
	}
	s.m.in(int(total))
	// The request is in memory already: charge it to the upload budget
	// while it is stored, so that batches and streams share one bound,
	// and reserve the disk its blobs will take.
	release, err := s.mem.acquire(ctx, total, s.opts.IdleTimeout, "updating blobs")
	if err != nil {
		return nil, err
	}
	defer release()
	sp, err := s.reserve(total)
	if err != nil {
		return nil, fmt.Errorf("updating %d blobs of %d bytes: %w", len(req.Requests), total, err)
	}
	defer sp.Release()
	resp := &repb.BatchUpdateBlobsResponse{}
	for _, r := range req.Requests {
		resp.Responses = append(resp.Responses, &repb.BatchUpdateBlobsResponse_Response{
			Digest: r.Digest,
			Status: s.rpcStatus(s.storeSmall(ctx, ns, r)),
		})
	}
	return resp, nil
}

func (s *Server) storeSmall(ctx context.Context, ns cache.Namespace, r *repb.BatchUpdateBlobsRequest_Request) error {
	if err := digest.Validate(r.Digest); err != nil {
		return err
	}
	if r.Compressor != repb.Compressor_IDENTITY {
		return status.Errorf(codes.InvalidArgument, "blob %s: compressor %v is not supported in batches", digest.String(r.Digest), r.Compressor)
	}
	if got := digest.Compute(ns.Function, r.Data); !digest.Equal(got, r.Digest) {
		return status.Errorf(codes.InvalidArgument, "blob %s: data is %s", digest.String(r.Digest), digest.String(got))
	}
	if r.Digest.SizeBytes == 0 {
		return nil
	}
	// Just verified above: stored without hashing again.
	if err := s.backend.PutHashed(ctx, ns, r.Digest, r.Data); err != nil {
		return fmt.Errorf("storing blob %s: %w", digest.String(r.Digest), err)
	}
	return nil
}

// BatchReadBlobs returns small blobs; a missing one has a NotFound status.
func (s *Server) BatchReadBlobs(ctx context.Context, req *repb.BatchReadBlobsRequest) (_ *repb.BatchReadBlobsResponse, err error) {
	defer s.m.observe("BatchReadBlobs", time.Now(), &err)
	ns, _, err := s.namespace(ctx, req.InstanceName, req.DigestFunction)
	if err != nil {
		return nil, err
	}
	var total int64
	for _, d := range req.Digests {
		if err := digest.Validate(d); err != nil {
			return nil, err
		}
		total += d.SizeBytes
		if total > s.opts.MaxBatchBytes {
			return nil, status.Errorf(codes.InvalidArgument, "batch read of more than %d bytes (limit %d): use ByteStream", total, s.opts.MaxBatchBytes)
		}
	}
	// The blobs read are held until the response is handed to gRPC, which
	// encodes it: charged for both.
	release, err := s.readMem.acquire(ctx, min(2*total, s.opts.MaxReadMemory), s.opts.IdleTimeout, fmt.Sprintf("batch read of %d blobs", len(req.Digests)))
	if err != nil {
		return nil, err
	}
	defer release()
	resp := &repb.BatchReadBlobsResponse{}
	for _, d := range req.Digests {
		r := &repb.BatchReadBlobsResponse_Response{Digest: d, Compressor: repb.Compressor_IDENTITY}
		var err error
		if d.SizeBytes > 0 {
			r.Data, err = s.readVerified(ctx, ns, d)
		}
		if err != nil {
			r.Data = nil
		}
		s.m.out(len(r.Data))
		r.Status = s.rpcStatus(err)
		resp.Responses = append(resp.Responses, r)
	}
	return resp, nil
}
