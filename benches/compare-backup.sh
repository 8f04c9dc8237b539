#!/usr/bin/env bash
# Backs up the same data set with borg (zstd,3), restic, casync and Hamgam
# (one node, and a three-node cluster on loopback), all in one run on this
# machine, then the edited version of the data set, then restores; prints
# seconds, MB/s and stored sizes for each, and raw quinn throughput against
# a large file's upload. Installs borgbackup, restic and casync from Debian
# if they are missing.
#
#   benches/compare-backup.sh V1_DIR V2_DIR [WORK_DIR]
#
# Make the data sets with the generator of the benchmark suite:
#   gen_dataset.py V1_DIR --size-mib 1024 --seed 42
#   cp -a V1_DIR V2_DIR && gen_dataset.py V2_DIR --edit --seed 42
#
# With HAMGAM_BIN_DIR set to a folder of built programs (deploy/build-pgo.sh
# makes one), its hamgam-node, hamgam and hamgam-bench run instead of a fresh
# plain release build.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
source benches/start-node.sh

v1=$(realpath "$1")
v2=$(realpath "$2")
work=$(realpath -m "${3:-$(mktemp -d)}")
mkdir -p "$work"

missing=()
for tool in borg:borgbackup restic:restic casync:casync; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
if [ -n "${HAMGAM_BIN_DIR:-}" ]; then
    bin=$(realpath "$HAMGAM_BIN_DIR")
else
    cargo build --release -p hamgam-node -p hamgam-tools
    bin="$repo/target/release"
fi

mib() { du -sb "$1" | awk '{ printf "%.1f", $1 / 1048576 }'; }
bytes_of() { du -sb "$1" | awk '{ print $1 }'; }
total=$(bytes_of "$v1")
rate() { awk -v b="$1" -v s="$2" 'BEGIN { printf "%.0f", b / s / 1e6 }'; }
# Runs a command, printing nothing, and sets $secs to its wall time.
timed() {
    local start end
    start=$(date +%s.%N)
    "$@" >"$work/last.log" 2>&1
    end=$(date +%s.%N)
    secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", b - a }')
}
sync_drop() { sync; }
# Every tool backs up the same path: the first version, then the edited one
# put in its place (as a person's folder changes). Modification times are
# kept, and every tool is told to judge a file unchanged by size and mtime.
data="$work/data"
stage() { rm -rf "$data" && cp -a "$1" "$data"; }

printf '| tool | backup s | MB/s | stored MiB | re-backup s | re-backup adds MiB | restore s | restore MB/s |\n'
printf '|---|---|---|---|---|---|---|---|\n'
row() { # tool backup_s stored rebackup_s added restore_s
    printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "$1" "$2" "$(rate "$total" "$2")" "$3" "$4" "$5" "$6" "$(rate "$total" "$6")"
}

# ---- borg ------------------------------------------------------------------
export BORG_PASSPHRASE="" BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
rm -rf "$work/borg" "$work/borg-out"
borg init -e none "$work/borg" >/dev/null
stage "$v1"; sync_drop
timed borg create --files-cache mtime,size --compression zstd,3 "$work/borg::v1" "$data"; b1=$secs; s1=$(mib "$work/borg")
stage "$v2"; sync_drop
timed borg create --files-cache mtime,size --compression zstd,3 "$work/borg::v2" "$data"; b2=$secs; s2=$(mib "$work/borg")
mkdir -p "$work/borg-out"
sync_drop; timed bash -c "cd '$work/borg-out' && borg extract '$work/borg::v1'"; r=$secs
# borg restores absolute paths under the target.
row borg "$b1" "$s1" "$b2" "$(awk -v a="$s1" -v b="$s2" 'BEGIN { printf "%.1f", b - a }')" "$r"
rm -rf "$work/borg-out"

# ---- restic ----------------------------------------------------------------
export RESTIC_PASSWORD=bench RESTIC_REPOSITORY="$work/restic"
rm -rf "$work/restic" "$work/restic-out"
restic init >/dev/null
stage "$v1"; sync_drop
timed restic backup --host bench --ignore-inode --ignore-ctime "$data"; b1=$secs; s1=$(mib "$work/restic")
stage "$v2"; sync_drop
timed restic backup --host bench --ignore-inode --ignore-ctime "$data"; b2=$secs; s2=$(mib "$work/restic")
first=$(restic snapshots --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["short_id"])')
sync_drop; timed restic restore "$first" --target "$work/restic-out"; r=$secs
row restic "$b1" "$s1" "$b2" "$(awk -v a="$s1" -v b="$s2" 'BEGIN { printf "%.1f", b - a }')" "$r"
rm -rf "$work/restic-out"

