#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what is missing, builds the eBPF object from
# source, runs lints, unit tests and the end-to-end tests in network namespaces.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"
"$here/scripts/bootstrap.sh"
# A target directory outside the clone, so CI's fresh clone reuses earlier builds on this machine.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/hoshino-target}"
exec cargo xtask test "$@"
