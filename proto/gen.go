// Package proto holds snaploader's protobuf definitions; the generated Go
// code is in package snapshotpb. Regenerate with `go generate ./proto/`
// (needs protoc and protoc-gen-go on PATH).
package proto

//go:generate go run ./internal/reapidesc /tmp/snaploader-reapi.pb
//go:generate protoc --descriptor_set_in=/tmp/snaploader-reapi.pb -I . --go_out=. --go_opt=module=github.com/snaploader/snaploader/proto snapshot.proto
