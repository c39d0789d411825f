#!/usr/bin/env bash
# The benchmark command of nbdfault: nbdfault side by side with a direct
# connection and with nbdkit's proxy, on this machine, in one run.
#
#   sudo scripts/bench.sh            # installs its tools as root, like scripts/test.sh
#   RUNS=7 SIZE=1G scripts/bench.sh  # more runs, another file size
#   NBDFAULT=/path/to/nbdfault scripts/bench.sh   # another build, not built here
#
# Prints, as tables, medians over RUNS alternating runs (the contenders
# take turns, so drift on a shared machine hits them alike):
#   - sequential read: nbdcopy of a SIZE tmpfs file from qemu-nbd, direct,
#     through nbdfault (default threads, one per two cores; --busy-poll 50us; --threads 0 =
#     tokio's work-stealing runtime), through nbdkit's nbd plugin;
#   - 4 KiB random reads, fio's nbd engine, queue depth 1 and 16, same five,
#     with the CPU each proxy used (busy-polling trades CPU for latency);
#   - null servers: nbdcopy --no-extents of 4 GiB from nbdkit's null plugin
#     and from nbdfault null (both runtimes);
#   - nbdfault with 1,000 rules that match nothing, against no rules;
#   - nbdfault's resident memory idle and at peak with 1, 4, 16 and 64
#     clients each reading 256 MiB with 32 MiB requests (a fresh proxy per
#     count, in front of a separate `nbdfault null`: nbdkit's null plugin
#     keeps a 32 MiB buffer per request and ran out of 24 GiB at 64 clients).
# Ratios are against direct (or nbdkit null). Benchmarks are not tests:
# nothing here fails on a number.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

RUNS=${RUNS:-5}
SIZE=${SIZE:-1G}
FIO_SECONDS=${FIO_SECONDS:-5}

