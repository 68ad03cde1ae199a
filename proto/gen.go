// Package proto holds snaploader's protobuf definitions; the generated Go
// code is in packages snapshotpb and inventorypb. Regenerate with
// `go generate ./proto/` (needs protoc, protoc-gen-go and
// protoc-gen-go-grpc on PATH).
package proto

//go:generate go run ./internal/reapidesc /tmp/snaploader-reapi.pb
//go:generate protoc --descriptor_set_in=/tmp/snaploader-reapi.pb -I . --go_out=. --go_opt=module=github.com/snaploader/snaploader/proto snapshot.proto
//go:generate protoc --descriptor_set_in=/tmp/snaploader-reapi.pb -I . --go_out=. --go_opt=module=github.com/snaploader/snaploader/proto --go-grpc_out=. --go-grpc_opt=module=github.com/snaploader/snaploader/proto inventory.proto
