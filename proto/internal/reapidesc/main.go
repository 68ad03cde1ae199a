// Command reapidesc writes the FileDescriptorSet of the REAPI protos (and
// everything they import) as linked into this binary, so that protoc can
// compile snapshot.proto against them without their source files.
package main

import (
	"fmt"
	"os"

	_ "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: reapidesc OUT.pb")
		os.Exit(2)
	}
	set := &descriptorpb.FileDescriptorSet{}
	seen := map[string]bool{}
	var add func(fd protoreflect.FileDescriptor)
	add = func(fd protoreflect.FileDescriptor) {
		if seen[fd.Path()] {
			return
		}
		seen[fd.Path()] = true
		imports := fd.Imports()
		for i := 0; i < imports.Len(); i++ {
			add(imports.Get(i).FileDescriptor)
		}
		set.File = append(set.File, protodesc.ToFileDescriptorProto(fd))
	}
	fd, err := protoregistry.GlobalFiles.FindFileByPath("build/bazel/remote/execution/v2/remote_execution.proto")
	if err != nil {
		fmt.Fprintln(os.Stderr, "finding REAPI descriptor:", err)
		os.Exit(1)
	}
	add(fd)
	ts, err := protoregistry.GlobalFiles.FindFileByPath("google/protobuf/timestamp.proto")
	if err == nil {
		add(ts)
	}
	b, err := proto.Marshal(set)
	if err == nil {
		err = os.WriteFile(os.Args[1], b, 0o644)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "writing descriptor set:", err)
		os.Exit(1)
	}
}
