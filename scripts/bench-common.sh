# Sourced by scripts/bench.sh and scripts/bench-cache.sh: where each server
# of a benchmark listens, per transport (a loopback TCP port from a free
# block, so two benchmarks on one machine do not collide, or a unix socket
# in $work), and how to wait for it; the working directory in /dev/shm and
# the processes to stop at the end. Needs $TRANSPORTS.

# bench_dir NAME: $work, a fresh directory, removed at exit with every
# process in $pids stopped.
pids=()
bench_dir() {
    work=$(mktemp -d "/dev/shm/$1.XXXXXX")
    trap cleanup EXIT
}
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}

declare -A port_of
next_port=$(( 20000 + RANDOM % 20000 ))
# ports SERVER...: a free port for each server on each transport.
ports() {
    local t s
    for t in $TRANSPORTS; do
        for s in "$@"; do
            while ss -Htan "( sport = :$next_port )" | grep -q .; do next_port=$((next_port + 1)); done
            port_of[$t-$s]=$next_port
            next_port=$((next_port + 1))
        done
    done
}
# --listen / --upstream argument, NBD URI, and readiness, per transport.
addr() { if [ "$1" = tcp ]; then echo "127.0.0.1:${port_of[$1-$2]}"; else echo "$work/$1-$2.sock"; fi; }
uri() { if [ "$1" = tcp ]; then echo "nbd://127.0.0.1:${port_of[$1-$2]}"; else echo "nbd+unix:///?socket=$work/$1-$2.sock"; fi; }
wait_up() {
    for _ in $(seq 200); do
        if [ "$1" = tcp ]; then
            ss -Hltn "( sport = :${port_of[$1-$2]} )" | grep -q . && return 0
        else
            [ -S "$work/$1-$2.sock" ] && return 0
        fi
        sleep 0.05
    done
    echo "error: $1 $2 never came up" >&2
    exit 1
}
