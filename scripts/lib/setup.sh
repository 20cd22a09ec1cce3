# Shared by scripts/quickstart.sh and scripts/test.sh: installs what a bare
# Debian machine with only a Rust toolchain lacks, and points cargo at a build
# directory outside the clone so that every clone and CI run reuses one build.
set -euo pipefail

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sluice/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

# The C and C++ toolchain and headers of the native dependencies: librdkafka
# (cmake, curl, ssl, sasl), RocksDB (clang for bindgen), zstd and lz4.
BUILD_PACKAGES=(build-essential cmake clang libclang-dev pkg-config
                libcurl4-openssl-dev libssl-dev libsasl2-dev)

# Installs the Debian packages that are missing; does nothing when all are there.
apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=()
  [ "$(id -u)" -ne 0 ] && sudo=(sudo)
  echo "Installing Debian packages: ${missing[*]}" >&2
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

# Installs rustup components that are missing.
rustup_components() {
  command -v rustup >/dev/null || return 0
  for component in "$@"; do
    rustup component list --installed 2>/dev/null | grep -q "^$component" || rustup component add "$component"
  done
}
