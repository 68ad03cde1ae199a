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

// countBar draws a spinner with a count on stderr once a run has lasted a
// second; disabled, it draws nothing.
type countBar struct {
	mu      sync.Mutex
	enabled bool
	start   time.Time
	desc    string
	bar     *progressbar.ProgressBar
}

func newCountBar(enabled bool, desc string) *countBar {
	return &countBar{enabled: enabled, start: time.Now(), desc: desc}
}

func (b *countBar) Set(n int64) {
	if !b.enabled {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.bar == nil {
		if time.Since(b.start) < time.Second {
			return
		}
		b.bar = progressbar.NewOptions64(-1,
			progressbar.OptionSetWriter(os.Stderr),
			progressbar.OptionSetDescription(b.desc),
			progressbar.OptionShowCount(),
			progressbar.OptionShowIts(),
			progressbar.OptionSetItsString("objects"),
			progressbar.OptionThrottle(100*time.Millisecond),
			progressbar.OptionClearOnFinish(),
		)
	}
	_ = b.bar.Set64(n)
}

func (b *countBar) Finish() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.bar != nil {
		_ = b.bar.Finish()
	}
}
