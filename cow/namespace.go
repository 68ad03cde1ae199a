package cow

import "github.com/snaploader/snaploader/cache"

// Namespace is the namespace the store's chunks are read and saved in; its
// digest function names every chunk of the store.
func (s *Store) Namespace() cache.Namespace { return s.ns }
