package main

import (
	"fmt"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/snaploader/snaploader/cache/encrypted"
)

func newKeygenCmd() *cobra.Command {
	var out, addTo string
	cmd := &cobra.Command{
		Use:   "keygen --out FILE | --add-to FILE [--out FILE]",
		Short: "Create a group key file for client-side encryption, or add a new key to one (rotation)",
		Long: `keygen writes a key file (mode 0600) holding 256-bit group keys, oldest first.
--out FILE creates a new file with one key. --add-to FILE adds a new key to an
existing file (written back to FILE, or to --out): new saves seal with the newest
key, and every key in the file still opens what it sealed, so snapshots saved
before a rotation keep restoring until their key is removed from the file.`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if out == "" && addTo == "" {
				return fmt.Errorf("keygen: give --out FILE or --add-to FILE")
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
			} else if _, err := os.Lstat(dst); err == nil {
				return fmt.Errorf("keygen: %s exists; use --add-to %s to add a key to it", dst, dst)
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
	cmd.Flags().StringVar(&out, "out", "", "key file to write")
	cmd.Flags().StringVar(&addTo, "add-to", "", "existing key file to add a new key to")
	return cmd
}
