#!/usr/bin/env bash
# The benchmark command of nbdfault: nbdfault side by side with a direct
# connection and with nbdkit, over TCP loopback and over unix sockets, on
# this machine, in one run.
#
#   sudo scripts/bench.sh            # installs its tools as root, like scripts/test.sh
#   RUNS=7 SIZE=1G scripts/bench.sh  # more runs, another file size
#   NBDFAULT=/path/to/nbdfault scripts/bench.sh   # another build, not built here
#   TRANSPORTS=tcp scripts/bench.sh  # one transport only ("tcp unix" by default)
#
# Prints, as tables, medians over RUNS alternating runs (the contenders and
# the transports take turns, so drift on a shared machine hits them alike),
# each with the client's CPU (user + system of the nbdcopy or fio process)
# beside the proxy's or the server's:
#   - sequential read: nbdcopy of a SIZE tmpfs file from qemu-nbd, direct,
#     through nbdfault, through nbdkit's nbd plugin, and through nbdfault
#     with 1,000 rules that match nothing;
#   - null servers: nbdcopy --no-extents of NULL_SIZE from nbdkit's null
#     plugin and from nbdfault null;
#   - 4 KiB random reads, fio's nbd engine, queue depth 1 and 16, direct,
#     through nbdfault and through nbdfault --busy-poll 50us (FIO_RUNS
#     rounds of FIO_SECONDS each);
#   - nbdfault's resident memory idle and at peak with 1, 4, 16 and 64
#     clients each reading 256 MiB with 32 MiB requests over unix sockets
#     (a fresh proxy per count, in front of a separate `nbdfault null`:
#     nbdkit's null plugin keeps a 32 MiB buffer per request and ran out of
#     24 GiB at 64 clients);
#   - the sweep's own cost (scripts/bench-sweep.sh: full qemu-io and nbdcopy
#     sweeps, their wall time and the sweep's cost per run);
#   - the write cache (scripts/bench-cache.sh: sequential writes through
#     --write-cache volatile against the transparent proxy, nbdcopy --flush
#     and fio with a flush every 64 MiB, and reads of what it does not hold).
# Over TCP every hop is TCP (client → proxy → server), over unix every hop
# is a unix socket. Ratios are against direct (or nbdkit null), from the
# same run. Benchmarks are not tests: nothing here fails on a number.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

RUNS=${RUNS:-5}
SIZE=${SIZE:-1G}
NULL_SIZE=${NULL_SIZE:-4G}
FIO_RUNS=${FIO_RUNS:-3}
FIO_SECONDS=${FIO_SECONDS:-3}
TRANSPORTS=${TRANSPORTS:-tcp unix}

