package server

import (
	"fmt"
	"io"
	"strings"

	"github.com/snaploader/snaploader/internal/fileio"
)

// ParseAPIKey parses KEY=GROUP[:ro|:rw] (GROUP may be empty: the
// anonymous group).
func ParseAPIKey(spec string) (string, APIKey, error) {
	key, rest, ok := strings.Cut(spec, "=")
	if !ok || key == "" {
		return "", APIKey{}, fmt.Errorf("want KEY=GROUP[:ro]")
	}
	if strings.ContainsFunc(key, func(r rune) bool { return r <= ' ' || r == 0x7f }) {
		return "", APIKey{}, fmt.Errorf("the key has a space or control character")
	}
	group, mode, _ := strings.Cut(rest, ":")
	if mode != "" && mode != "ro" && mode != "rw" {
		return "", APIKey{}, fmt.Errorf("mode %q: want ro or rw", mode)
	}
	return key, APIKey{Group: group, ReadOnly: mode == "ro"}, nil
}

// APIKeys collects API keys from several sources; a key given twice must
// grant the same both times.
type APIKeys struct {
	Keys map[string]APIKey
	from map[string]string
}

// Add adds one KEY=GROUP[:ro] spec; source names where it came from in
// errors (never the key itself).
func (a *APIKeys) Add(spec, source string) error {
	k, v, err := ParseAPIKey(spec)
	if err != nil {
		return fmt.Errorf("%s: %w", source, err)
	}
	if a.Keys == nil {
		a.Keys, a.from = map[string]APIKey{}, map[string]string{}
	}
	if old, ok := a.Keys[k]; ok && old != v {
		return fmt.Errorf("%s: the key (group %q) is also given by %s with another grant (group %q)", source, v.Group, a.from[k], old.Group)
	}
	a.Keys[k], a.from[k] = v, source
	return nil
}

// AddList adds the specs of text: one per line, or several on a line
// separated by commas or spaces; blank lines and lines starting with #
// are skipped.
func (a *APIKeys) AddList(text, source string) error {
	for n, line := range strings.Split(text, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		for _, spec := range strings.FieldsFunc(line, func(r rune) bool { return r == ',' || r == ' ' || r == '\t' || r == '\r' }) {
			if err := a.Add(spec, fmt.Sprintf("%s, line %d", source, n+1)); err != nil {
				return err
			}
		}
	}
	return nil
}

// AddFile adds the keys of a file of KEY=GROUP[:ro] lines. Like an
// encryption key file, it must be a regular file that neither its group
// nor other users may read (mode 0600 or stricter).
func (a *APIKeys) AddFile(path string) error {
	f, err := fileio.OpenRegular(path)
	if err != nil {
		return fmt.Errorf("API key file: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("API key file %s: %w", path, err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return fmt.Errorf("API key file %s has mode %04o: its group or other users can read it; chmod 600 it", path, fi.Mode().Perm())
	}
	b, err := io.ReadAll(io.LimitReader(f, 16<<20))
	if err != nil {
		return fmt.Errorf("API key file %s: %w", path, err)
	}
	return a.AddList(string(b), "API key file "+path)
}
