#!/usr/bin/env bash
# Compares two builds of the cloud store on the same work: `hamgam put` of
# one large file of random bytes, `hamgam backup` of a folder, or `hamgam
# restore` of a folder's backup, each run against a fresh lone node, A and B alternating (and taking
# turns at going first) every round, so that the machine's drift falls on
# both alike. Prints each run (wall seconds, the client's and the node's
# CPU seconds) and the means of each build.
#
#   benches/ab-store.sh [--rounds N] [--put MIB | --backup DIR | --restore DIR] A_DIR B_DIR
#
# A_DIR and B_DIR each hold a `hamgam-node` and a `hamgam` binary. To vary
# one side only, give both directories the same binary of the other. Build
# and copy aside first, e.g.
#   cargo build --release -p hamgam-node -p hamgam-tools
#   mkdir -p /tmp/a && cp target/release/hamgam-node target/release/hamgam /tmp/a
# --put (the default, 512 MiB) makes the file in a temporary folder; files
# are read from the page cache in every run alike (they are read once before).
# --restore backs the folder up first (the same build, not timed), then times
# `hamgam restore 1 OUT --no-sync` into an empty folder: what a restore costs
# with the node's packs in the page cache, as they are right after a backup.
set -euo pipefail

rounds=4 mib=512 folder="" restore=""
while [ $# -gt 2 ]; do
    case "$1" in
        --rounds) rounds=$2; shift 2 ;;
        --put) mib=$2; shift 2 ;;
        --backup) folder=$(realpath "$2"); shift 2 ;;
        --restore) folder=$(realpath "$2") restore=yes; shift 2 ;;
        *) echo "unknown flag $1" >&2; exit 2 ;;
    esac
done
if [ $# -ne 2 ]; then
    # The comment at the top of this file, which is its usage.
    awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0" >&2
    exit 2
fi
a_dir=$(realpath "$1") b_dir=$(realpath "$2")
for dir in "$a_dir" "$b_dir"; do
    for binary in hamgam-node hamgam; do
        [ -x "$dir/$binary" ] || { echo "no $binary in $dir" >&2; exit 2; }
    done
done

source "$(dirname "$0")/start-node.sh"
work=$(mktemp -d)
node_pid=""
stop_node() {
    [ -z "$node_pid" ] || kill -9 "$node_pid" 2>/dev/null || true
    [ -z "$node_pid" ] || wait "$node_pid" 2>/dev/null || true
    node_pid=""
}
trap 'stop_node; rm -rf "$work"' EXIT

if [ -z "$folder" ]; then
    head -c $((mib << 20)) /dev/urandom >"$work/large.bin"
    what=(put "$work/large.bin" /large.bin)
    cat "$work/large.bin" >/dev/null
else
    if [ -z "$restore" ]; then
        what=(backup "$folder" --label ab)
    else
        what=(restore 1 "$work/restored" --no-sync)
    fi
    find "$folder" -type f -print0 | xargs -0 cat >/dev/null
fi
ticks=$(getconf CLK_TCK)
node_cpu() { awk -v t="$ticks" '{ printf "%.2f", ($14 + $15) / t }' "/proc/$1/stat"; }

# One run: prints a row and appends "build wall client node" to $work/runs.
run() { # round build dir
    local dir=$3 data="$work/node" profile="$work/profile"
    rm -rf "$data"
    start_node "$dir/hamgam-node" "$work/node.log" --data "$data" --listen 127.0.0.1:7985
    local cli=("$dir/hamgam" --profile "$profile" --server 127.0.0.1:7985)
    sign_in "$dir/hamgam" "$profile" 127.0.0.1:7985 || exit 1
    if [ -n "$restore" ]; then
        rm -rf "$work/restored"
        "${cli[@]}" backup "$folder" --label ab >"$work/client.log" 2>&1 || {
            echo "the $2 client's backup failed:" >&2
            tail -5 "$work/client.log" >&2
            exit 1
        }
    fi
    local before after times
    before=$(node_cpu "$node_pid")
    times=$({ TIMEFORMAT='%R %U %S'; time "${cli[@]}" "${what[@]}" >"$work/client.log" 2>&1; } 2>&1) || {
        echo "the $2 client failed:" >&2
        tail -5 "$work/client.log" >&2
        exit 1
    }
    after=$(node_cpu "$node_pid")
    stop_node
    local wall user sys
    read -r wall user sys <<<"$times"
    local client node
    client=$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.2f", u + s }')
    node=$(awk -v a="$before" -v b="$after" 'BEGIN { printf "%.2f", b - a }')
    printf '| %s | %s | %s | %s | %s |\n' "$1" "$2" "$wall" "$client" "$node"
    echo "$2 $wall $client $node" >>"$work/runs"
}

echo "${what[0]} ${what[1]}, $rounds rounds"
printf '| round | build | wall s | client CPU s | node CPU s |\n|---|---|---|---|---|\n'
for round in $(seq "$rounds"); do
    if [ $((round % 2)) = 1 ]; then
        run "$round" A "$a_dir"
        run "$round" B "$b_dir"
    else
        run "$round" B "$b_dir"
        run "$round" A "$a_dir"
    fi
done
awk '{ w[$1] += $2; c[$1] += $3; n[$1] += $4; k[$1]++ }
    END { for (b in w) printf "%s mean: wall %.2f s, client %.2f CPU s, node %.2f CPU s (%d runs)\n",
        b, w[b] / k[b], c[b] / k[b], n[b] / k[b], k[b] }' "$work/runs" | sort
