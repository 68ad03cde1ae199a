package cow

// Stats are a Store's counters.
type Stats struct {
	Size              int64 // current size
	ChunksListed      int   // chunks that are not holes
	Dirty             int   // dirty chunks
	Touched           int   // chunks read or written at least once
	Fetched           int64 // blobs opened from the source (any reason)
	FetchedBytes      int64 // total size of those blobs
	FetchErrors       int64 // failed opens and verified range reads
	RangeReads        int64 // reads served by a verified range read
	ForegroundFetches int64 // opens a ReadAt or WriteAt waited for
	Prefetched        int64 // opens done by read-ahead or Prefetch
	PrefetchQueued    int64 // chunks ever put in the prefetch queue
	PrefetchYields    int64 // background opens that waited for a fault first
}

// Stats returns the store's counters.
func (s *Store) Stats() Stats {
	st := Stats{
		Size:              s.Size(),
		Dirty:             int(s.dirty.Load()),
		Fetched:           s.fetched.Load(),
		FetchedBytes:      s.fetchedBytes.Load(),
		FetchErrors:       s.fetchErrors.Load(),
		RangeReads:        s.rangeReads.Load(),
		ForegroundFetches: s.fgFetches.Load(),
		Prefetched:        s.prefetched.Load(),
		PrefetchQueued:    s.queuedTotal.Load(),
		PrefetchYields:    s.yields.Load(),
	}
	for _, c := range s.snapshotChunks() {
		c.mu.RLock()
		if c.d != nil || c.dirty {
			st.ChunksListed++
		}
		c.mu.RUnlock()
	}
	s.touchMu.Lock()
	st.Touched = len(s.touched)
	s.touchMu.Unlock()
	return st
}
