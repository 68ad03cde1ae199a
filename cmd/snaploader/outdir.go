package main

import (
	"errors"
	"fmt"
	"io"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/internal/fileio"
	"github.com/snaploader/snaploader/snapshot"
)

// Commands that write into a directory the user names (restore --out,
// pager --dir, qemu --dir) write only into one that is missing (they
// create it) or empty, unless --replace: they never delete or overwrite
// what they did not create unless asked to. Temporary files of
// snaploader's own writes do not count as the directory's contents.

// checkOutDir refuses, before anything is written, a directory given with
// flag that is not a directory, or that holds entries when replace is not
// set; hint says what --replace would do.
func checkOutDir(flag, dir string, replace bool, hint string) error {
	_, err := snapshot.CheckUnpackDir(dir, replace)
	if err != nil && status.Code(err) == codes.InvalidArgument {
		return status.Errorf(codes.InvalidArgument, "%s %s", flag, status.Convert(err).Message())
	}
	return outDirError(flag, err, hint)
}

// outDirError turns the refusal of a directory that holds entries into
// one that names the flag and says how --replace allows it; other errors
// are returned as they are.
func outDirError(flag string, err error, hint string) error {
	var ne *snapshot.DirNotEmptyError
	if errors.As(err, &ne) {
		return fmt.Errorf("%s %w; it must be missing or empty: %s", flag, ne, hint)
	}
	return err
}

// reportOthers says on w (stderr) which entries a command writing into dir
// left there that are not its own.
func reportOthers(w io.Writer, dir string, others []string) {
	if len(others) == 0 {
		return
	}
	what := "entries"
	if len(others) == 1 {
		what = "entry"
	}
	fmt.Fprintf(w, "snaploader: %s also holds %d other %s, left as they were: %s\n", dir, len(others), what, fileio.NameList(others, 10))
}
