#!/usr/bin/env bash
# Restart after a crash at scale: time from spawning kms-server to serving, after kill -9, with
# registries of RESTART_KEYS keys (default "1000000 10000000").
#
#   bench/restart.sh
#
# For each size, in a fresh temp dir:
# 1. `kms-server dev` (software master key) is created and stopped; kluis-fillstore issues the
#    keys in process through the server's own KeyManager (real records, audit chain and
#    checkpoints, the real redb store and group commit; no TLS), then closes the file cleanly.
# 2. Clean start (the file closed cleanly): spawn to the "kms-server listening on" line.
# 3. RUNS (3) times: start, GenerateDataKey load (kluis-loadgen) for a moment, kill -9 during the
#    load, then the timed start: redb finds the file not closed cleanly and repairs it first.
# 4. Once more after kill -9 with the store file dropped from the page cache (posix_fadvise
#    DONTNEED on that file only): the repair reads the file from disk.
# Big files are deleted at the end of each size (disk: about 330 bytes per key).
# Rewrites the section between <!-- restart:begin --> and <!-- restart:end --> of docs/benchmarks.md.
#
# Knobs: RESTART_KEYS ("1000000 10000000"), RUNS (3), TMPDIR (where the stores live),
# BENCH_OUT (docs/benchmarks.md), BENCH_QUIET_WAIT (120), BENCH_BIN (a directory with release
# kms-server, kluis-fillstore, kluis-loadgen; default: build them).
set -euo pipefail
# shellcheck source=bench/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
RESTART_KEYS=${RESTART_KEYS:-1000000 10000000}
RUNS=${RUNS:-3}
command -v python3 >/dev/null || bench_die "needs python3"

if [[ -n ${BENCH_BIN:-} ]]; then
    BIN=$BENCH_BIN
else
    cargo build --release --locked --bin kms-server --bin kluis-fillstore --bin kluis-loadgen >&2
    BIN=$(bench_bin_dir)
fi
W=$(mktemp -d "${TMPDIR:-/tmp}/kluis-restart.XXXXXX")
SERVER_PID=""
LOADGEN_PID=""
trap 'bench_stop_server; [[ -n $LOADGEN_PID ]] && kill "$LOADGEN_PID" 2>/dev/null; rm -rf "$W"' EXIT
trap 'exit 130' INT TERM
R=$W/results.jsonl
: > "$R"

drop_cache() {
    python3 - "$1" <<'PY'
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)
PY
}
record() { echo "{\"keys\": $1, \"kind\": \"$2\", \"ready_s\": $SERVER_READY_S, \"file_bytes\": $(stat -c %s "$3")}" >> "$R"; bench_log "$1 keys, $2: serving after ${SERVER_READY_S} s"; }
# crash: the running server gets GenerateDataKey load, and kill -9 while the load runs.
crash() {
    local d=$1
    "$BIN/kluis-loadgen" --client-config "$d/clients/sealer.toml" --op generate --seconds 5 --warmup 0 --json > "$W/load.json" 2> "$W/load.err" &
    LOADGEN_PID=$!
    # A second into the load (a benchmark, not a test: the moment of the kill does not matter).
    sleep 1
    kill -KILL "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""
    wait "$LOADGEN_PID" 2>/dev/null || true; LOADGEN_PID=""
}

bench_wait_quiet "${BENCH_QUIET_WAIT:-120}" 0.2
MACHINE=$(bench_machine_md)
FS=$(findmnt -n -o FSTYPE,SOURCE --target "$W" | awk '{print $1 " on " $2}')

for n in $RESTART_KEYS; do
    D=$W/k$n
    STORE=$D/data/kluis.redb
    bench_log "creating a dev server in $D, filling $n keys"
    bench_start_server "$D"; bench_stop_server
    "$BIN/kluis-fillstore" --data-dir "$D" --keys "$n" > "$W/fill-$n.json"
    bench_start_server "$D"; record "$n" "clean" "$STORE"
    for i in $(seq 1 "$RUNS"); do
        crash "$D"
        bench_start_server "$D"; record "$n" "kill9-warm-$i" "$STORE"
    done
    crash "$D"
    drop_cache "$STORE"
    bench_start_server "$D"; record "$n" "kill9-cold" "$STORE"
    bench_stop_server
    python3 -c "import json,sys; d=json.load(open('$W/fill-$n.json')); print(json.dumps({'keys': $n, 'kind': 'fill', 'seconds': d['seconds'], 'rate': d['rate_per_second']}))" >> "$R"
    rm -rf "$D"
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

python3 - "$R" "$LOAD_END" > "$W/results.md" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
sizes = sorted({r["keys"] for r in rows})
print("| registry | store file | fill (kluis-fillstore) | clean start s | after kill -9, warm: median (runs) s | after kill -9, store not cached s |")
print("|---:|---:|---:|---:|---:|---:|")
verdicts = []
for n in sizes:
    rs = [r for r in rows if r["keys"] == n]
    clean = next(r for r in rs if r["kind"] == "clean")
    warm = [r["ready_s"] for r in rs if r["kind"].startswith("kill9-warm")]
    cold = next(r for r in rs if r["kind"] == "kill9-cold")
    fill = next(r for r in rs if r["kind"] == "fill")
    size = max(r.get("file_bytes", 0) for r in rs)
    print(f"| {n:,} keys | {size/2**20:,.0f} MiB | {fill['seconds']:,.0f} s ({fill['rate']:,.0f} keys/s) | {clean['ready_s']:.3f} | "
          f"{statistics.median(warm):.3f} ({', '.join(f'{w:.3f}' for w in warm)}) | {cold['ready_s']:.3f} |")
    if n == 1_000_000:
        worst = max(warm + [cold["ready_s"]])
        verdicts.append(f"| serving <= 2 s after kill -9 with 1,000,000 keys | {statistics.median(warm):.3f} s warm (median), {cold['ready_s']:.3f} s not cached; worst {worst:.3f} s | {'met' if worst <= 2 else 'missed'} |")
print(f"\nLoad average at the end: {sys.argv[2]}.\n")
if verdicts:
    print("| target (issue 13) | measured | verdict |\n|---|---|---|")
    print("\n".join(verdicts))
PY

{
    echo "## Restart after a crash at scale"
    echo
    echo "Written by \`bench/restart.sh\`; every figure in this section is from that run."
    echo
    echo "Command (from the workspace root): \`bench/restart.sh\` (RESTART_KEYS=\"$RESTART_KEYS\" RUNS=$RUNS)."
    echo "Time from spawning \`kms-server dev\` (software master key, \`KLUIS_LOG=warn\`, 127.0.0.1, store on $FS) to its"
    echo "\`kms-server listening on\` line (polled every 5 ms). \"After kill -9\": the server was killed with SIGKILL while"
    echo "kluis-loadgen issued keys, so redb finds the file not closed cleanly and repairs it before the server serves."
    echo "The registry is filled by \`kluis-fillstore\` (bench/src/fillstore.rs): in process through the server's"
    echo "KeyManager, so every key has its registry record, expiry entry and chained audit entry, in the server's file format."
    echo
    echo "$MACHINE"
    echo
    cat "$W/results.md"
} > "$W/block.md"
bench_replace_section restart "$W/block.md" "$BENCH_OUT"
cat "$W/block.md"
