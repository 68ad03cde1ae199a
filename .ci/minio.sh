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

# Pinned to the version these tests were written against (the module proxy serves it).
echo "minio: not found; running: GOBIN=$gobin go install github.com/minio/minio@v0.0.0-20260212201848-7aac2a2c5b7c (takes a few minutes)"
GOBIN="$gobin" go install github.com/minio/minio@v0.0.0-20260212201848-7aac2a2c5b7c
echo "minio: installed $gobin/minio"
