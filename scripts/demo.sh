#!/usr/bin/env bash
# The demo, from a fresh machine: a local S3 server and two nodes in network namespaces that ping
# each other and fetch a page over HTTP through the bucket.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"
"$here/scripts/bootstrap.sh"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/hoshino-target}"
exec cargo xtask demo "$@"
