#!/usr/bin/env bash
# Compares two builds (or two settings) of hamgam-node under the same
# message load, alternating A and B on fresh data each round, so that the
# machine's drift (on a shared host the same build varies by a tenth from
# run to run, and by half over an hour) falls on both alike. Prints each
# run and, at the end, the mean of B's throughput over A's in the same round.
#
#   benches/ab-nodes.sh [--nodes 1|3] [--rounds N] [--clients N] [--secs S] [--no-routing] A_NODE B_NODE
#
# --no-routing sends through each client's own node instead of the chat's
# shard leader: for a build from before nodes answered the route request.
#
# A_NODE and B_NODE are commands that start hamgam-node: a path to a
# binary, or `env NAME=VALUE path` to try a setting. Build each binary and
# copy it aside first, e.g.
#   cargo build --release -p hamgam-node && cp target/release/hamgam-node /tmp/node-a
# The load is `hamgam-bench messages` from this checkout's release build.
# Detecting a change of 5% takes about a dozen rounds on a noisy machine.
set -euo pipefail
cd "$(dirname "$0")/.."

nodes=1 rounds=3 clients=64 secs=8 routing=()
while [ $# -gt 2 ]; do
    case "$1" in
        --nodes) nodes=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        --clients) clients=$2; shift 2 ;;
        --secs) secs=$2; shift 2 ;;
        --no-routing) routing=(--no-routing); shift ;;
        *) echo "unknown flag $1" >&2; exit 2 ;;
    esac
done
if [ $# -ne 2 ]; then
    # The comment at the top of this file, which is its usage.
    awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0" >&2
    exit 2
fi
a_node=$1 b_node=$2
case "$nodes" in 1 | 3) ;; *) echo "--nodes takes 1 or 3" >&2; exit 2 ;; esac

cargo build --release --quiet -p hamgam-tools
bench="$(pwd)/target/release/hamgam-bench"
work=$(mktemp -d)
pids=()
stop_nodes() {
    [ ${#pids[@]} -eq 0 ] || kill -9 "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
    pids=()
}
trap 'stop_nodes; rm -rf "$work"' EXIT

wait_for() { # file pattern
    for _ in $(seq 100); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "no '$2' in $1" >&2
    return 1
}

# One run: sets $result to messages/s, p50 ms, p99 ms and the nodes' CPU
# per message (not a subshell, so that the exit trap can stop its nodes).
run() { # node-command
    local node=$1 dir="$work/run" servers flags=()
    rm -rf "$dir" && mkdir -p "$dir"
    if [ "$nodes" = 1 ]; then
        $node --data "$dir/node" --listen 127.0.0.1:7980 >"$dir/log1" 2>&1 &
        pids+=($!)
        wait_for "$dir/log1" fingerprint
        servers=127.0.0.1:7980
    else
        $node init --out "$dir" \
            --initial-cluster 1=127.0.0.1:7951,2=127.0.0.1:7961,3=127.0.0.1:7971 >/dev/null
        for id in 1 2 3; do
            $node --data "$dir/node-$id" --listen "127.0.0.1:79${id}0" >"$dir/log$id" 2>&1 &
            pids+=($!)
        done
        for id in 1 2 3; do wait_for "$dir/log$id" "listening"; done
        sleep 3 # leaders elected and spread
        servers=127.0.0.1:7910,127.0.0.1:7920,127.0.0.1:7930
        flags=(--fingerprint "$(grep -ho 'CA): [0-9A-F:]*' "$dir/log1" | head -1 | cut -c6-)")
    fi
    "$bench" messages --server "$servers" "${flags[@]}" "${routing[@]}" --node-pid "$(IFS=,; echo "${pids[*]}")" \
        --clients "$clients" --duration-secs "$secs" --warmup-secs 2 >"$dir/out" 2>&1 || true
    stop_nodes
    result=$(grep '^| hamgam' "$dir/out" | awk -F'|' '{ gsub(/ /, ""); printf "%s %s %s %s\n", $4, $5, $6, $9 }') || true
    if [ -z "$result" ]; then
        echo "the load gave no result:" >&2
        tail -5 "$dir/out" >&2
        exit 1
    fi
}

# One run printed as a row; sets $rate to its messages/s.
measure() { # round build node-command
    run "$3"
    local p50 p99 cpu
    read -r rate p50 p99 cpu <<<"$result"
    printf '| %s | %s | %s | %s | %s | %s |\n' "$1" "$2" "$rate" "$p50" "$p99" "$cpu"
}

printf '| round | build | msg/s | p50 ms | p99 ms | nodes CPU/msg |\n|---|---|---|---|---|---|\n'
ratios=()
for round in $(seq "$rounds"); do
    measure "$round" A "$a_node"
    a_rate=$rate
    measure "$round" B "$b_node"
    ratios+=("$(awk -v a="$a_rate" -v b="$rate" 'BEGIN { printf "%.3f", b / a }')")
done
echo "B/A per round: ${ratios[*]}"
printf '%s\n' "${ratios[@]}" | awk '{ s += $1; n++ } END { printf "B/A mean: %.3f over %d rounds\n", s / n, n }'
