package snapshot

import (
	"bytes"
	"io"
	"sort"
)

func sortStrings(s []string) { sort.Strings(s) }

func bytesReader(b []byte) io.Reader { return bytes.NewReader(b) }
