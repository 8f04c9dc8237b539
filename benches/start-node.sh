# Sourced by the benchmark and build scripts: starts a lone hamgam-node and
# returns once it serves, instead of sleeping a fixed time; signs a user in.
#
#   start_node NODE_BIN LOG ARGS...      # sets node_pid; ARGS as hamgam-node takes them
#   sign_in CLI_BIN PROFILE SERVER       # a fresh profile, signed up and logged in

start_node() {
    local binary=$1 log=$2
    shift 2
    "$binary" "$@" >"$log" 2>&1 &
    node_pid=$!
    # The node prints its certificate's fingerprint once it listens.
    for _ in $(seq 100); do
        grep -q fingerprint "$log" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "hamgam-node did not start in 10 s; its log:" >&2
    tail -5 "$log" >&2
    return 1
}

sign_in() {
    local cli=$1 profile=$2 server=$3 step
    rm -rf "$profile"
    for step in signup login; do
        echo bench-password | "$cli" --profile "$profile" --server "$server" "$step" bench --password-stdin \
            >"$profile.log" 2>&1 || {
            echo "hamgam $step at $server failed:" >&2
            tail -5 "$profile.log" >&2
            return 1
        }
    done
}
