package remote

import (
	"slices"

	"github.com/snaploader/snaploader/digest"
)

// Offers reports whether the server accepts digest function fn.
func (c *Client) Offers(fn digest.Function) bool { return slices.Contains(c.fns, fn) }

// EntryFunction is the digest function action-cache entries are keyed under
// on this server (SPEC §2): BLAKE3 when it offers it, else SHA-256.
func (c *Client) EntryFunction() digest.Function {
	if c.Offers(digest.BLAKE3) {
		return digest.BLAKE3
	}
	return digest.SHA256
}
