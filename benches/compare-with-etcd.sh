#!/usr/bin/env bash
# Loads a fresh hamgam-node and a fresh etcd in the same run and prints both
# with their ratio. Installs Debian's etcd-server if it is missing.
# Usage: benches/compare-with-etcd.sh [hamgam-bench compare flags...]
#   e.g. benches/compare-with-etcd.sh --clients-list 1,16,64,256 --duration-secs 20
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v etcd >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server
fi
cargo build --release -p hamgam-node -p hamgam-tools
exec ./target/release/hamgam-bench compare "$@"
