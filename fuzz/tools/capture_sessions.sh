#!/usr/bin/env bash
# Captures real NBD sessions through nbd_capture.py and rebuilds the seed
# corpus of the session and wire targets from them.
#
#   fuzz/tools/capture_sessions.sh [CAPTURE_DIR]
#
# Needs qemu-nbd, qemu-io, nbdkit, nbdcopy, nbdinfo (Debian: qemu-utils,
# nbdkit, libnbd-bin) and an nbdfault binary ($NBDFAULT, default
# target/release/nbdfault; built if missing). Everything listens on
# 127.0.0.1 only. The raw captures go to CAPTURE_DIR (default a temporary
# directory); the seeds to fuzz/corpus/<target>/cap-*.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${1:-$(mktemp -d /tmp/nbd-captures.XXXXXX)}
mkdir -p "$out"
nbdfault=${NBDFAULT:-$root/target/release/nbdfault}
[ -x "$nbdfault" ] || (cd "$root" && cargo build --release --quiet)
work=$(mktemp -d /tmp/nbd-capture-work.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Waits for a listener without connecting to it (a connection would use up
# a single-connection server or the capture's accept).
wait_port() {
    for _ in $(seq 100); do
        [ -n "$(ss -Hltn "sport = :$1")" ] && return 0
        sleep 0.1
    done
    echo "nothing listening on port $1" >&2
    return 1
}

# scenario NAME CONNECTIONS SERVER_CMD CLIENT_CMD: SERVER_CMD and CLIENT_CMD
# are run by sh with $SP (server port) and $CP (capture port) set.
scenario() {
    local name=$1 conns=$2 server=$3 client=$4
    local sp cp
    sp=$(free_port)
    cp=$(free_port)
    SP=$sp CP=$cp W=$work sh -c "$server" >"$work/$name.server.log" 2>&1 &
    local spid=$!
    pids+=("$spid")
    wait_port "$sp"
    python3 "$here/nbd_capture.py" capture --listen "127.0.0.1:$cp" \
        --upstream "127.0.0.1:$sp" --out "$out/cap-$name" --connections "$conns" &
    local cpid=$!
    wait_port "$cp"
    SP=$sp CP=$cp W=$work sh -c "$client" >"$work/$name.client.log" 2>&1 ||
        { echo "client of $name failed:"; cat "$work/$name.client.log"; }
    wait "$cpid"
    kill "$spid" 2>/dev/null || true
    wait "$spid" 2>/dev/null || true
}

truncate -s 1M "$work/disk.raw"
qemu_ops="-c 'write -P 0x5a 0 4k' -c 'read -P 0x5a 0 4k' -c 'write -z 64k 8k' \
 -c 'discard 128k 64k' -c 'flush' -c 'map' -c 'read 512k 1k'"
# The null server forgets writes: no pattern to check.
null_ops="-c 'write -P 0x5a 0 4k' -c 'read 0 4k' -c 'write -z 64k 8k' \
 -c 'discard 128k 64k' -c 'flush' -c 'map' -c 'read 512k 1k'"

# qemu 10 client and server: extended headers, block status, zeroes, trim.
scenario qemu-io-qemu-nbd 1 \
    'exec qemu-nbd -f raw -b 127.0.0.1 -p $SP -x disk "$W/disk.raw"' \
    "qemu-io -f raw nbd://127.0.0.1:\$CP/disk $qemu_ops"
# libnbd 1.14 client (structured replies, no extended headers) copying in
# and out.
scenario nbdcopy-qemu-nbd 2 \
    'exec qemu-nbd -f raw -t -b 127.0.0.1 -p $SP -x disk "$W/disk.raw"' \
    'head -c 20000 /dev/urandom > $W/in.bin && truncate -s 64k $W/in.bin &&
     nbdcopy --connections=1 $W/in.bin nbd://127.0.0.1:$CP/disk &&
     nbdcopy --connections=1 --requests=2 nbd://127.0.0.1:$CP/disk $W/out.bin'
# nbdkit: structured replies; nbdinfo walks LIST, INFO, GO, meta contexts.
scenario nbdinfo-nbdkit 2 \
    'exec nbdkit -f -i 127.0.0.1 -p $SP memory 256k' \
    'nbdinfo --list nbd://127.0.0.1:$CP && nbdinfo --map nbd://127.0.0.1:$CP'
# nbdkit without structured replies: simple replies carrying read data.
scenario qemu-io-nbdkit-nosr 1 \
    'exec nbdkit -f --no-sr -i 127.0.0.1 -p $SP memory 1M' \
    "qemu-io -f raw nbd://127.0.0.1:\$CP $qemu_ops"
# nbdkit oldstyle with libnbd.
scenario nbdcopy-nbdkit-oldstyle 1 \
    'exec nbdkit -f --oldstyle -i 127.0.0.1 -p $SP memory 16k' \
    'nbdcopy --connections=1 nbd://127.0.0.1:$CP $W/old.bin'
# nbdfault's own null server, newstyle and oldstyle.
scenario qemu-io-nbdfault-null 1 \
    "exec '$nbdfault' null --size 1M --listen 127.0.0.1:\$SP" \
    "qemu-io -f raw nbd://127.0.0.1:\$CP $null_ops"
scenario nbdcopy-nbdfault-null-oldstyle 1 \
    "exec '$nbdfault' null --oldstyle --size 16k --listen 127.0.0.1:\$SP" \
    'nbdcopy --connections=1 nbd://127.0.0.1:$CP $W/null.bin'

python3 "$here/nbd_capture.py" seeds --captures "$out" --corpus "$root/fuzz/corpus"
echo "captures in $out"
