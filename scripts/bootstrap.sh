#!/usr/bin/env bash
# Installs everything Hoshino's build, tests and demo need on a fresh machine. Idempotent: each
# step checks before it installs, so a warm machine passes through in seconds.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/versions.env
source "$here/scripts/versions.env"

log() { printf '\033[1mbootstrap:\033[0m %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
  echo "bootstrap: must run as root (installs packages; tests create network namespaces)" >&2
  exit 1
fi

# util-linux: setpriv (tests run the agent holding only CAP_NET_ADMIN); systemd: systemd-analyze
# (tests verify deploy/hoshino-agent.service) and PID 1 of the tests' containers; dbus: their
# system bus.
apt_pkgs=(iproute2 iputils-ping dnsutils iperf3 nftables curl ethtool procps util-linux systemd dbus "llvm-${LLVM_MAJOR}-dev" libpolly-"${LLVM_MAJOR}"-dev libzstd-dev zlib1g-dev)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The eBPF crate builds with a pinned nightly (LLVM 22, matching bpf-linker's LLVM) and rust-src.
if ! rustup run "$EBPF_TOOLCHAIN" rustc --version >/dev/null 2>&1; then
  log "rustup toolchain install $EBPF_TOOLCHAIN"
  rustup toolchain install "$EBPF_TOOLCHAIN" --profile minimal --component rust-src
fi
if ! rustup component list --toolchain "$EBPF_TOOLCHAIN" --installed | grep -q '^rust-src'; then
  rustup component add rust-src --toolchain "$EBPF_TOOLCHAIN"
fi

if ! bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
  log "cargo install bpf-linker $BPF_LINKER_VERSION (LLVM ${LLVM_MAJOR}; takes a few minutes)"
  LLVM_PREFIX="/usr/lib/llvm-${LLVM_MAJOR}" cargo install bpf-linker --version "=$BPF_LINKER_VERSION" \
    --locked --no-default-features --features "llvm-${LLVM_MAJOR}"
fi

# moto is the independent S3 implementation the suite proves compatibility and IAM least privilege
# against (its server brings boto3, which provisions the IAM users); python-hcl2
# and checkov validate the Terraform offline.
py_missing=()
python3 -c "import moto, sys; sys.exit(moto.__version__ != '$MOTO_VERSION')" 2>/dev/null || py_missing+=("moto[server]==$MOTO_VERSION")
python3 -c "import hcl2" 2>/dev/null || py_missing+=("python-hcl2==$PYTHON_HCL2_VERSION")
command -v checkov >/dev/null 2>&1 || py_missing+=("checkov==$CHECKOV_VERSION")
if [ ${#py_missing[@]} -gt 0 ]; then
  log "pip install ${py_missing[*]}"
  python3 -m pip install -q --disable-pip-version-check "${py_missing[@]}"
fi
# systemd-resolved for tests/tests/systemd_resolved.rs: the package of the installed systemd's
# version (it depends on exactly that libsystemd-shared), downloaded and unpacked, never
# installed: its maintainer scripts would point this host's /etc/resolv.conf at a resolver the
# host does not run. The test overlays it in a container's mount namespace only.
resolved_version=$(dpkg-query -W -f='${Version}' systemd)
resolved_dir="/var/cache/hoshino/systemd-resolved/$resolved_version"
if [ ! -x "$resolved_dir/root/lib/systemd/systemd-resolved" ]; then
  log "systemd-resolved $resolved_version: download and unpack into $resolved_dir/root (not installed)"
  mkdir -p "$resolved_dir"
  rm -f "$resolved_dir"/*.deb
  # In a subshell: apt-get download writes into the current directory.
  if ! (cd "$resolved_dir" && apt-get download -qq "systemd-resolved=$resolved_version" 2>/dev/null); then
    apt-get update -qq
    (cd "$resolved_dir" && apt-get download -qq "systemd-resolved=$resolved_version" 2>/dev/null)
  fi
  rm -rf "$resolved_dir/root.partial"
  dpkg-deb -x "$resolved_dir"/systemd-resolved_*.deb "$resolved_dir/root.partial"
  rm -rf "$resolved_dir/root"
  mv "$resolved_dir/root.partial" "$resolved_dir/root"
fi

log "ready"
