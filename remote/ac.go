package remote

import (
	"context"
	"fmt"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
)

// GetActionResult returns the action-cache entry under key; NotFound when
// absent (or, on servers that check, when a blob it references is gone).
func (c *Client) GetActionResult(ctx context.Context, ns cache.Namespace, key *repb.Digest) (*repb.ActionResult, error) {
	inst, fn, err := c.ns(ns)
	if err != nil {
		return nil, err
	}
	if err := digest.Validate(key); err != nil {
		return nil, err
	}
	var ar *repb.ActionResult
	err = c.retry(ctx, func(ctx context.Context) (err error) {
		ar, err = c.ac.GetActionResult(ctx, &repb.GetActionResultRequest{InstanceName: inst, ActionDigest: key, DigestFunction: fn})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("getting action result %s from %s: %w", digest.String(key), c.target, err)
	}
	return ar, nil
}

// UpdateActionResult stores ar under key.
func (c *Client) UpdateActionResult(ctx context.Context, ns cache.Namespace, key *repb.Digest, ar *repb.ActionResult) error {
	inst, fn, err := c.ns(ns)
	if err != nil {
		return err
	}
	if err := digest.Validate(key); err != nil {
		return err
	}
	err = c.retry(ctx, func(ctx context.Context) error {
		_, err := c.ac.UpdateActionResult(ctx, &repb.UpdateActionResultRequest{InstanceName: inst, ActionDigest: key, ActionResult: ar, DigestFunction: fn})
		return err
	})
	if err != nil {
		return fmt.Errorf("updating action result %s on %s: %w", digest.String(key), c.target, err)
	}
	return nil
}
