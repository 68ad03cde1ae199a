// Package inventorypb holds the Go code generated from
// proto/inventory.proto: the listing service `snaploader serve` offers
// besides the REAPI services. Regenerate it with `go generate ./proto/`.
package inventorypb
