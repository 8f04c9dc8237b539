#!/usr/bin/env bash
# Loads a fresh hamgam-node and a fresh etcd in the same run and prints both
# with their ratio. Installs Debian's etcd-server if it is missing.
# Usage: benches/compare-with-etcd.sh [hamgam-bench compare flags...]
#   e.g. benches/compare-with-etcd.sh --clients-list 1,16,64,256 --duration-secs 20
# With HAMGAM_BIN_DIR set to a folder of built programs (deploy/build-pgo.sh
# makes one), its hamgam-node and hamgam-bench run instead of a fresh plain
# release build:
#   deploy/build-pgo.sh /tmp/pgo && HAMGAM_BIN_DIR=/tmp/pgo benches/compare-with-etcd.sh --clients-list 64 --rounds 3
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v etcd >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server
fi
if [ -n "${HAMGAM_BIN_DIR:-}" ]; then
    exec "$HAMGAM_BIN_DIR/hamgam-bench" compare --node-bin "$HAMGAM_BIN_DIR/hamgam-node" "$@"
fi
cargo build --release -p hamgam-node -p hamgam-tools
exec ./target/release/hamgam-bench compare "$@"
