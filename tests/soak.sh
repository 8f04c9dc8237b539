#!/usr/bin/env bash
# The cluster's crash and growth tests over and over: a longer soak than CI
# runs, for before a release or after touching the raft store, the placement
# driver or the network.
#
#   tests/soak.sh [MINUTES]     (default 60)
#
# Each round runs, in release mode, the three-node crash test (SIGKILL of the
# busiest leader, a lone node) and the growth test (three to five and back
# under load). It stops at the first failure and leaves that round's output
# in soak-failure.log.
set -euo pipefail

minutes="${1:-60}"
deadline=$(( $(date +%s) + minutes * 60 ))
cargo test --release -p hamgam-tests --no-run
round=0
while [ "$(date +%s)" -lt "$deadline" ]; do
    round=$((round + 1))
    if ! cargo test --release -p hamgam-tests -- cluster:: growth:: >soak-round.log 2>&1; then
        mv soak-round.log soak-failure.log
        echo "round $round failed; see soak-failure.log"
        exit 1
    fi
    echo "round $round passed"
done
rm -f soak-round.log
echo "$round rounds passed in $minutes minutes"