if [ "$(id -u)" -eq 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update >/dev/null && apt-get install -y qemu-utils nbdkit libnbd-bin fio bc >/dev/null
fi
for t in qemu-nbd nbdkit nbdcopy fio bc; do
    command -v "$t" >/dev/null || { echo "error: $t missing (run as root to install)" >&2; exit 1; }
done
# NBDFAULT=PATH measures another build (e.g. an older commit's) instead.
if [ -z "${NBDFAULT:-}" ]; then
    cargo build --release --quiet
    NBDFAULT=$PWD/target/release/nbdfault
fi

work=$(mktemp -d /dev/shm/nbdfault-bench.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

wait_sock() {
    for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done
    echo "error: $1 never appeared" >&2
    exit 1
}
uri() { echo "nbd+unix:///?socket=$1"; }

echo "preparing a $SIZE file of random data in $work ..."
head -c "$SIZE" /dev/urandom >"$work/disk.img" 2>/dev/null || \
    { truncate -s "$SIZE" "$work/disk.img"; dd if=/dev/urandom of="$work/disk.img" bs=1M count=$(( $(stat -c %s "$work/disk.img") / 1048576 )) conv=notrunc status=none; }

qemu-nbd -f raw --persistent --shared=64 -k "$work/qemu.sock" "$work/disk.img" &
pids+=($!)
wait_sock "$work/qemu.sock"
"$NBDFAULT" proxy --listen "$work/fault.sock" --upstream "$work/qemu.sock" >/dev/null 2>"$work/fault.log" &
pids+=($!)
declare -A pid_of
pid_of[fault]=$!
"$NBDFAULT" proxy --threads 0 --listen "$work/fault0.sock" --upstream "$work/qemu.sock" >/dev/null 2>&1 &
pids+=($!)
pid_of[fault0]=$!
"$NBDFAULT" proxy --busy-poll 50us --listen "$work/faultbp.sock" --upstream "$work/qemu.sock" >/dev/null 2>&1 &
pids+=($!)
pid_of[faultbp]=$!
nbdkit -f -U "$work/kit.sock" nbd socket="$work/qemu.sock" &
pids+=($!)
pid_of[kit]=$!
nbdkit -f -U "$work/kitnull.sock" null 4G &
pids+=($!)
"$NBDFAULT" null --size 4G --listen "$work/null.sock" >/dev/null 2>&1 &
pids+=($!)
"$NBDFAULT" null --threads 0 --size 4G --listen "$work/null0.sock" >/dev/null 2>&1 &
pids+=($!)
# 1,000 rules that match nothing: reads beyond the end of the disk.
{
    echo "rules:"
    for i in $(seq 1000); do
        printf '  - name: never-%d\n    event: request\n    command: read\n    offset: 1000TiB..\n    action: error\n    errno: EIO\n' "$i"
    done
} >"$work/rules.yaml"
"$NBDFAULT" proxy --listen "$work/rules.sock" --upstream "$work/qemu.sock" --rules "$work/rules.yaml" >/dev/null 2>&1 &
pids+=($!)
pid_of[rules]=$!
for s in fault faultbp fault0 kit kitnull null null0 rules; do wait_sock "$work/$s.sock"; done

# Seconds (wall) for a command, to 3 decimals.
seconds() {
    local t0 t1
    t0=$(date +%s.%N)
    "$@" >/dev/null 2>&1
    t1=$(date +%s.%N)
    echo "$t1 - $t0" | bc -l
}
median() { sort -g | awk '{a[NR]=$1} END {m=(NR+1)/2; if (NR%2) print a[m]; else print (a[m-0.5]+a[m+0.5])/2}'; }
bytes=$(stat -c %s "$work/disk.img")

# CPU time (user + system, in clock ticks) a process has used so far.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

declare -A res cpu
run_alternating() { # name:sock ... ; fills res[name] with median seconds of nbdcopy
    local pairs=("$@") name sock r t0
    declare -A samples
    for r in $(seq "$RUNS"); do
        for p in "${pairs[@]}"; do
            name=${p%%:*}; sock=${p#*:}
            t0=$([ -n "${pid_of[$sock]:-}" ] && ticks "${pid_of[$sock]}" || echo 0)
            samples[$name]+="$(seconds nbdcopy ${COPY_ARGS:-} "$(uri "$work/$sock.sock")" null:) "
            if [ -n "${pid_of[$sock]:-}" ]; then
                cpu[$name]=$(( ${cpu[$name]:-0} + $(ticks "${pid_of[$sock]}") - t0 ))
            fi
        done
    done
    for p in "${pairs[@]}"; do
        name=${p%%:*}
        res[$name]=$(echo "${samples[$name]}" | tr ' ' '\n' | grep . | median)
    done
}

echo "sequential reads (nbdcopy, $RUNS alternating runs) ..."
run_alternating direct:qemu nbdfault:fault nbdfaultbp:faultbp nbdfault0:fault0 nbdkit:kit rules1000:rules
echo "null servers (nbdcopy --no-extents of 4 GiB) ..."
COPY_ARGS=--no-extents run_alternating nbdkit-null:kitnull nbdfault-null:null nbdfault0-null:null0

fio_iops() { # sock iodepth
    # fio's nbd engine chats on stdout: keep the JSON in a file.
    fio --name=r --ioengine=nbd --uri="$(uri "$work/$1.sock")" --rw=randread --bs=4k \
        --iodepth="$2" --time_based --runtime="$FIO_SECONDS" --output-format=json \
        --output="$work/fio.json" >/dev/null 2>&1
    python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["jobs"][0]["read"]["iops"])' "$work/fio.json"
}
declare -A iops fio_cpu
for qd in 1 16; do
    echo "4 KiB random reads, queue depth $qd (fio, $FIO_SECONDS s each, $RUNS rounds) ..."
    declare -A s=()
    for r in $(seq "$RUNS"); do
        for n in qemu fault faultbp fault0 kit; do
            t0=$([ -n "${pid_of[$n]:-}" ] && ticks "${pid_of[$n]}" || echo 0)
            s[$n]+="$(fio_iops "$n" "$qd") "
            if [ -n "${pid_of[$n]:-}" ]; then
                fio_cpu[$n-$qd]=$(( ${fio_cpu[$n-$qd]:-0} + $(ticks "${pid_of[$n]}") - t0 ))
            fi
        done
    done
    for n in qemu fault faultbp fault0 kit; do
        iops[$n-$qd]=$(echo "${s[$n]}" | tr ' ' '\n' | grep . | median)
    done
done

echo "resident memory with 1, 4, 16, 64 clients reading with 32 MiB requests ..."
"$NBDFAULT" null --size 256M --listen "$work/rssnull.sock" >/dev/null 2>&1 &
pids+=($!)
wait_sock "$work/rssnull.sock"
declare -A rss_idle rss_peak
for n in 1 4 16 64; do
    rm -f "$work/rss.sock"
    "$NBDFAULT" proxy --listen "$work/rss.sock" --upstream "$work/rssnull.sock" --max-connections 128 >/dev/null 2>&1 &
    rss_pid=$!
    pids+=($rss_pid)
    wait_sock "$work/rss.sock"
    rss_idle[$n]=$(awk '/VmRSS/ {print $2}' "/proc/$rss_pid/status")
    clients=()
    for _ in $(seq "$n"); do
        nbdcopy --no-extents --request-size=33554432 --requests=1 --connections=1 "$(uri "$work/rss.sock")" null: &
        clients+=($!)
    done
    wait "${clients[@]}" || echo "warning: a client failed with $n clients" >&2
    rss_peak[$n]=$(awk '/VmHWM/ {print $2}' "/proc/$rss_pid/status")
    kill "$rss_pid"; wait "$rss_pid" 2>/dev/null || true
done

hz=$(getconf CLK_TCK)
mib() { echo "scale=0; $bytes / $1 / 1048576" | bc -l; }
ratio() { echo "scale=2; $1 / $2" | bc -l | sed 's/^\./0./'; }
echo
echo "## nbdfault benchmark, $(date -u +%Y-%m-%d), $(nproc) cores, $(awk '/model name/ {$1=$2=$3=""; print; exit}' /proc/cpuinfo | sed 's/^ *//'), $(uname -r)"
echo
echo "nbdfault: default (proxy: one single-threaded runtime per two cores, here $(( ($(nproc) + 1) / 2 ))), --busy-poll 50us, and --threads 0 (tokio work-stealing); null: one runtime per core."
echo
echo "| measurement | direct | nbdfault | nbdfault --busy-poll 50us | nbdfault --threads 0 | nbdkit nbd plugin |"
echo "|---|---|---|---|---|---|"
echo "| sequential read, MiB/s (nbdcopy, $SIZE) | $(mib "${res[direct]}") | $(mib "${res[nbdfault]}") ($(ratio "${res[direct]}" "${res[nbdfault]}")x) | $(mib "${res[nbdfaultbp]}") ($(ratio "${res[direct]}" "${res[nbdfaultbp]}")x) | $(mib "${res[nbdfault0]}") ($(ratio "${res[direct]}" "${res[nbdfault0]}")x) | $(mib "${res[nbdkit]}") ($(ratio "${res[direct]}" "${res[nbdkit]}")x) |"
# Share of one core a proxy used while fio ran against it.
core() { echo "scale=0; 100 * ${fio_cpu[$1]} / $hz / $RUNS / $FIO_SECONDS" | bc -l; }
for qd in 1 16; do
    echo "| 4 KiB random read IOPS, QD $qd (fio) | ${iops[qemu-$qd]%.*} | ${iops[fault-$qd]%.*} ($(ratio "${iops[fault-$qd]}" "${iops[qemu-$qd]}")x) | ${iops[faultbp-$qd]%.*} ($(ratio "${iops[faultbp-$qd]}" "${iops[qemu-$qd]}")x) | ${iops[fault0-$qd]%.*} ($(ratio "${iops[fault0-$qd]}" "${iops[qemu-$qd]}")x) | ${iops[kit-$qd]%.*} ($(ratio "${iops[kit-$qd]}" "${iops[qemu-$qd]}")x) |"
    echo "| proxy CPU at QD $qd, % of one core | | $(core "fault-$qd") | $(core "faultbp-$qd") | $(core "fault0-$qd") | $(core "kit-$qd") |"
done
echo
echo "| measurement | value |"
echo "|---|---|"
echo "| null server, 4 GiB --no-extents, seconds: nbdkit null / nbdfault null / nbdfault null --threads 0 | ${res[nbdkit-null]} / ${res[nbdfault-null]} / ${res[nbdfault0-null]} (nbdfault at $(ratio "${res[nbdkit-null]}" "${res[nbdfault-null]}")x nbdkit's speed, $(ratio "${res[nbdkit-null]}" "${res[nbdfault0-null]}")x with --threads 0) |"
per_gib() { echo "scale=3; $1 / $hz / $RUNS / ($bytes / 1073741824)" | bc -l | sed 's/^\./0./'; }
echo "| 1,000 non-matching rules: sequential throughput vs no rules | $(ratio "${res[nbdfault]}" "${res[rules1000]}")x |"
echo "| nbdfault CPU per GiB read sequentially: no rules / 1,000 non-matching rules | $(per_gib "${cpu[nbdfault]}") s / $(per_gib "${cpu[rules1000]}") s |"
for n in 1 4 16 64; do
    echo "| nbdfault RSS with $n client(s) x 32 MiB reads: idle / peak | $((rss_idle[$n] / 1024)) MiB / $((rss_peak[$n] / 1024)) MiB |"
done
