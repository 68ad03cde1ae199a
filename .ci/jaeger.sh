#!/usr/bin/env bash
# Installs the Jaeger binary that the tracing tests run as a real OTLP
# receiver (it is only ever executed, never linked). Idempotent: does
# nothing when jaeger is already on PATH or in $(go env GOPATH)/bin.
# `go install ...@version` refuses the module (its go.mod has a replace
# directive), so the module is downloaded and built in a copy.
set -euo pipefail

version=v1.76.0
gobin="$(go env GOPATH | cut -d: -f1)/bin"
if command -v jaeger >/dev/null 2>&1; then
  echo "jaeger: found $(command -v jaeger), nothing to do"
  exit 0
fi
if [ -x "$gobin/jaeger" ]; then
  echo "jaeger: found $gobin/jaeger, nothing to do"
  exit 0
fi
echo "jaeger: not found; building github.com/jaegertracing/jaeger/cmd/jaeger@$version (takes a few minutes)"
dir="$(cd "$(mktemp -d)" && pwd)"
trap 'chmod -R u+w "$dir"; rm -rf "$dir"' EXIT
src="$(cd "$dir" && GOFLAGS=-mod=mod go mod download -json "github.com/jaegertracing/jaeger@$version" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
cp -r "$src" "$dir/jaeger"
chmod -R u+w "$dir/jaeger"
mkdir -p "$gobin"
(cd "$dir/jaeger" && go build -o "$gobin/jaeger" ./cmd/jaeger)
echo "jaeger: installed $gobin/jaeger"
