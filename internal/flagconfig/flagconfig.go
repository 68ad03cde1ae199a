// Package flagconfig sets the flags that a command line left unset from
// the environment or a config file. A flag given on the command line
// wins; then the environment variable PREFIX+NAME, NAME being the flag's
// name upper-cased with dashes as underscores (--max-bytes:
// SNAPLOADER_MAX_BYTES); then the config file; then the flag's default.
//
// The config file is YAML: a mapping of flag names (without dashes in
// front) to values, a list for a repeatable flag:
//
//	listen: unix:///run/snaploader/serve.sock
//	max-bytes: 107374182400
//	access-log: true
//	api-key-file: /etc/snaploader/api-keys
//
// A name that is no flag of the command is an error, so a typo is not
// silently ignored.
package flagconfig

import (
	"bytes"
	"fmt"
	"io"
	"strings"

	"github.com/spf13/pflag"
	"go.yaml.in/yaml/v3"

	"github.com/snaploader/snaploader/internal/fileio"
)

// Source is where unset flags are taken from.
type Source struct {
	// EnvPrefix is put before a flag's variable name ("SNAPLOADER_").
	EnvPrefix string
	// Environ is the environment (os.Environ()).
	Environ []string
	// File is the config file; "" for none.
	File string
	// Skip names flags set from neither (the flag naming the config file
	// itself).
	Skip map[string]bool
	// NoEnv names flags not read from the environment (one whose
	// variable name means something else to other commands).
	NoEnv map[string]bool
}

// EnvName is the environment variable of flag name.
func EnvName(prefix, name string) string {
	return prefix + strings.ToUpper(strings.ReplaceAll(name, "-", "_"))
}

// Apply sets every flag of fs not Changed from src and returns where each
// flag set came from ("$VAR" or "FILE"), for messages. Flags it sets are
// marked Changed, like those given on the command line.
func Apply(fs *pflag.FlagSet, src Source) (map[string]string, error) {
	env := map[string]string{}
	for _, kv := range src.Environ {
		if k, v, ok := strings.Cut(kv, "="); ok && strings.HasPrefix(k, src.EnvPrefix) {
			env[k] = v
		}
	}
	file := map[string][]string{}
	if src.File != "" {
		var err error
		if file, err = readFile(src.File); err != nil {
			return nil, err
		}
		for name := range file {
			if f := fs.Lookup(name); f == nil || src.Skip[name] {
				return nil, fmt.Errorf("config file %s: %q is not a setting of this command", src.File, name)
			}
		}
	}
	from := map[string]string{}
	var err error
	fs.VisitAll(func(f *pflag.Flag) {
		if err != nil || f.Changed || src.Skip[f.Name] || f.Name == "help" {
			return
		}
		if v, ok := env[EnvName(src.EnvPrefix, f.Name)]; ok && !src.NoEnv[f.Name] {
			where := "$" + EnvName(src.EnvPrefix, f.Name)
			err = set(fs, f, []string{v}, where)
			from[f.Name] = where
			return
		}
		if vs, ok := file[f.Name]; ok {
			err = set(fs, f, vs, src.File)
			from[f.Name] = src.File
		}
	})
	if err != nil {
		return nil, err
	}
	return from, nil
}

// set gives f the values vs (several only for a repeatable flag).
func set(fs *pflag.FlagSet, f *pflag.Flag, vs []string, where string) error {
	if sv, ok := f.Value.(pflag.SliceValue); ok {
		if err := sv.Replace(vs); err != nil {
			return fmt.Errorf("%s: --%s %q: %w", where, f.Name, strings.Join(vs, ","), err)
		}
		f.Changed = true
		return nil
	}
	if len(vs) != 1 {
		return fmt.Errorf("%s: --%s takes one value, not a list", where, f.Name)
	}
	if err := fs.Set(f.Name, vs[0]); err != nil {
		return fmt.Errorf("%s: --%s %q: %w", where, f.Name, vs[0], err)
	}
	return nil
}

// readFile reads a config file: a YAML mapping of names to scalars or
// lists of scalars.
func readFile(path string) (map[string][]string, error) {
	f, err := fileio.OpenRegular(path)
	if err != nil {
		return nil, fmt.Errorf("config file: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, 1<<20))
	if err != nil {
		return nil, fmt.Errorf("config file %s: %w", path, err)
	}
	return parse(path, b)
}

func parse(path string, b []byte) (map[string][]string, error) {
	out := map[string][]string{}
	if len(bytes.TrimSpace(b)) == 0 {
		return out, nil
	}
	var doc yaml.Node
	if err := yaml.Unmarshal(b, &doc); err != nil {
		return nil, fmt.Errorf("config file %s: %w", path, err)
	}
	if len(doc.Content) == 0 {
		return out, nil
	}
	m := doc.Content[0]
	if m.Kind != yaml.MappingNode {
		return nil, fmt.Errorf("config file %s, line %d: want a mapping of setting names to values", path, m.Line)
	}
	for i := 0; i+1 < len(m.Content); i += 2 {
		k, v := m.Content[i], m.Content[i+1]
		name := strings.TrimPrefix(k.Value, "--")
		if _, dup := out[name]; dup {
			return nil, fmt.Errorf("config file %s, line %d: %q is set twice", path, k.Line, name)
		}
		switch v.Kind {
		case yaml.ScalarNode:
			if v.Tag == "!!null" {
				return nil, fmt.Errorf("config file %s, line %d: %q has no value", path, k.Line, name)
			}
			out[name] = []string{v.Value}
		case yaml.SequenceNode:
			vs := []string{}
			for _, e := range v.Content {
				if e.Kind != yaml.ScalarNode {
					return nil, fmt.Errorf("config file %s, line %d: %q: want a list of plain values", path, e.Line, name)
				}
				vs = append(vs, e.Value)
			}
			out[name] = vs
		default:
			return nil, fmt.Errorf("config file %s, line %d: %q: want a value or a list of values", path, v.Line, name)
		}
	}
	return out, nil
}
