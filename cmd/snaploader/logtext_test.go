package main

import (
	"bytes"
	"fmt"
	"log/slog"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Warnings on stderr are in the product's words too.
func TestLoggerWordsErrors(t *testing.T) {
	var buf bytes.Buffer
	log := newLogger(&buf, slog.LevelInfo)
	err := fmt.Errorf("reading version: %w", status.Error(codes.Unavailable, `connection error: desc = "transport: Error while dialing: dial tcp 10.0.0.1:80: i/o timeout"`))
	log.With("remote", "grpc://10.0.0.1:80").Warn("remote tier unavailable", "err", err)
	log.Debug("hidden")
	out := buf.String()
	if strings.Contains(out, "rpc error") || strings.Contains(out, "desc =") || strings.Contains(out, "transport:") {
		t.Errorf("log line has transport wording: %s", out)
	}
	if !strings.Contains(out, "reading version: dial tcp 10.0.0.1:80: i/o timeout") || !strings.Contains(out, "grpc://10.0.0.1:80") || strings.Contains(out, "hidden") {
		t.Errorf("log line: %s", out)
	}
}
