#!/usr/bin/env bash
# A shard's snapshot made, sent and installed while clients keep sending.
# Three nodes with one data shard are loaded for 40 s (so the shard holds
# about 200 MB); then 32 clients send for 40 s while a fourth node joins and
# the third is drained, so the shard's snapshot goes to the fourth. Prints
# the load tool's table during the move (msg/s, latencies, slowest commit,
# errors) and the nodes' snapshot log lines.
# Usage: benches/snapshot-under-load.sh [WORK_DIR]   (default ./snapshot-run,
#   about 3.5 GB while it runs; the databases are removed at the end).
#   HAMGAM_NODE=PATH runs another build of the node, to compare two builds.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-./snapshot-run}
cargo build --release -p hamgam-node -p hamgam-tools
node=${HAMGAM_NODE:-./target/release/hamgam-node}
bench=./target/release/hamgam-bench
cli=./target/release/hamgam
servers=127.0.0.1:7450,127.0.0.1:7460,127.0.0.1:7470

rm -rf "$work"
mkdir -p "$work"
pids=()
stop_nodes() {
    kill "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
    rm -rf "$work"/node-*/db "$work"/node-*/snapshots "$work"/node-*/wal "$work"/node-*/chunks
}
trap stop_nodes EXIT

"$node" init --out "$work" --data-shards 1 \
    --initial-cluster 1=127.0.0.1:7451,2=127.0.0.1:7461,3=127.0.0.1:7471 >"$work/init.out"
for id in 1 2 3; do
    "$node" --data "$work/node-$id" --listen "127.0.0.1:74$((id + 4))0" >"$work/node-$id.log" 2>&1 &
    pids+=($!)
done
sleep 5

echo "loading the shard:"
"$bench" messages --server "$servers" --clients 64 --message-bytes 1024 --duration-secs 40 --warmup-secs 2

token=$("$cli" admin --data "$work/node-1" join-token | tail -1)
"$bench" messages --server "$servers" --clients 32 --duration-secs 40 --warmup-secs 2 >"$work/during.out" &
bench_pid=$!
sleep 8
"$node" join --via 127.0.0.1:7451 --token "$token" --data "$work/node-4" \
    --listen 127.0.0.1:7480 --peer-listen 127.0.0.1:7481 >"$work/node-4.log" 2>&1 &
pids+=($!)
sleep 5
"$cli" admin --data "$work/node-1" drain 3 | tail -1
wait "$bench_pid"

echo "while the snapshot was made, sent and installed:"
cat "$work/during.out"
grep -ah "made a snapshot\|received a snapshot\|installed a snapshot" "$work"/node-*.log \
    | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-200
