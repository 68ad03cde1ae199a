package cow

import (
	"sync"
	"time"
)

// maxYield bounds how long read-ahead waits for pending faults: a reader
// that faults without pause still gets read-ahead, one chunk per maxYield.
const maxYield = 100 * time.Millisecond

// faultGate counts the reads waiting on the source (faults: a range read,
// or the fetch of a chunk a read needs), so that read-ahead yields to them:
// a background fetch starts only once none is pending (or after maxYield).
// The fetches already in flight run on; a fault's own range read goes over
// a lane of its own where the source has one (see remote's fault lane).
type faultGate struct {
	mu   sync.Mutex
	n    int
	idle chan struct{} // closed when n drops to 0; nil while n == 0
}

func (g *faultGate) enter() {
	g.mu.Lock()
	if g.n == 0 {
		g.idle = make(chan struct{})
	}
	g.n++
	g.mu.Unlock()
}

func (g *faultGate) leave() {
	g.mu.Lock()
	g.n--
	if g.n == 0 {
		close(g.idle)
		g.idle = nil
	}
	g.mu.Unlock()
}

// wait returns once no fault is pending, after most, or when done is
// closed. It reports whether it waited for a fault.
func (g *faultGate) wait(done <-chan struct{}, most time.Duration) bool {
	g.mu.Lock()
	idle := g.idle
	g.mu.Unlock()
	if idle == nil {
		return false
	}
	t := time.NewTimer(most)
	defer t.Stop()
	select {
	case <-idle:
	case <-t.C:
	case <-done:
	}
	return true
}
