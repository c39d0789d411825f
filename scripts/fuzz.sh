#!/usr/bin/env bash
# Fuzzes nbdfault's protocol parser and rule-file parsers with cargo-fuzz
# (libFuzzer, AddressSanitizer, debug assertions and overflow checks on).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]      (default 60)
#
# Builds every target in fuzz/fuzz_targets/ and runs each, one after the
# other with one job, for SECONDS_PER_TARGET seconds. Then prints, per
# target, the executions, coverage and corpus size, and every finding: the
# input in hex, where it was saved, and the panic message with its stack.
# Exits 1 if anything was found.
#
# Targets (see fuzz/src/ for input formats and invariants):
#   session_to_server  client bytes from 6 reachable states (fresh, oldstyle,
#                      structured, extended, mid-negotiation, EXPORT_NAME),
#                      a simulated server answering its options
#   session_to_client  server bytes from 8 states (handshakes, transmission in
#                      simple/structured/extended mode with requests in flight)
#   session_both       both flows interleaved from a fresh session
#                      All three: no panic, no empty frame, no segment past
#                      --max-payload, and framing identical whether the
#                      stream arrives whole or cut at fuzz-chosen reads.
#   wire_headers       request/reply/option headers, option data, error
#                      replies: parse/build round trips
#   rules_yaml         rule files, YAML / QEMU injector INI: no panic,
#   rules_ini          deterministic, errors located, and what parses runs
#                      in the engine with plans inside their events
#
# Stable Rust is enough: RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass the
# sanitizer flags it needs to the stable compiler. cargo-fuzz is installed
# from crates.io if missing.
#
# Environment:
#   FUZZ_TARGETS  space-separated subset of targets (default: all)
#   FUZZ_ARGS     extra libFuzzer flags (e.g. "-max_len=65536")
#   NBDFAULT_FUZZ_KNOWN  comma-separated findings to look past (already
#                 reported, not yet fixed), so a long run is not stopped by
#                 them (see fuzz/README.md; none is open now)
#
# The seed corpus is fuzz/corpus/<target>/ (committed); what the fuzzer adds
# goes to fuzz/target/corpus/<target>/, which later runs start from too.
# Findings are saved under fuzz/artifacts/<target>/; replay one with
#   cd fuzz && cargo test --release      (replays corpus/ and artifacts/)
# or inspect it with
#   cd fuzz && cargo run --release --example show -- TARGET FILE
# New seeds from real sessions: fuzz/tools/capture_sessions.sh.
set -uo pipefail

secs=${1:-60}
case $secs in '' | *[!0-9]*) echo "usage: $0 [SECONDS_PER_TARGET]" >&2; exit 2 ;; esac
root=$(cd "$(dirname "$0")/.." && pwd)
fuzz=$root/fuzz
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install --locked cargo-fuzz || exit 1
fi

targets=${FUZZ_TARGETS:-$(cd "$fuzz/fuzz_targets" && ls *.rs | sed 's/\.rs$//')}
echo "== building: $(echo $targets)"
(cd "$root" && cargo fuzz build -O -a) || exit 1
bindir=$fuzz/target/$(rustc -vV | sed -n 's/^host: //p')/release

found=0
summary=()
for t in $targets; do
    work=$fuzz/target/corpus/$t
    art=$fuzz/artifacts/$t
    log=$fuzz/target/logs/$t.log
    mkdir -p "$work" "$art" "$(dirname "$log")"
    before=$(ls "$art" | wc -l)
    echo "== $t: ${secs}s"
    start=$(date +%s)
    # Working corpus first: new inputs land there, never in the seeds.
    # -fork=1 -ignore_crashes=1: one job, which goes on after a finding
    # (each saved under $art) for the whole time.
    "$bindir/$t" "$work" "$fuzz/corpus/$t" \
        -fork=1 -ignore_crashes=1 \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="$art/" -print_final_stats=1 ${FUZZ_ARGS:-} \
        >"$log" 2>&1
    rc=$?
    took=$(($(date +%s) - start))
    stats=$(grep -E '^#[0-9]+' "$log" | tail -1 |
        sed -E 's/^#([0-9]+):?[[:space:]]+([A-Z]+[[:space:]]+)?/\1 execs, /; s/ (lim|rss|time|job|dft_time): [0-9a-zA-Z]+//g')
    line="$t: ${took}s, ${stats:-no stats}, exit $rc"
    summary+=("$line")
    echo "   $line"
    new=$(ls -t "$art" | head -n $(($(ls "$art" | wc -l) - before)))
    if [ "$rc" -ne 0 ] || [ -n "$new" ]; then
        found=1
        echo "   $(echo "$new" | wc -w) new finding(s) in $art"
        # Each finding is run once more alone, for its message and stack.
        repro=$fuzz/target/logs/$t.repro.log
        : >"$repro"
        for f in $new; do
            echo "=== $art/$f" >>"$repro"
            "$bindir/$t" "$art/$f" -rss_limit_mb=2048 >>"$repro" 2>&1
        done
        for f in $(echo "$new" | head -5); do
            echo "   FINDING $art/$f ($(stat -c %s "$art/$f") bytes):"
            od -An -tx1 -v "$art/$f" | head -16 | sed 's/^/     /'
        done
        # Each distinct panic (or sanitizer / libFuzzer error) once: its
        # message and the stack frames in this project's code.
        awk -v root="$root" '
            { k = $0; gsub(/\([0-9]+\)|==[0-9]+==/, "", k) }
            /^=== / { f = $2; next }
            /panicked at/ { p = !seen[k]++; if (p) print "\n" f ":"; msg = 1 }
            /panicked at/ || (msg && !/^stack backtrace:/) { if (p) print; next }
            /^stack backtrace:/ { msg = 0; bt = 1; if (p) print "stack (project frames):"; next }
            bt && /^ *[0-9]+: / { fn = $0; next }
            bt && /^ *at / { if (p && index($0, root) && $0 !~ /\.cargo\/registry/) { print fn; print } next }
            /ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)/ {
                bt = 0; p = !seen[k]++; if (p) print "\n" f ":\n" $0; asan = 1; next }
            asan && /^ *#[0-9]+ / { if (p && index($0, root) && $0 !~ /\.cargo\/registry/) print; next }
            /^SUMMARY:/ { if (p) print; asan = 0 }
        ' "$repro" | head -200 | sed 's/^/     /'
        echo "   logs: $log $repro"
    fi
done

echo "== summary (${secs}s per target)"
printf '   %s\n' "${summary[@]}"
if [ "$found" -ne 0 ]; then
    echo "== FINDINGS: see above and fuzz/artifacts/"
    exit 1
fi
echo "== no findings"
