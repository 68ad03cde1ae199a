package main

import (
	"context"
	"errors"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"golang.org/x/term"
)

func newRootCmd() (*cobra.Command, *commandTrace) {
	root := &cobra.Command{
		Use:           "snaploader",
		Short:         "Save and restore microVM snapshots through content-addressed caches",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(newSaveCmd(), newRestoreCmd(), newInvalidateCmd(), newInspectCmd(), newLsCmd(), newVerifyCmd(), newDemoCmd(), newServeCmd(), newPagerCmd(), newQemuCmd(), newGCCmd(), newKeygenCmd(), newBenchCmd(), newVersionCmd())
	tr := &commandTrace{}
	tr.register(root)
	root.SetFlagErrorFunc(flagError)
	forEachCommand(root, func(c *cobra.Command) {
		if c.RunE == nil {
			return
		}
		if c.Args == nil {
			c.Args = cobra.NoArgs // no command takes positional arguments
		}
		run := c.RunE
		c.RunE = func(cmd *cobra.Command, args []string) error {
			runState.ran = true
			return run(cmd, args)
		}
	})
	return root, tr
}

func forEachCommand(c *cobra.Command, fn func(*cobra.Command)) {
	fn(c)
	for _, sub := range c.Commands() {
		forEachCommand(sub, fn)
	}
}

// flagError is a usage error for a flag cobra could not parse: a bad value
// is named as --FLAG VALUE with what the flag wants, and an unknown flag
// names the command's flags closest to it.
func flagError(cmd *cobra.Command, err error) error {
	var iv *pflag.InvalidValueError
	if errors.As(err, &iv) {
		want := cliText(iv.Unwrap())
		var num *strconv.NumError
		if errors.As(iv.Unwrap(), &num) {
			want = "want a whole number"
			if iv.GetFlag().Value.Type() == "bool" {
				want = "want true or false"
			}
		}
		return usagef("--%s %s: %s", iv.GetFlag().Name, iv.GetValue(), want)
	}
	var ne interface{ GetSpecifiedName() string }
	if errors.As(err, &ne) && ne.GetSpecifiedName() != "" {
		if near := nearestFlags(cmd, ne.GetSpecifiedName()); len(near) > 0 {
			return usagef("%s (did you mean %s?)", err, orList(near))
		}
	}
	return usagef("%s", err)
}

// nearestFlags are the names (as --NAME) of cmd's flags that name starts,
// or that are at most two edits away from it, closest first.
func nearestFlags(cmd *cobra.Command, name string) []string {
	type cand struct {
		name string
		dist int
	}
	var cs []cand
	visit := func(f *pflag.Flag) {
		if f.Hidden {
			return
		}
		d := editDistance(name, f.Name)
		if d <= 2 || (len(name) >= 3 && strings.HasPrefix(f.Name, name)) {
			cs = append(cs, cand{f.Name, d})
		}
	}
	cmd.Flags().VisitAll(visit)
	cmd.InheritedFlags().VisitAll(visit)
	sort.SliceStable(cs, func(i, j int) bool {
		if cs[i].dist != cs[j].dist {
			return cs[i].dist < cs[j].dist
		}
		return cs[i].name < cs[j].name
	})
	var out []string
	for _, c := range cs {
		if n := "--" + c.name; !slices.Contains(out, n) && len(out) < 3 {
			out = append(out, n)
		}
	}
	return out
}

// orList joins names as "a", "a or b", "a, b or c".
func orList(names []string) string {
	if len(names) <= 1 {
		return strings.Join(names, "")
	}
	return strings.Join(names[:len(names)-1], ", ") + " or " + names[len(names)-1]
}

// editDistance is the Levenshtein distance of a and b.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

// stderrIsTerminal reports whether progress bars may be drawn.
func stderrIsTerminal() bool { return term.IsTerminal(int(os.Stderr.Fd())) }

// runE is a command's RunE: its flags part (options), then its logic part
// (run) with the options, on the process's standard streams.
func runE[O any](options func() (O, error), run func(context.Context, O, streams) error) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, _ []string) error {
		o, err := options()
		if err != nil {
			return err
		}
		return run(cmd.Context(), o, stdStreams())
	}
}
