#!/usr/bin/env bash
# Grows a three-node cluster on loopback to four with a backup stored, and
# measures how the chunks follow: the seconds until every chunk sits on
# exactly its three holders (the scrub passes that follow the change of
# members send the new member its copies and the former holders drop
# theirs), and each node's chunk store on disk before, after the hand-off,
# and after the next garbage collection pass; then drains the new member and
# times it until `hamgam admin remove` takes it (no replicas, no chunks).
#
#   benches/hand-off.sh DATA_DIR [SCRUB_MIB_PER_SEC] [WORK_DIR]
#
# DATA_DIR is backed up first (e.g. the 1 GiB set of gen_dataset.py, see
# compare-backup.sh). The scrub interval is an hour, so only the changes of
# members start passes; they read at SCRUB_MIB_PER_SEC (default 64). Garbage
# is collected every 15 s. Chunk counts are the CHUNKS column of
# `hamgam admin status`. With HAMGAM_BIN_DIR set to a
# folder of built programs, its hamgam-node and hamgam run instead of a fresh
# plain release build.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
source benches/start-node.sh

data=$(realpath "$1")
scrub_mib=${2:-64}
work=$(realpath -m "${3:-$(mktemp -d)}")
rm -rf "$work/cluster"
mkdir -p "$work/cluster"
dir="$work/cluster"
if [ -n "${HAMGAM_BIN_DIR:-}" ]; then
    bin=$(realpath "$HAMGAM_BIN_DIR")
else
    cargo build --release -p hamgam-node -p hamgam-tools
    bin="$repo/target/release"
fi

"$bin/hamgam-node" init --out "$dir" --initial-cluster 1=127.0.0.1:7751,2=127.0.0.1:7761,3=127.0.0.1:7771 >/dev/null
printf '[storage]\nscrub_interval_secs = 3600\nscrub_mib_per_sec = %s\ngc_interval_secs = 15\n' "$scrub_mib" >"$dir/node.toml"
pids=()
stop_nodes() { kill -TERM "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}" 2>/dev/null || true; }
trap stop_nodes EXIT
for id in 1 2 3; do
    start_node "$bin/hamgam-node" "$dir/node-$id.log" --config "$dir/node.toml" --data "$dir/node-$id" \
        --listen "127.0.0.1:77$((id + 4))0"
    pids+=("$node_pid")
done
sign_in "$bin/hamgam" "$dir/profile" 127.0.0.1:7750
"$bin/hamgam" --profile "$dir/profile" backup "$data" --label hand-off >"$dir/backup.log" 2>&1
tail -1 "$dir/backup.log"

# The node logs, without colour codes, from byte $2 of the plain text on.
plain_log() { sed 's/\x1b\[[0-9;]*m//g' "$1" | tail -c "+$(($2 + 1))"; }
plain_size() { sed 's/\x1b\[[0-9;]*m//g' "$1" | wc -c; }
mib_on_disk() { local id out=(); for id in "$@"; do out+=("$(du -sm "$dir/node-$id/chunks" | cut -f1)"); done; echo "${out[*]}"; }
offsets() { local id; offs=(); for id in "$@"; do offs+=("$(plain_size "$dir/node-$id.log")"); done; }
# The chunk copies each member keeps, by node ("-" for one that did not say).
held_now() {
    "$bin/hamgam" admin --data "$dir/node-1" status 2>/dev/null |
        awk '$1 ~ /^[0-9]+$/ && $2 ~ /:/ && NF == 7 { print $7 }' | tr '\n' ' ' | sed 's/ $//'
}
seconds_since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

while :; do
    read -ra held <<<"$(held_now)"
    [ "${#held[@]}" -eq 3 ] && [ "${held[0]}" != "-" ] && [ "${held[0]}" = "${held[1]}" ] &&
        [ "${held[1]}" = "${held[2]}" ] && break
    sleep 1
done
all=${held[0]}
echo "three nodes: $all chunks on each; MiB of chunks on disk $(mib_on_disk 1 2 3)"

token=$("$bin/hamgam" admin --data "$dir/node-1" join-token --ttl-minutes 30 | grep -o 'hamgam-join-[^ ]*')
started=$(date +%s.%N)
# In the background without waiting: the clock runs from the join.
"$bin/hamgam-node" --config "$dir/node.toml" --data "$dir/node-4" --listen 127.0.0.1:7790 \
    join --via 127.0.0.1:7751 --token "$token" --peer-listen 127.0.0.1:7781 >"$dir/node-4.log" 2>&1 &
pids+=($!)
while :; do
    read -ra held <<<"$(held_now)"
    sum=0
    for n in "${held[@]}"; do [ "$n" = "-" ] || sum=$((sum + n)); done
    [ "${#held[@]}" -eq 4 ] && [ "${held[3]}" != "-" ] && [ "${held[3]}" -gt 0 ] && [ "$sum" -eq $((3 * all)) ] && break
    sleep 1
done
echo "hand-off done $(seconds_since "$started") s after the join:" \
    "chunks held ${held[*]}; MiB on disk $(mib_on_disk 1 2 3 4)"

offsets 1 2 3 4
for id in 1 2 3 4; do
    until plain_log "$dir/node-$id.log" "${offs[$((id - 1))]}" | grep -q "garbage collection pass done"; do sleep 1; done
done
echo "after a garbage collection pass: MiB on disk $(mib_on_disk 1 2 3 4)" \
    "(packs are rewritten once a quarter of them is garbage)"

started=$(date +%s.%N)
"$bin/hamgam" admin --data "$dir/node-1" drain 4 >/dev/null
refusals=0
until "$bin/hamgam" admin --data "$dir/node-1" remove 4 >"$dir/remove.log" 2>&1; do
    refusals=$((refusals + 1))
    sleep 1
done
echo "node 4 drained and removed $(seconds_since "$started") s after the drain ($refusals refusals):" \
    "chunks held $(held_now); MiB on disk $(mib_on_disk 1 2 3)"
