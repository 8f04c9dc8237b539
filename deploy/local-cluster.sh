#!/usr/bin/env bash
# Starts a three-node Hamgam cluster on loopback, in the foreground.
#
#   deploy/local-cluster.sh [DIR]      (default DIR: ./hamgam-cluster)
#
# Clients connect to 127.0.0.1:7450, :7460 or :7470; peers talk on :7451,
# :7461 and :7471. The first run creates the cluster (hamgam-node init);
# later runs restart it with its data. Ctrl-C stops all three cleanly.
set -euo pipefail

dir="${1:-./hamgam-cluster}"
cargo build --release -p hamgam-node -p hamgam-tools
node=./target/release/hamgam-node

if [ ! -e "$dir/node-1/cluster.toml" ]; then
    "$node" init --out "$dir" --initial-cluster 1=127.0.0.1:7451,2=127.0.0.1:7461,3=127.0.0.1:7471
fi

pids=()
stop() {
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
}
trap stop INT TERM EXIT

for id in 1 2 3; do
    "$node" --data "$dir/node-$id" --listen "127.0.0.1:74$((id + 4))0" 2>"$dir/node-$id.log" &
    pids+=($!)
done
echo "three nodes running (logs in $dir/node-N.log); try:"
echo "  ./target/release/hamgam --server 127.0.0.1:7450 signup NAME"
wait "${pids[@]}"
