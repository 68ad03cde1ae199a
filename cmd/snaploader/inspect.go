package main

import (
	"context"
	"fmt"

	"google.golang.org/protobuf/encoding/protojson"
)

// runInspect prints the manifest of the snapshot o selects as JSON.
func runInspect(ctx context.Context, o snapshotOptions, s streams) error {
	e, snap, err := openSnapshot(ctx, o)
	if err != nil {
		return err
	}
	defer e.Close()
	b, err := protojson.MarshalOptions{Multiline: true, UseProtoNames: true}.Marshal(snap.Manifest)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(s.Out, "%s\n", b)
	return err
}
