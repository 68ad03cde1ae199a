package main

import (
	"context"
	"fmt"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/snaploader/snaploader/errkind"
	"github.com/snaploader/snaploader/gc"
	"github.com/snaploader/snaploader/proto/inventorypb"
	"github.com/snaploader/snaploader/remote"
	"github.com/snaploader/snaploader/server"
)

// lsOptions are what ls lists: the local cache (Cache), or the primary
// remote (a bucket or a snaploader serve), judged by List's retention and
// clock.
type lsOptions struct {
	Cache  cacheOptions
	Remote remoteOptions
	List   gc.Options
	// ClockFromMetadata takes a bucket's ages from the write times in
	// object metadata.
	ClockFromMetadata bool
	JSON              bool
}

// runLs lists the snapshots of the store o names, oldest first.
func runLs(ctx context.Context, o lsOptions, s streams) error {
	if u := o.Remote.primary(); u != "" {
		if isREAPI(u) {
			return listServer(ctx, o.Remote, o.List, o.JSON, s)
		}
		return listRemote(ctx, u, o.List, o.ClockFromMetadata, o.JSON, s)
	}
	e, err := openEnv(ctx, o.Cache)
	if err != nil {
		return err
	}
	defer e.Close()
	inv, err := gc.List(ctx, localListing(e.local, o.Cache.Group), o.List)
	if err != nil {
		return fmt.Errorf("listing the local cache %s: %w", e.local.Dir(), err)
	}
	now := time.Now()
	if o.List.Now != nil {
		now = o.List.Now()
	}
	lt := listingOfServer(server.InventoryResponse(inv), now)
	lt.Store, lt.Location = "local", e.local.Dir()
	return printListing(s.Out, lt, o.JSON, "the cache's blobs")
}

// listRemote lists the snapshots of the bucket at url.
func listRemote(ctx context.Context, url string, opts gc.Options, clockFromMetadata, asJSON bool, s streams) error {
	st, err := openStore(ctx, url, "ls", clockFromMetadata)
	if err != nil {
		return err
	}
	inv, err := gc.List(ctx, st, opts)
	if err != nil {
		return remoteDown(url, fmt.Errorf("listing %s: %w", url, err))
	}
	now := time.Now()
	if opts.Now != nil {
		now = opts.Now()
	}
	lt := listingOfServer(server.InventoryResponse(inv), now)
	lt.Store, lt.Location = "remote", url
	return printListing(s.Out, lt, asJSON, "the bucket's blobs")
}

// listServer lists the snapshots a snaploader serve holds for this
// client's group, through its Inventory service. Other REAPI caches do
// not offer it (UNIMPLEMENTED): they cannot list their contents.
func listServer(ctx context.Context, rf remoteOptions, opts gc.Options, asJSON bool, s streams) error {
	cannot := "only snaploader serve lists its snapshots; other REAPI caches cannot list their contents (the Remote Execution API has no listing call), they evict by themselves"
	c, err := remote.Dial(ctx, rf.primary(), remote.Options{APIKey: rf.APIKey, APIKeyHeader: rf.APIKeyHeader, BearerToken: rf.BearerToken,
		CAFile: rf.CAFile, ClientCertFile: rf.ClientCert, ClientKeyFile: rf.ClientKey, CallTimeout: rf.Timeout, MaxRetries: -1})
	if err != nil {
		if errkind.Is(err, errkind.InvalidArgument) {
			return flagNamed(err)
		}
		return remoteDown(rf.primary(), fmt.Errorf("ls --remote %s: %w (%s)", rf.primary(), err, cannot))
	}
	defer c.Close()
	req := &inventorypb.ListSnapshotsRequest{RetentionSeconds: int64(opts.Retention / time.Second)}
	now := time.Now()
	if opts.Now != nil {
		now = opts.Now()
		req.Now = timestamppb.New(now)
	}
	resp, err := inventorypb.NewInventoryClient(c.Conn()).ListSnapshots(ctx, req)
	if status.Code(err) == codes.Unimplemented {
		return status.Errorf(codes.InvalidArgument, "ls --remote %s: REAPI caches cannot list their contents (the Remote Execution API has no listing call), and this one does not offer snaploader serve's listing; they evict by themselves", rf.primary())
	}
	if err != nil {
		return remoteDown(rf.primary(), fmt.Errorf("listing the snapshots of %s: %w", rf.primary(), err))
	}
	lt := listingOfServer(resp, now)
	lt.Store, lt.Location = "remote", rf.primary()
	return printListing(s.Out, lt, asJSON, "the server's blobs")
}
