#!/usr/bin/env bash
# The write cache's benchmark (issue 17's speed targets), run by
# scripts/bench.sh and on its own:
#
#   scripts/bench-cache.sh                          # builds, then runs
#   RUNS=5 SIZE=1G scripts/bench-cache.sh
#   NBDFAULT=/path/to/nbdfault scripts/bench-cache.sh
#   NBDFAULT_BEFORE=/path/to/older/nbdfault scripts/bench-cache.sh
#   SAMPLES=1 scripts/bench-cache.sh                # also every run's seconds
#
# Against qemu-nbd serving a tmpfs file, over TCP and unix sockets, medians
# of RUNS alternating runs of:
#   - sequential writes: nbdcopy --flush of a SIZE file of random data (one
#     flush at the end, so the whole copy is written back before it ends),
#     and fio's nbd engine writing SIZE in 1 MiB writes at queue depth 16
#     with a flush every 64 writes;
#   - sequential reads of what the cache does not hold: nbdcopy of the disk
#     to null: once the writes above were flushed, the cache holds nothing;
#     the proxy's splice counter says whether the fast path was kept;
#   - random 4 KiB reads and writes, half each, fio at queue depth 16 over
#     the whole disk, RANDOM_IO (default 128M) of them, then one flush
#     (so what the cache still holds is written back within the run, not
#     in the next one's time): with the cache, the reads look up the
#     writes held;
# through the transparent proxy (`--write-cache off`, the default) and
# through `--write-cache volatile`, and with NBDFAULT_BEFORE through the
# transparent proxy of another build (one without the cache: "off costs
# nothing" is then the two transparent columns agreeing).
# Target: write-back ≥ 0.8x the transparent proxy on sequential writes;
# reads at the transparent proxy's speed, spliced. Nothing here fails on a
# number.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

RUNS=${RUNS:-3}
SIZE=${SIZE:-1G}
RANDOM_IO=${RANDOM_IO:-128M}
TRANSPORTS=${TRANSPORTS:-tcp unix}

for t in qemu-nbd nbdcopy fio curl bc ss python3 numfmt /usr/bin/time; do
    command -v "$t" >/dev/null || { echo "error: $t missing (scripts/bench.sh installs it as root)" >&2; exit 1; }
done
if [ -z "${NBDFAULT:-}" ]; then
    cargo build --release --quiet
    NBDFAULT=$PWD/target/release/nbdfault
fi
proxies="plain cache"
declare -A proxy_pid
[ -n "${NBDFAULT_BEFORE:-}" ] && proxies="before $proxies"

source scripts/bench-common.sh
bench_dir nbdfault-bench-cache
ports qemu before plain cache

echo "preparing a $SIZE file of random data in $work ..."
truncate -s "$SIZE" "$work/src.img"
dd if=/dev/urandom of="$work/src.img" bs=1M count=$(( $(stat -c %s "$work/src.img") / 1048576 )) conv=notrunc status=none
bytes=$(stat -c %s "$work/src.img")
truncate -s "$bytes" "$work/disk.img"

for t in $TRANSPORTS; do
    if [ "$t" = tcp ]; then
        qemu-nbd -f raw --persistent --shared=64 -b 127.0.0.1 -p "${port_of[$t-qemu]}" "$work/disk.img" &
    else
        qemu-nbd -f raw --persistent --shared=64 -k "$(addr "$t" qemu)" "$work/disk.img" &
    fi
    pids+=($!)
    wait_up "$t" qemu
    up=$(addr "$t" qemu)
    if [ -n "${NBDFAULT_BEFORE:-}" ]; then
        "$NBDFAULT_BEFORE" proxy --listen "$(addr "$t" before)" --upstream "$up" >/dev/null 2>&1 &
        pids+=($!)
        proxy_pid[$t-before]=$!
    fi
    "$NBDFAULT" proxy --listen "$(addr "$t" plain)" --upstream "$up" \
        --control "$work/$t-plain.control" >/dev/null 2>&1 &
    pids+=($!)
    proxy_pid[$t-plain]=$!
    "$NBDFAULT" proxy --listen "$(addr "$t" cache)" --upstream "$up" --write-cache volatile \
        --control "$work/$t-cache.control" >/dev/null 2>&1 &
    pids+=($!)
    proxy_pid[$t-cache]=$!
    for s in $proxies; do wait_up "$t" "$s"; done
done

# A counter of a proxy's /metrics (0 without a control socket).
metric() {
    local sock=$work/$1.control
    [ -S "$sock" ] || { echo 0; return; }
    curl -s --unix-socket "$sock" http://localhost/metrics | awk -v m="$2" '$1 == m {print $2}' | head -1
}
spliced='nbdfault_spliced_bytes_total{direction="to-client"}'

