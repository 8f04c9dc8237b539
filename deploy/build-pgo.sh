#!/usr/bin/env bash
# Builds `hamgam-node`, `hamgam` and `hamgam-bench` with profile-guided
# optimisation into OUT_DIR: an instrumented build runs a short training
# load (a lone node under 64 message clients, a 128 MiB put, a backup and a
# restore of a made-up folder), then the release build uses its profile.
# On this project's loads the optimised node spends a tenth to a sixth less
# CPU than the plain release build (docs/benchmarks.md).
#
#   deploy/build-pgo.sh OUT_DIR
#
# About ten minutes on two cores. Needs rustup's llvm-tools (installed here
# if missing) for llvm-profdata. The builds go to target/pgo-*, so the plain
# `cargo build --release` of the README is left as it is. OUT_DIR is the
# kind of folder benches/ab-store.sh takes; benches/ab-nodes.sh takes its
# `hamgam-node`.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -ne 1 ]; then
    awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0" >&2
    exit 2
fi
out=$(realpath -m "$1")
repo=$(pwd)
source benches/start-node.sh

sysroot=$(rustc --print sysroot)
host=$(rustc -vV | awk '/^host:/ { print $2 }')
profdata="$sysroot/lib/rustlib/$host/bin/llvm-profdata"
if [ ! -x "$profdata" ]; then
    rustup component add llvm-tools
fi

work=$(mktemp -d)
node_pid=""
cleanup() {
    [ -z "$node_pid" ] || kill -9 "$node_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

packages=(-p hamgam-node -p hamgam-tools)
echo "== instrumented build"
RUSTFLAGS="-Cprofile-generate=$work/profiles" \
    cargo build --release "${packages[@]}" --target-dir "$repo/target/pgo-instrumented"
bin="$repo/target/pgo-instrumented/release"

echo "== training"
start_node "$bin/hamgam-node" "$work/node.log" --data "$work/node" --listen 127.0.0.1:7931
"$bin/hamgam-bench" messages --server 127.0.0.1:7931 --node-pid "$node_pid" --clients 64 \
    --duration-secs 8 --warmup-secs 1 | tail -1
cli=("$bin/hamgam" --profile "$work/profile" --server 127.0.0.1:7931)
sign_in "$bin/hamgam" "$work/profile" 127.0.0.1:7931
head -c $((128 << 20)) /dev/urandom >"$work/large.bin"
"${cli[@]}" put "$work/large.bin" /large.bin
# A folder like a phone's: media that does not compress and chat logs that do.
mkdir -p "$work/folder/media" "$work/folder/chats"
for i in $(seq 40); do head -c $(((i % 7 + 1) << 20)) /dev/urandom >"$work/folder/media/$i.jpg"; done
for i in $(seq 20); do
    awk -v seed="$i" 'BEGIN { srand(seed); for (n = 0; n < 40000; n++)
        printf "[%d] user%d: %s\n", 1600000000 + n * 37, int(rand() * 40),
            substr("salam chetori khoobam merci farda mibinamet ketab ra avordi", 1 + int(rand() * 20), 5 + int(rand() * 40)) }' \
        >"$work/folder/chats/chat-$i.txt"
done
"${cli[@]}" backup "$work/folder" --label training
"${cli[@]}" restore 1 "$work/restored" --no-sync
kill -TERM "$node_pid"
wait "$node_pid" || true
node_pid=""

echo "== optimised build"
"$profdata" merge -o "$work/merged.profdata" "$work"/profiles/*.profraw
RUSTFLAGS="-Cprofile-use=$work/merged.profdata -Cllvm-args=-pgo-warn-missing-function=false" \
    cargo build --release "${packages[@]}" --target-dir "$repo/target/pgo-optimised"
mkdir -p "$out"
for binary in hamgam-node hamgam hamgam-bench; do
    cp "$repo/target/pgo-optimised/release/$binary" "$out/"
done
echo "built into $out: hamgam-node, hamgam, hamgam-bench"
