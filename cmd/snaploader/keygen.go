package main

import (
	"context"
	"fmt"
	"os"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache/encrypted"
)

// keygenOptions name the key file keygen writes: Out, a new file, or
// AddTo, an existing file a new key is added to (written back to it, or to
// Out).
type keygenOptions struct {
	Out, AddTo string
}

// runKeygen creates a key file with one new key, or adds a new key to one.
func runKeygen(_ context.Context, o keygenOptions, s streams) error {
	k, err := encrypted.NewKey(time.Now())
	if err != nil {
		return err
	}
	keys := []encrypted.Key{k}
	dst := o.Out
	if o.AddTo != "" {
		old, err := encrypted.ReadKeyFile(o.AddTo)
		if err != nil {
			return err
		}
		keys = append(old.Keys(), k)
		if dst == "" {
			dst = o.AddTo
		}
	}
	// Only the file --add-to names is rewritten; --out never
	// replaces a file that exists.
	if err := checkNewKeyFile(dst, o.AddTo); err != nil {
		return err
	}
	ring, err := encrypted.NewKeyring(keys...)
	if err != nil {
		return err
	}
	if err := encrypted.WriteKeyFile(dst, ring); err != nil {
		return err
	}
	fmt.Fprintf(s.Out, "wrote %s: %d key(s), new saves use key %s\n", dst, len(keys), k.ID)
	return nil
}

// checkNewKeyFile refuses a key file path that exists, unless it is the
// file keys are being added to.
func checkNewKeyFile(dst, addTo string) error {
	fi, err := os.Lstat(dst)
	if err != nil {
		return nil
	}
	if addTo != "" {
		if ai, err := os.Lstat(addTo); err == nil && os.SameFile(fi, ai) {
			return nil
		}
	}
	hint := "use --add-to " + dst + " to add a key to it"
	if addTo != "" {
		hint = "give --out a new file, or drop --out to add the key to " + addTo
	}
	return status.Errorf(codes.AlreadyExists, "keygen: %s exists; refusing to overwrite it: %s", dst, hint)
}