if [ "$(id -u)" -eq 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update >/dev/null && apt-get install -y qemu-utils nbdkit libnbd-bin fio bc time iproute2 >/dev/null
fi
for t in qemu-nbd nbdkit nbdcopy fio bc ss /usr/bin/time; do
    command -v "$t" >/dev/null || { echo "error: $t missing (run as root to install)" >&2; exit 1; }
done
# NBDFAULT=PATH measures another build (e.g. an older commit's) instead.
if [ -z "${NBDFAULT:-}" ]; then
    cargo build --release --quiet
    NBDFAULT=$PWD/target/release/nbdfault
fi

source scripts/bench-common.sh
bench_dir nbdfault-bench
ports qemu fault faultbp kit rules kitnull null
declare -A pid_of
started() { pids+=("$2"); pid_of[$1]=$2; }

echo "preparing a $SIZE file of random data in $work ..."
head -c "$SIZE" /dev/urandom >"$work/disk.img" 2>/dev/null || \
    { truncate -s "$SIZE" "$work/disk.img"; dd if=/dev/urandom of="$work/disk.img" bs=1M count=$(( $(stat -c %s "$work/disk.img") / 1048576 )) conv=notrunc status=none; }
bytes=$(stat -c %s "$work/disk.img")
# 1,000 rules that match nothing: reads beyond the end of the disk.
{
    echo "rules:"
    for i in $(seq 1000); do
        printf '  - name: never-%d\n    event: request\n    command: read\n    offset: 1000TiB..\n    action: error\n    errno: EIO\n' "$i"
    done
} >"$work/rules.yaml"

for t in $TRANSPORTS; do
    if [ "$t" = tcp ]; then
        qemu-nbd -f raw --persistent --shared=64 -b 127.0.0.1 -p "${port_of[$t-qemu]}" "$work/disk.img" &
        started "$t-qemu" $!
        kit_listen=(-i 127.0.0.1 -p "${port_of[$t-kit]}")
        kitnull_listen=(-i 127.0.0.1 -p "${port_of[$t-kitnull]}")
        kit_upstream=(hostname=127.0.0.1 port="${port_of[$t-qemu]}")
    else
        qemu-nbd -f raw --persistent --shared=64 -k "$(addr "$t" qemu)" "$work/disk.img" &
        started "$t-qemu" $!
        kit_listen=(-U "$(addr "$t" kit)")
        kitnull_listen=(-U "$(addr "$t" kitnull)")
        kit_upstream=(socket="$(addr "$t" qemu)")
    fi
    wait_up "$t" qemu
    up=$(addr "$t" qemu)
    "$NBDFAULT" proxy --listen "$(addr "$t" fault)" --upstream "$up" >/dev/null 2>&1 &
    started "$t-fault" $!
    "$NBDFAULT" proxy --busy-poll 50us --listen "$(addr "$t" faultbp)" --upstream "$up" >/dev/null 2>&1 &
    started "$t-faultbp" $!
    "$NBDFAULT" proxy --listen "$(addr "$t" rules)" --upstream "$up" --rules "$work/rules.yaml" >/dev/null 2>&1 &
    started "$t-rules" $!
    nbdkit -f "${kit_listen[@]}" nbd "${kit_upstream[@]}" &
    started "$t-kit" $!
    nbdkit -f "${kitnull_listen[@]}" null "$NULL_SIZE" &
    started "$t-kitnull" $!
    "$NBDFAULT" null --size "$NULL_SIZE" --listen "$(addr "$t" null)" >/dev/null 2>&1 &
    started "$t-null" $!
    for s in fault faultbp rules kit kitnull null; do wait_up "$t" "$s"; done
done

median() { sort -g | awk '{a[NR]=$1} END {m=(NR+1)/2; if (NR%2) print a[m]; else print (a[m-0.5]+a[m+0.5])/2}'; }
# CPU time (user + system, in clock ticks) a process has used so far.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

# Runs a client command once (the rest of the arguments) for key $1,
# "transport-server" or "transport-server/figure": records its wall seconds
# in samples[$1], and adds its own CPU seconds, its context switches and the
# CPU ticks the server (or proxy) process used meanwhile to client_cpu,
# client_cs and server_cpu.
declare -A samples client_cpu client_cs server_cpu
measure() {
    local key=$1 pid=${pid_of[${1%%/*}]} t0 wall user sys vol invol
    shift
    t0=$(ticks "$pid")
    /usr/bin/time -f '%e %U %S %w %c' -o "$work/time.out" "$@" >/dev/null 2>&1
    read -r wall user sys vol invol <"$work/time.out"
    server_cpu[$key]=$(( ${server_cpu[$key]:-0} + $(ticks "$pid") - t0 ))
    samples[$key]+="$wall "
    client_cpu[$key]=$(echo "${client_cpu[$key]:-0} + $user + $sys" | bc -l)
    client_cs[$key]=$(( ${client_cs[$key]:-0} + vol + invol ))
}
med() { echo "${samples[$1]}" | tr ' ' '\n' | grep . | median; }

echo "sequential reads (nbdcopy of $SIZE, $RUNS alternating runs per transport) ..."
for _ in $(seq "$RUNS"); do
    for t in $TRANSPORTS; do
        for s in qemu fault kit rules; do measure "$t-$s" nbdcopy "$(uri "$t" "$s")" null:; done
    done
done
echo "null servers (nbdcopy --no-extents of $NULL_SIZE, $RUNS alternating runs per transport) ..."
for _ in $(seq "$RUNS"); do
    for t in $TRANSPORTS; do
        for s in kitnull null; do measure "$t-$s" nbdcopy --no-extents "$(uri "$t" "$s")" null:; done
    done
done

declare -A iops
for qd in 1 16; do
    echo "4 KiB random reads, queue depth $qd (fio, $FIO_SECONDS s each, $FIO_RUNS rounds per transport) ..."
    for _ in $(seq "$FIO_RUNS"); do
        for t in $TRANSPORTS; do
            for s in qemu fault faultbp; do
                # fio's nbd engine chats on stdout: keep the JSON in a file.
                measure "$t-$s/qd$qd" fio --name=r --ioengine=nbd --uri="$(uri "$t" "$s")" --rw=randread --bs=4k \
                    --iodepth="$qd" --time_based --runtime="$FIO_SECONDS" --output-format=json \
                    --output="$work/fio.json"
                iops[$t-$s-$qd]+="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["jobs"][0]["read"]["iops"])' "$work/fio.json") "
            done
        done
    done
    for t in $TRANSPORTS; do
        for s in qemu fault faultbp; do
            iops[$t-$s-$qd]=$(echo "${iops[$t-$s-$qd]}" | tr ' ' '\n' | grep . | median)
        done
    done
done

echo "resident memory with 1, 4, 16, 64 clients reading with 32 MiB requests ..."
"$NBDFAULT" null --size 256M --listen "$work/rssnull.sock" >/dev/null 2>&1 &
pids+=($!)
for _ in $(seq 200); do [ -S "$work/rssnull.sock" ] && break; sleep 0.05; done
declare -A rss_idle rss_peak
for n in 1 4 16 64; do
    rm -f "$work/rss.sock"
    "$NBDFAULT" proxy --listen "$work/rss.sock" --upstream "$work/rssnull.sock" --max-connections 128 >/dev/null 2>&1 &
    rss_pid=$!
    pids+=($rss_pid)
    for _ in $(seq 200); do [ -S "$work/rss.sock" ] && break; sleep 0.05; done
    rss_idle[$n]=$(awk '/VmRSS/ {print $2}' "/proc/$rss_pid/status")
    clients=()
    for _ in $(seq "$n"); do
        nbdcopy --no-extents --request-size=33554432 --requests=1 --connections=1 "nbd+unix:///?socket=$work/rss.sock" null: &
        clients+=($!)
    done
    wait "${clients[@]}" || echo "warning: a client failed with $n clients" >&2
    rss_peak[$n]=$(awk '/VmHWM/ {print $2}' "/proc/$rss_pid/status")
    kill "$rss_pid"; wait "$rss_pid" 2>/dev/null || true
done

mib() { echo "scale=0; $1 / $(med "$2") / 1048576" | bc -l; }
ratio() { echo "scale=2; $1 / $2" | bc -l | sed 's/^\./0./'; }
# Seconds per run of the client's CPU, the server's (or proxy's) CPU, and
# the client's context switches per run.
ccpu() { echo "scale=2; ${client_cpu[$1]} / $2" | bc -l | sed 's/^\./0./'; }
scpu() { echo "scale=2; ${server_cpu[$1]} / $hz / $2" | bc -l | sed 's/^\./0./'; }
ccs() { echo $(( ${client_cs[$1]} / $2 )); }
name() { if [ "$1" = tcp ]; then echo TCP; else echo unix; fi; }
null_bytes=$(numfmt --from=iec "$NULL_SIZE")
echo
echo "## nbdfault benchmark, $(date -u +%Y-%m-%d), $(nproc) cores, $(awk '/model name/ {$1=$2=$3=""; print; exit}' /proc/cpuinfo | sed 's/^ *//'), $(uname -r)"
echo
echo "RUNS=$RUNS SIZE=$SIZE NULL_SIZE=$NULL_SIZE FIO_RUNS=$FIO_RUNS FIO_SECONDS=$FIO_SECONDS. nbdfault: default (proxy: one single-threaded runtime per two cores, here $(( ($(nproc) + 1) / 2 )); null: one per core). CPU: seconds per run (user + system), the client's and the proxy's; cs: the client's context switches per run."
echo
echo "| sequential read (nbdcopy, $SIZE) | direct | nbdfault | nbdkit nbd plugin | nbdfault, 1,000 non-matching rules |"
echo "|---|---|---|---|---|"
for t in $TRANSPORTS; do
    d=$(med "$t-qemu")
    echo "| $(name "$t"): MiB/s | $(mib "$bytes" "$t-qemu") | $(mib "$bytes" "$t-fault") ($(ratio "$d" "$(med "$t-fault")")x direct, $(ratio "$(med "$t-kit")" "$(med "$t-fault")")x nbdkit) | $(mib "$bytes" "$t-kit") ($(ratio "$d" "$(med "$t-kit")")x) | $(mib "$bytes" "$t-rules") ($(ratio "$(med "$t-rules")" "$(med "$t-fault")")x of no rules) |"
    echo "| $(name "$t"): client CPU s, cs | $(ccpu "$t-qemu" "$RUNS"), $(ccs "$t-qemu" "$RUNS") | $(ccpu "$t-fault" "$RUNS"), $(ccs "$t-fault" "$RUNS") | $(ccpu "$t-kit" "$RUNS"), $(ccs "$t-kit" "$RUNS") | $(ccpu "$t-rules" "$RUNS"), $(ccs "$t-rules" "$RUNS") |"
    echo "| $(name "$t"): proxy CPU s | | $(scpu "$t-fault" "$RUNS") | $(scpu "$t-kit" "$RUNS") | $(scpu "$t-rules" "$RUNS") |"
done
echo
echo "| null server (nbdcopy --no-extents, $NULL_SIZE) | nbdkit null | nbdfault null |"
echo "|---|---|---|"
for t in $TRANSPORTS; do
    k=$(med "$t-kitnull")
    echo "| $(name "$t"): MiB/s | $(mib "$null_bytes" "$t-kitnull") | $(mib "$null_bytes" "$t-null") ($(ratio "$k" "$(med "$t-null")")x nbdkit) |"
    echo "| $(name "$t"): client CPU s, cs | $(ccpu "$t-kitnull" "$RUNS"), $(ccs "$t-kitnull" "$RUNS") | $(ccpu "$t-null" "$RUNS"), $(ccs "$t-null" "$RUNS") |"
    echo "| $(name "$t"): server CPU s | $(scpu "$t-kitnull" "$RUNS") | $(scpu "$t-null" "$RUNS") |"
done
echo
# Shares of one core, over the time fio ran.
core() { echo "scale=0; 100 * $1 / $FIO_RUNS / $FIO_SECONDS" | bc -l; }
echo "| 4 KiB random read (fio) | direct | nbdfault | nbdfault --busy-poll 50us |"
echo "|---|---|---|---|"
for t in $TRANSPORTS; do
    for qd in 1 16; do
        d=${iops[$t-qemu-$qd]}
        echo "| $(name "$t"), QD $qd: IOPS | ${d%.*} | ${iops[$t-fault-$qd]%.*} ($(ratio "${iops[$t-fault-$qd]}" "$d")x) | ${iops[$t-faultbp-$qd]%.*} ($(ratio "${iops[$t-faultbp-$qd]}" "$d")x) |"
        echo "| $(name "$t"), QD $qd: client / proxy CPU, % of one core | $(core "${client_cpu[$t-qemu/qd$qd]}") | $(core "${client_cpu[$t-fault/qd$qd]}") / $(core "${server_cpu[$t-fault/qd$qd]} / $hz") | $(core "${client_cpu[$t-faultbp/qd$qd]}") / $(core "${server_cpu[$t-faultbp/qd$qd]} / $hz") |"
    done
done
echo
echo "| nbdfault resident memory (unix, 32 MiB reads) | idle | peak |"
echo "|---|---|---|"
for n in 1 4 16 64; do
    echo "| $n client(s) | $((rss_idle[$n] / 1024)) MiB | $((rss_peak[$n] / 1024)) MiB |"
done

# The sweep's own benchmark (issue 14's targets), with the same build.
echo
NBDFAULT=$NBDFAULT scripts/bench-sweep.sh

# The write cache's (issue 17's targets), with the same build.
echo
NBDFAULT=$NBDFAULT RUNS=$RUNS SIZE=$SIZE TRANSPORTS=$TRANSPORTS scripts/bench-cache.sh
