#!/usr/bin/env bash
# The sweep's benchmark (issue 14's speed targets), run by scripts/bench.sh
# and on its own:
#
#   scripts/bench-sweep.sh                          # builds, then runs both sweeps
#   NBDFAULT=/path/to/nbdfault scripts/bench-sweep.sh
#
# Runs two full sweeps with the default fault kinds, each against a fresh
# nbdkit memory disk per run:
#   - qemu-io: write 64k, read it back, flush (the session the README shows);
#   - nbdcopy: a 1 MiB disk copied out and compared (`--verify cmp`).
# and prints, per sweep, the runs, the wall time, the runs a second and the
# sweep's own cost per run (the median and the 90th percentile of
# `sweep_us` in runs.json: everything but the client and the server).
# Targets on a 2-core machine: a full qemu-io sweep under 60 s, the own
# cost under 5 ms a run. Nothing here fails on a number.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

for t in nbdkit qemu-io nbdcopy python3; do
    command -v "$t" >/dev/null || { echo "error: $t missing (scripts/bench.sh installs it as root)" >&2; exit 1; }
done
if [ -z "${NBDFAULT:-}" ]; then
    cargo build --release --quiet
    NBDFAULT=$PWD/target/release/nbdfault
fi

work=$(mktemp -d /dev/shm/nbdfault-bench-sweep.XXXXXX)
trap 'rm -rf "$work"' EXIT

# Prints one table row from a report directory and the wall time.
row() {
    local name=$1 dir=$2 secs=$3
    python3 - "$name" "$dir/runs.json" "$secs" <<'EOF'
import json, statistics, sys
name, path, secs = sys.argv[1], sys.argv[2], float(sys.argv[3])
doc = json.load(open(path))
runs = doc["runs"] if isinstance(doc, dict) else doc
own = sorted(r["sweep_us"] / 1000 for r in runs if "sweep_us" in r)
if not own:
    sys.exit(f"error: {path} has no sweep_us")
p90 = own[min(len(own) - 1, int(len(own) * 0.9))]
print(f"{name:<10} {len(runs):>6} {secs:>9.1f} {len(runs) / secs:>8.1f} "
      f"{statistics.median(own):>12.2f} {p90:>10.2f}")
EOF
}

sweep() {
    local name=$1
    shift
    local start end
    start=$(date +%s.%N)
    # Exit status 1 means findings, which these sessions have (drops hang).
    "$NBDFAULT" sweep --report "$work/$name" "$@" >"$work/$name.out" 2>"$work/$name.err" || {
        local rc=$?
        if [ "$rc" -ne 1 ]; then
            echo "error: the $name sweep failed (exit $rc):" >&2
            cat "$work/$name.err" >&2
            exit 1
        fi
    }
    end=$(date +%s.%N)
    row "$name" "$work/$name" "$(echo "$end - $start" | bc)"
}

printf '%-10s %6s %9s %8s %12s %10s\n' sweep runs "wall (s)" "runs/s" "own ms (med)" "own ms p90"
sweep qemu-io --server 'nbdkit -f -U "$unixsocket" memory 1M' -- \
    sh -c 'qemu-io -f raw -c "write -P 7 0 64k" -c "read -P 7 0 64k" -c flush "$uri"'
truncate -s 1M "$work/src.img"
sweep nbdcopy --server "qemu-nbd -f raw -r -k \"\$unixsocket\" $work/src.img" \
    --verify "cmp \"\$dir/out.img\" $work/src.img" -- \
    sh -c 'nbdcopy "$uri" "$dir/out.img"'
echo "targets: a full qemu-io sweep under 60 s; the sweep's own cost under 5 ms a run"
