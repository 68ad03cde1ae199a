// Package snapshotpb holds the Go code generated from proto/snapshot.proto:
// snapshot keys, manifests, VM metadata and configuration, chunked files
// and version metadata. Regenerate it with `go generate ./proto/`.
package snapshotpb
