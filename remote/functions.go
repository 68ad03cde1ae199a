package remote

import (
	"slices"

	"github.com/snaploader/snaploader/digest"
)

// Offers reports whether the server accepts digest function fn.
func (c *Client) Offers(fn digest.Function) bool { return slices.Contains(c.fns, fn) }

// Functions lists the digest functions the server accepts.
func (c *Client) Functions() []digest.Function { return slices.Clone(c.fns) }

// EntryFunction is the digest function snapshot version entries are keyed
// under on this server: BLAKE3 when it offers it, else SHA-256.
func (c *Client) EntryFunction() digest.Function {
	if c.Offers(digest.BLAKE3) {
		return digest.BLAKE3
	}
	return digest.SHA256
}

// MaxBlobBytes is the largest blob the server says it accepts
// (max_cas_blob_size_bytes), 0 when it states no limit.
func (c *Client) MaxBlobBytes() int64 { return c.maxBlob }
