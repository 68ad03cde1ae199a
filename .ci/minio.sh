#!/usr/bin/env bash
# Installs the MinIO server binary that the S3 tier's tests run as an
# external test server (MinIO is AGPLv3: it is only ever executed, never
# linked). Idempotent: does nothing when minio is already on PATH or in
# $(go env GOPATH)/bin.
set -euo pipefail

gobin="$(go env GOPATH | cut -d: -f1)/bin"
if command -v minio >/dev/null 2>&1; then
  echo "minio: found $(command -v minio), nothing to do"
  exit 0
fi
if [ -x "$gobin/minio" ]; then
  echo "minio: found $gobin/minio, nothing to do"
  exit 0
fi

echo "minio: not found; running: GOBIN=$gobin go install github.com/minio/minio@latest (takes a few minutes)"
GOBIN="$gobin" go install github.com/minio/minio@latest
echo "minio: installed $gobin/minio"