median() { sort -g | awk '{a[NR]=$1} END {m=(NR+1)/2; if (NR%2) print a[m]; else print (a[m-0.5]+a[m+0.5])/2}'; }
declare -A samples read_spliced client_cpu proxy_cpu
# CPU seconds (user and system) process $1 has used so far.
ticks() { awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$1/stat"; }
# One client run (the rest of the arguments) of KEY (TRANSPORT-PROXY-WORK):
# its wall seconds into samples[KEY], the client's CPU seconds into
# client_cpu[KEY], the proxy's into proxy_cpu[KEY].
measure() {
    local key=$1 t0 t1 p0 p1 pid
    shift
    pid=${proxy_pid[${key%-*}]}
    p0=$(ticks "$pid")
    t0=$(date +%s.%N)
    /usr/bin/time -f "%U %S" -o "$work/client.cpu" "$@" >/dev/null 2>"$work/client.err" ||
        { echo "error: $key: $*" >&2; cat "$work/client.err" >&2; exit 1; }
    t1=$(date +%s.%N)
    p1=$(ticks "$pid")
    samples[$key]+="$(echo "$t1 - $t0" | bc -l) "
    client_cpu[$key]+="$(awk '{print $1 + $2}' "$work/client.cpu") "
    proxy_cpu[$key]+="$(echo "$p1 - $p0" | bc -l) "
}
med() { echo "${samples[$1]}" | tr ' ' '\n' | grep . | median; }
# The median of a list of samples.
med_of() { echo "$1" | tr ' ' '\n' | grep . | median | awk '{printf "%.2f", $1}'; }

echo "sequential writes and reads of $SIZE ($RUNS alternating runs per transport and proxy) ..."
for _ in $(seq "$RUNS"); do
    for t in $TRANSPORTS; do
        for s in $proxies; do
            u=$(uri "$t" "$s")
            measure "$t-$s-nbdcopy" nbdcopy --flush "$work/src.img" "$u"
            measure "$t-$s-fio" fio --name=w --ioengine=nbd --uri="$u" --rw=write --bs=1m \
                --iodepth=16 --size="$bytes" --fsync=64 --output-format=json --output="$work/fio.json"
            before=$(metric "$t-$s" "$spliced")
            measure "$t-$s-read" nbdcopy "$u" null:
            after=$(metric "$t-$s" "$spliced")
            read_spliced[$t-$s]=$(( ${after:-0} - ${before:-0} ))
            measure "$t-$s-random" fio --name=r --ioengine=nbd --uri="$u" --rw=randrw --bs=4k \
                --iodepth=16 --size="$bytes" --io_size="$RANDOM_IO" --end_fsync=1 --output-format=json \
                --output="$work/fio.json"
        done
    done
done

random_bytes=$(numfmt --from=iec "$RANDOM_IO")
# MiB/s of the runs $1 (of $2 bytes each; default SIZE).
mib() { echo "scale=0; ${2:-$bytes} / $(med "$1") / 1048576" | bc -l; }
# Throughput of $2 against $1's (the inverse of their times).
ratio() { echo "scale=2; $(med "$1") / $(med "$2")" | bc -l | sed 's/^\./0./'; }
name() { if [ "$1" = tcp ]; then echo TCP; else echo unix; fi; }
echo
echo "## nbdfault write cache benchmark, $(date -u +%Y-%m-%d), $(nproc) cores, RUNS=$RUNS SIZE=$SIZE"
echo
header="| MiB/s |"
rule="|---|"
[ -n "${NBDFAULT_BEFORE:-}" ] && { header+=" transparent, NBDFAULT_BEFORE |"; rule+="---|"; }
echo "$header transparent (--write-cache off) | --write-cache volatile |"
echo "$rule---|---|"
for t in $TRANSPORTS; do
    for w in nbdcopy fio read random; do
        n=$bytes
        case $w in
            nbdcopy) what="sequential write, nbdcopy --flush" ;;
            fio) what="sequential write, fio 1M QD16, flush every 64" ;;
            read) what="sequential read of uncached data, nbdcopy" ;;
            random) what="random 4K reads and writes, fio QD16, $RANDOM_IO"; n=$random_bytes ;;
        esac
        row="| $(name "$t"): $what |"
        [ -n "${NBDFAULT_BEFORE:-}" ] && row+=" $(mib "$t-before-$w" "$n") ($(ratio "$t-plain-$w" "$t-before-$w")x) |"
        row+=" $(mib "$t-plain-$w" "$n") | $(mib "$t-cache-$w" "$n") ($(ratio "$t-plain-$w" "$t-cache-$w")x) |"
        echo "$row"
    done
done
echo
echo "CPU seconds of one run (medians), client / nbdfault:"
echo
echo "| CPU s |$( [ -n "${NBDFAULT_BEFORE:-}" ] && echo " transparent, NBDFAULT_BEFORE |") transparent | volatile |"
echo "|---|$( [ -n "${NBDFAULT_BEFORE:-}" ] && echo "---|")---|---|"
for t in $TRANSPORTS; do
    for w in nbdcopy fio read random; do
        row="| $(name "$t") $w |"
        for s in $proxies; do
            k=$t-$s-$w
            row+=" $(med_of "${client_cpu[$k]}") / $(med_of "${proxy_cpu[$k]}") |"
        done
        echo "$row"
    done
done
echo
for t in $TRANSPORTS; do
    echo "$(name "$t") reads, bytes spliced (last run): transparent $(( read_spliced[$t-plain] * 100 / bytes ))%, volatile $(( read_spliced[$t-cache] * 100 / bytes ))%"
done
if [ -n "${SAMPLES:-}" ]; then
    echo "seconds of each run:"
    for k in $(printf '%s\n' "${!samples[@]}" | sort); do echo "  $k: ${samples[$k]}"; done
fi
echo "targets: --write-cache volatile >= 0.8x transparent on sequential writes; uncached reads as fast, spliced; the transparent columns alike (random I/O has no target: it shows what looking up the cache costs)"
