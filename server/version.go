package server

import (
	"runtime"
	"runtime/debug"
	"time"

	"github.com/snaploader/snaploader/statuspage"
)

// Build is the running binary's version: the main module's version and
// the version control revision it was built from, when recorded.
func Build() statuspage.ServerInfo {
	info := statuspage.ServerInfo{Version: "unknown", GoVersion: runtime.Version()}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return info
	}
	if bi.Main.Version != "" {
		info.Version = bi.Main.Version
	}
	for _, st := range bi.Settings {
		switch st.Key {
		case "vcs.revision":
			info.Revision = st.Value
		case "vcs.time":
			info.RevisionTime = st.Value
		case "vcs.modified":
			info.Modified = st.Value == "true"
		}
	}
	return info
}

// serverInfo is Build with the server's start and uptime as of now.
func (s *Server) serverInfo(now time.Time) statuspage.ServerInfo {
	info := Build()
	info.Started = s.started
	info.UptimeSeconds = int64(now.Sub(s.started).Seconds())
	return info
}
