package main

import (
	"fmt"
	"os"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache/encrypted"
)

func newKeygenCmd() *cobra.Command {
	var out, addTo string
	cmd := &cobra.Command{
		Use:   "keygen --out FILE | --add-to FILE [--out FILE]",
		Short: "Create a group key file for client-side encryption, or add a new key to one (rotation)",
		Long: `keygen writes a key file (mode 0600) holding 256-bit group keys, oldest first.
--out FILE creates a new file with one key; a FILE that exists is refused, never
overwritten. --add-to FILE adds a new key to an existing file (written back to
FILE, or to --out, a new file): new saves seal with the newest
key, and every key in the file still opens what it sealed, so snapshots saved
before a rotation keep restoring until their key is removed from the file.`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if out == "" && addTo == "" {
				return usagef("keygen: give --out FILE or --add-to FILE")
			}
			k, err := encrypted.NewKey(time.Now())
			if err != nil {
				return err
			}
			keys := []encrypted.Key{k}
			dst := out
			if addTo != "" {
				old, err := encrypted.ReadKeyFile(addTo)
				if err != nil {
					return err
				}
				keys = append(old.Keys(), k)
				if dst == "" {
					dst = addTo
				}
			}
			// Only the file --add-to names is rewritten; --out never
			// replaces a file that exists.
			if err := checkNewKeyFile(dst, addTo); err != nil {
				return err
			}
			ring, err := encrypted.NewKeyring(keys...)
			if err != nil {
				return err
			}
			if err := encrypted.WriteKeyFile(dst, ring); err != nil {
				return err
			}
			fmt.Printf("wrote %s: %d key(s), new saves use key %s\n", dst, len(keys), k.ID)
			return nil
		},
	}
	cmd.Flags().StringVar(&out, "out", "", "key file to write; refused if it exists (unless it is the --add-to file)")
	cmd.Flags().StringVar(&addTo, "add-to", "", "existing key file to add a new key to")
	return cmd
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
