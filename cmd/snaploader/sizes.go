package main

import (
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/snaploader/snaploader/cow"
)

// sizeUnits are the suffixes every size flag takes, powers of 1024.
var sizeUnits = []struct {
	suffix string
	mult   int64
}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"TiB", 1 << 40}, {"K", 1 << 10}, {"M", 1 << 20}, {"G", 1 << 30}, {"T", 1 << 40}}

// parseSize parses the one size syntax of every size flag: a whole number
// of bytes, or a whole number with a K/KiB, M/MiB, G/GiB or T/TiB suffix
// (powers of 1024), e.g. 4096, 64MiB, 2GiB. It accepts 0; what a flag
// allows beyond that is the flag's to say.
func parseSize(s string) (int64, error) {
	num, mult := strings.TrimSpace(s), int64(1)
	for _, u := range sizeUnits {
		if n, ok := strings.CutSuffix(num, u.suffix); ok {
			num, mult = n, u.mult
			break
		}
	}
	n, err := strconv.ParseInt(num, 10, 64)
	if err != nil || n < 0 || strings.HasPrefix(num, "+") || n > math.MaxInt64/mult {
		return 0, fmt.Errorf("want a size such as 4096, 64MiB or 2GiB (bytes, or a whole number of KiB, MiB, GiB or TiB)")
	}
	return n * mult, nil
}

// parseBytes parses a positive size of at most cow.MaxSize given to flag.
func parseBytes(flag, s string) (int64, error) {
	n, err := parseSize(s)
	if err != nil || n <= 0 || n > cow.MaxSize {
		return 0, usagef("%s %q: want a positive size such as 4096, 64MiB or 1GiB", flag, s)
	}
	return n, nil
}

// formatSize writes n in the size syntax, with the largest unit that
// divides it exactly (KiB only below 1 MiB: 4096000 stays bytes).
func formatSize(n int64) string {
	for i := 3; i >= 0; i-- {
		if u := sizeUnits[i]; n != 0 && n%u.mult == 0 && (u.mult > 1<<10 || n < 1<<20) {
			return strconv.FormatInt(n/u.mult, 10) + u.suffix
		}
	}
	return strconv.FormatInt(n, 10)
}

// sizeValue is a size flag's value (parseSize).
type sizeValue struct{ p *int64 }

func (v sizeValue) String() string {
	if v.p == nil {
		return "0"
	}
	return formatSize(*v.p)
}

func (v sizeValue) Set(s string) error {
	n, err := parseSize(s)
	if err != nil {
		return err
	}
	*v.p = n
	return nil
}

func (v sizeValue) Type() string { return "size" }

// sizeFlag defines a size flag on cmd: bytes or KiB/MiB/GiB/TiB.
func sizeFlag(cmd *cobra.Command, p *int64, name string, def int64, usage string) {
	*p = def
	cmd.Flags().Var(sizeValue{p}, name, usage)
}

// parseDuration accepts Go durations plus a day suffix ("1d", "1.5d").
func parseDuration(s string) (time.Duration, error) {
	if d, ok := strings.CutSuffix(s, "d"); ok {
		days, err := strconv.ParseFloat(d, 64)
		if err != nil || days < 0 {
			return 0, usagef("invalid duration %q", s)
		}
		return time.Duration(days * float64(24*time.Hour)), nil
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return 0, usagef("invalid duration %q: %w", s, err)
	}
	return v, nil
}

// humanBytes is n bytes for people: B, KiB, MiB or GiB.
func humanBytes(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.2f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}
