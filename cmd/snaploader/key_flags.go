package main

import (
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/snaploader/snaploader/snapshot"
)

// keyFlags identify a snapshot key set.
type keyFlags struct {
	// noRef: the command needs no ref (invalidate: a version id covers
	// every ref of the key).
	noRef bool

	instance   string
	platform   []string
	configHash string
	ref        string
	baseRef    string
	defaultRef string
	runner     string
	universal  string
}

func (f *keyFlags) register(cmd *cobra.Command) {
	fl := cmd.Flags()
	fl.StringVar(&f.instance, "instance", "", "REAPI instance name")
	fl.StringSliceVar(&f.platform, "platform", nil, "platform properties KEY=VAL,... the VM was created with")
	fl.StringVar(&f.configHash, "config-hash", "", "hash of the VM configuration")
	fl.StringVar(&f.ref, "ref", os.Getenv(snapshot.EnvBranch), "git branch of the task (default $GIT_BRANCH)")
	fl.StringVar(&f.baseRef, "base-ref", os.Getenv(snapshot.EnvBaseBranch), "base branch, first fallback (default $GIT_BASE_BRANCH)")
	fl.StringVar(&f.defaultRef, "default-ref", os.Getenv(snapshot.EnvDefaultBranch), "repository default branch, last fallback (default $GIT_REPO_DEFAULT_BRANCH)")
	fl.StringVar(&f.runner, "runner", "", "runner id, when snapshots are not shared between runners")
	fl.StringVar(&f.universal, "universal-ref", "", "optional last fallback ref any branch also publishes under")
}

// check refuses a key with a required field missing (a usage error that
// names the flag, and the environment variable it defaults to): the
// instance, the configuration hash and, unless noRef, the ref. Nothing is
// stored or looked up under an empty one.
func (f *keyFlags) check() error {
	var missing []string
	if f.instance == "" {
		missing = append(missing, "--instance (the instance name snapshots are stored under)")
	}
	if f.configHash == "" {
		missing = append(missing, "--config-hash (the hash of the VM configuration)")
	}
	if f.ref == "" && !f.noRef {
		missing = append(missing, "--ref or $"+snapshot.EnvBranch+" (the task's git branch)")
	}
	switch len(missing) {
	case 0:
		return nil
	case 1:
		return usagef("%s is required", missing[0])
	}
	return usagef("%s are required", andList(missing))
}

// andList joins items as "a", "a and b", "a, b and c".
func andList(items []string) string {
	if len(items) <= 1 {
		return strings.Join(items, "")
	}
	return strings.Join(items[:len(items)-1], ", ") + " and " + items[len(items)-1]
}

func (f *keyFlags) task() (snapshot.Task, error) {
	props := map[string]string{}
	for _, p := range f.platform {
		k, v, ok := strings.Cut(p, "=")
		if !ok || k == "" {
			return snapshot.Task{}, usagef("--platform %q: want KEY=VAL", p)
		}
		props[k] = v
	}
	ph, err := snapshot.PlatformHash(props)
	if err != nil {
		return snapshot.Task{}, err
	}
	if err := f.check(); err != nil {
		return snapshot.Task{}, err
	}
	for flag, ref := range map[string]string{"--ref": f.ref, "--base-ref": f.baseRef, "--default-ref": f.defaultRef, "--universal-ref": f.universal} {
		if strings.ContainsFunc(ref, func(r rune) bool { return r < ' ' || r == 0x7f }) {
			return snapshot.Task{}, usagef("%s %q: a git ref has no control characters", flag, ref)
		}
	}
	return snapshot.Task{
		InstanceName:      f.instance,
		PlatformHash:      ph,
		ConfigurationHash: f.configHash,
		RunnerID:          f.runner,
		Env: map[string]string{
			snapshot.EnvBranch:        f.ref,
			snapshot.EnvBaseBranch:    f.baseRef,
			snapshot.EnvDefaultBranch: f.defaultRef,
		},
	}, nil
}

// options are the key set the flags name: task, checked, with the
// universal ref.
func (f *keyFlags) options() (keyOptions, error) {
	t, err := f.task()
	if err != nil {
		return keyOptions{}, err
	}
	return keyOptions{Task: t, UniversalRef: f.universal}, nil
}
