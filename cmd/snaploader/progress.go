package main

import (
	"os"
	"sync"
	"time"

	"github.com/schollz/progressbar/v3"
)

// progress draws a bar on stderr once a transfer has run for a second;
// quick transfers, --json and piped stderr draw nothing.
type progress struct {
	mu      sync.Mutex
	enabled bool
	total   int64
	done    int64
	desc    string
	start   time.Time
	bar     *progressbar.ProgressBar
}

func newProgress(enabled bool, total int64, desc string) *progress {
	return &progress{enabled: enabled, total: total, desc: desc, start: time.Now()}
}

// Add records n more bytes done.
func (p *progress) Add(n int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.done += n
	if !p.enabled {
		return
	}
	if p.bar == nil {
		if time.Since(p.start) < time.Second {
			return
		}
		p.bar = progressbar.NewOptions64(p.total,
			progressbar.OptionSetWriter(os.Stderr),
			progressbar.OptionSetDescription(p.desc),
			progressbar.OptionShowBytes(true),
			progressbar.OptionThrottle(100*time.Millisecond),
			progressbar.OptionClearOnFinish(),
		)
		_ = p.bar.Set64(p.done)
		return
	}
	_ = p.bar.Add64(n)
}

// Finish removes the bar.
func (p *progress) Finish() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.bar != nil {
		_ = p.bar.Finish()
	}
}
