package main

import (
	"io"
	"os"
)

// streams are where a command's logic writes: Out its result (the text or
// --json object scripts read), Err its notes and warnings.
type streams struct {
	Out, Err io.Writer
}

// stdStreams are the process's standard output and error.
func stdStreams() streams { return streams{Out: os.Stdout, Err: os.Stderr} }
