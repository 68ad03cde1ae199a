package main

import (
	"errors"
	"fmt"
	"os"
	"syscall"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/internal/fileio"
)

// checkSocketPath refuses a socket path that names something other than
// a Unix socket: the only thing a command may remove at that path is a
// socket, which holds no data. (Whether a process still listens on it is
// not probed: connecting would be taken for a client by a pager that
// serves one.)
func checkSocketPath(flag, path string) error {
	fi, err := os.Lstat(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return nil
	case err != nil:
		return fmt.Errorf("%s %s: %w", flag, path, err)
	case fi.Mode()&os.ModeSocket == 0:
		kind := "not a socket"
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			kind = fileio.Kind(st.Mode)
		}
		return status.Errorf(codes.InvalidArgument, "%s %s is %s, not a socket: refusing to replace it", flag, path, kind)
	}
	return nil
}

// removeStaleSocket removes the socket at path, if any, so that it can be
// listened on; anything else there is refused (checkSocketPath).
func removeStaleSocket(flag, path string) error {
	if err := checkSocketPath(flag, path); err != nil {
		return err
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("%s: removing the stale socket %s: %w", flag, path, err)
	}
	return nil
}
