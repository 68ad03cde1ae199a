package server

import (
	"time"

	"github.com/snaploader/snaploader/internal/buildinfo"

	"github.com/snaploader/snaploader/statuspage"
)

// Build is the running binary's version: the main module's version and
// the version control revision it was built from, when recorded.
func Build() statuspage.ServerInfo {
	b := buildinfo.Read()
	return statuspage.ServerInfo{Version: b.Version, Revision: b.Revision, RevisionTime: b.Time, Modified: b.Modified, GoVersion: b.GoVersion}
}

// serverInfo is Build with the server's start and uptime as of now.
func (s *Server) serverInfo(now time.Time) statuspage.ServerInfo {
	info := Build()
	info.Started = s.started
	info.UptimeSeconds = int64(now.Sub(s.started).Seconds())
	return info
}