# ---- casync ----------------------------------------------------------------
rm -rf "$work/casync" "$work/casync-out" && mkdir -p "$work/casync"
stage "$v1"; sync_drop
timed casync make --store="$work/casync/store" "$work/casync/v1.caidx" "$data"; b1=$secs; s1=$(mib "$work/casync")
stage "$v2"; sync_drop
timed casync make --store="$work/casync/store" "$work/casync/v2.caidx" "$data"; b2=$secs; s2=$(mib "$work/casync")
sync_drop; timed casync extract --store="$work/casync/store" "$work/casync/v1.caidx" "$work/casync-out"; r=$secs
row casync "$b1" "$s1" "$b2" "$(awk -v a="$s1" -v b="$s2" 'BEGIN { printf "%.1f", b - a }')" "$r"
rm -rf "$work/casync-out"

# ---- hamgam ----------------------------------------------------------------
pids=()
stop_nodes() { kill -TERM "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}" 2>/dev/null || true; pids=(); }
trap stop_nodes EXIT

hamgam_run() { # name server chunks-dirs...
    local name=$1 server=$2; shift 2
    local profile="$work/$name-profile"
    rm -rf "$work/$name-out"
    sign_in "$bin/hamgam" "$profile" "$server"
    stage "$v1"; sync_drop
    timed "$bin/hamgam" --profile "$profile" backup "$data" --label bench; b1=$secs
    local stored1=0 dir
    for dir in "$@"; do stored1=$((stored1 + $(bytes_of "$dir"))); done
    stage "$v2"; sync_drop
    timed "$bin/hamgam" --profile "$profile" backup "$data" --label bench; b2=$secs
    local sent
    sent=$(sed -n 's/.*sent \([0-9.]* [KMG]*i*B\).*/\1/p' "$work/last.log")
    sync_drop; timed "$bin/hamgam" --profile "$profile" restore 1 "$work/$name-out"; r=$secs
    # Stored size: one copy's worth (a cluster keeps three).
    row "$name" "$b1" "$(awk -v b="$stored1" -v n="$#" 'BEGIN { printf "%.1f", b / n / 1048576 }')" "$b2" "sent $sent" "$r"
    diff -r "$v1" "$work/$name-out" >/dev/null || echo "!! $name: the restore differs from the original"
    rm -rf "$work/$name-out"
    # Without waiting for the disk at the end, as restic, borg and casync restore.
    sync_drop; timed "$bin/hamgam" --profile "$profile" restore 1 "$work/$name-out" --no-sync
    notes+=("$name: restore --no-sync (no final fsync, as the others) ${secs} s, $(rate "$total" "$secs") MB/s")
    rm -rf "$work/$name-out"
}
notes=()

rm -rf "$work/hamgam-1"
start_node "$bin/hamgam-node" "$work/hamgam-1.log" --data "$work/hamgam-1" --listen 127.0.0.1:7640
pids+=("$node_pid")
hamgam_run "hamgam (1 node)" 127.0.0.1:7640 "$work/hamgam-1/chunks"
stop_nodes

rm -rf "$work/hamgam-3"
"$bin/hamgam-node" init --out "$work/hamgam-3" --initial-cluster 1=127.0.0.1:7651,2=127.0.0.1:7661,3=127.0.0.1:7671 >/dev/null
for id in 1 2 3; do
    "$bin/hamgam-node" --data "$work/hamgam-3/node-$id" --listen "127.0.0.1:76$((id + 4))0" >"$work/hamgam-3/node-$id.log" 2>&1 &
    pids+=($!)
done
sleep 8
hamgam_run "hamgam (3 nodes)" 127.0.0.1:7650 "$work"/hamgam-3/node-*/chunks
stop_nodes

# ---- one large file against raw quinn ----------------------------------------
# Raw quinn and the upload alternate for three rounds (each upload to a fresh
# node): this machine's speed drifts by tens of percent within a minute, and
# the ratio of medians is the figure.
head -c $((512 << 20)) /dev/urandom >"$work/large.bin"
cat "$work/large.bin" >/dev/null
raws=() puts=()
for round in 1 2 3; do
    raws+=("$("$bin/hamgam-bench" quic-raw --mib 512 | awk '{ print $(NF-1) }')")
    rm -rf "$work/hamgam-large"
    start_node "$bin/hamgam-node" "$work/hamgam-large.log" --data "$work/hamgam-large" --listen 127.0.0.1:7690
    pids+=("$node_pid")
    profile="$work/large-profile"
    sign_in "$bin/hamgam" "$profile" 127.0.0.1:7690
    timed "$bin/hamgam" --profile "$profile" put "$work/large.bin" /large.bin
    stop_nodes
    puts+=("$(rate $((512 << 20)) "$secs")")
done
median() { printf '%s\n' "$@" | sort -n | sed -n 2p; }
large=$(median "${puts[@]}") raw=$(median "${raws[@]}")
echo
for note in "${notes[@]}"; do echo "$note"; done
echo "one 512 MiB file, three rounds: hamgam put ${puts[*]} MB/s; raw quinn (one stream) ${raws[*]} MB/s"
echo "one 512 MiB file: medians hamgam put ${large} MB/s, raw quinn ${raw} MB/s; ratio $(awk -v a="$large" -v b="$raw" 'BEGIN { printf "%.2f", a / b }')"
rm -f "$work/large.bin"
