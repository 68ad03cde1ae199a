package main

import (
	"strings"
	"testing"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

func TestParseSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
		ok   bool
	}{
		{"0", 0, true},
		{"4096", 4096, true},
		{"4K", 4 << 10, true},
		{"4KiB", 4 << 10, true},
		{"64MiB", 64 << 20, true},
		{"128M", 128 << 20, true},
		{"2GiB", 2 << 30, true},
		{"2G", 2 << 30, true},
		{"1TiB", 1 << 40, true},
		{" 8MiB ", 8 << 20, true},
		{"", 0, false},
		{"-1", 0, false},
		{"+1", 0, false},
		{"1.5GiB", 0, false},
		{"2GB", 0, false},
		{"2 GiB", 0, false},
		{"GiB", 0, false},
		{"9000000TiB", 0, false},
		{"twelve", 0, false},
	} {
		got, err := parseSize(tc.in)
		if (err == nil) != tc.ok || (tc.ok && got != tc.want) {
			t.Errorf("parseSize(%q) = %d, %v; want %d ok=%v", tc.in, got, err, tc.want, tc.ok)
		}
	}
}

func TestFormatSize(t *testing.T) {
	for n, want := range map[int64]string{0: "0", 4096000: "4096000", 4096: "4KiB", 20 << 30: "20GiB", 3 << 20: "3MiB", 1<<20 + 1: "1048577"} {
		if got := formatSize(n); got != want {
			t.Errorf("formatSize(%d) = %q, want %q", n, got, want)
		}
		if back, err := parseSize(formatSize(n)); err != nil || back != n {
			t.Errorf("parseSize(formatSize(%d)) = %d, %v", n, back, err)
		}
	}
}

// Every size flag of every command takes the one size syntax: bytes, or
// KiB/MiB/GiB.
func TestEverySizeFlagTakesUnits(t *testing.T) {
	root, _ := newRootCmd()
	sizeFlags := map[string]bool{
		"cache-max-bytes": true, "remote-max-blob-bytes": true, "chunk-size": true, "memory-bytes": true,
		"max-bytes": true, "max-blob-bytes": true, "max-scratch-bytes": true, "max-upload-memory": true, "max-read-memory": true,
	}
	seen := map[string]bool{}
	forEachCommand(root, func(c *cobra.Command) {
		for name := range sizeFlags {
			f := c.Flags().Lookup(name)
			if f == nil {
				continue
			}
			seen[name] = true
			if f.Value.Type() != "size" {
				t.Errorf("%s --%s is of type %s, not a size", c.CommandPath(), name, f.Value.Type())
				continue
			}
			if err := f.Value.Set("2GiB"); err != nil {
				t.Errorf("%s --%s 2GiB: %v", c.CommandPath(), name, err)
			}
			if f.Value.String() != "2GiB" {
				t.Errorf("%s --%s 2GiB reads back as %s", c.CommandPath(), name, f.Value.String())
			}
			if err := c.Flags().Set(name, "2XB"); err == nil || !strings.Contains(err.Error(), "64MiB") {
				t.Errorf("%s --%s 2XB: error %v, want one naming the syntax", c.CommandPath(), name, err)
			}
		}
		// No other flag whose name says it is a size of bytes is left out.
		c.Flags().VisitAll(func(f *pflag.Flag) {
			if (strings.HasSuffix(f.Name, "-bytes") || strings.HasSuffix(f.Name, "-size") || strings.HasSuffix(f.Name, "-memory")) && f.Value.Type() != "size" && f.Name != "page-size" && f.Name != "batch-size" {
				t.Errorf("%s --%s (type %s) is a size flag that does not take the size syntax", c.CommandPath(), f.Name, f.Value.Type())
			}
		})
	})
	for name := range sizeFlags {
		if !seen[name] {
			t.Errorf("no command has --%s", name)
		}
	}
	// --page-size and bench --size, strings parsed by the same parser.
	if n, err := parsePageSize("2MiB"); err != nil || n != 2<<20 {
		t.Errorf("parsePageSize(2MiB) = %d, %v", n, err)
	}
	if n, err := parseBytes("--size", "256MiB"); err != nil || n != 256<<20 {
		t.Errorf("parseBytes(256MiB) = %d, %v", n, err)
	}
}
