#!/usr/bin/env bash
# Cold call benchmark: one whole `backup-hook seal` of an empty input (process start, config and
# certificate loading, mTLS handshake, GenerateDataKey, header, exit) against a running
# `kms-server dev` (software master key) on 127.0.0.1. Median of RUNS (50) after WARMUP (3), hyperfine.
#
#   bench/cold.sh
#
# Peers in the same run: `backup-hook --version` (process start and exit only) and
# `age -r RECIPIENT` of the same empty input (a local X25519 seal, no server).
# Rewrites the section between <!-- cold:begin --> and <!-- cold:end --> of docs/benchmarks.md.
# Knobs: RUNS (50), WARMUP (3), BENCH_OUT (docs/benchmarks.md), BENCH_QUIET_WAIT (120: at most that many
# seconds of waiting for a quiet machine first).
set -euo pipefail
# shellcheck source=bench/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
RUNS=${RUNS:-50}
WARMUP=${WARMUP:-3}
for t in hyperfine age age-keygen python3 strace; do
    command -v "$t" >/dev/null || bench_die "needs $t (apt-get install hyperfine age python3 strace)"
done

cargo build --release --locked --bin kms-server --bin backup-hook >&2
BIN=$(bench_bin_dir)
W=$(mktemp -d "${TMPDIR:-/tmp}/kluis-cold.XXXXXX")
SERVER_PID=""
trap 'bench_stop_server; rm -rf "$W"' EXIT
trap 'exit 130' INT TERM

bench_wait_quiet "${BENCH_QUIET_WAIT:-120}" 0.2
MACHINE=$(bench_machine_md)
bench_start_server "$W/kluis"
CFG=$W/kluis/clients/sealer.toml
age-keygen -o "$W/age.key" 2>/dev/null
RCPT=$(age-keygen -y "$W/age.key")
: > "$W/empty"
SEAL="$BIN/backup-hook --client-config $CFG seal --keyring default --backup-id cold-call -i $W/empty -o /dev/null"
$SEAL || bench_die "the cold call failed"

LOAD_BEFORE=$(cut -d' ' -f1 /proc/loadavg)
hyperfine -N --warmup "$WARMUP" --runs "$RUNS" --export-json "$W/h.json" \
    -n "backup-hook seal, empty input (whole process)" "$SEAL" \
    -n "backup-hook --version (process start only)" "$BIN/backup-hook --version" \
    -n "age -r (X25519 seal of the empty input, no server)" "age -r $RCPT -o /dev/null $W/empty" >&2
LOAD_AFTER=$(cut -d' ' -f1 /proc/loadavg)

# Where the time goes in one call: syscall time and the wall-clock gaps around connect/TLS.
strace -f -c -w -o "$W/strace-c.txt" $SEAL
strace -f -tt -e trace=connect,sendto,recvfrom,write,read,execve,exit_group -o "$W/strace-r.txt" $SEAL

python3 - "$W/h.json" "$RUNS" "$WARMUP" "$LOAD_BEFORE" "$LOAD_AFTER" "$W/strace-c.txt" "$W/strace-r.txt" > "$W/results.md" <<'PY'
import json, re, statistics, sys
from datetime import datetime
h = json.load(open(sys.argv[1]))["results"]
runs, warmup, lb, la = sys.argv[2:6]
print(f"Median of {runs} runs after {warmup} warm-up runs (hyperfine -N, no shell); load average 1 min: {lb} before, {la} after.\n")
print("| command | median ms | mean ms | min ms | max ms | user ms | system ms |")
print("|---|---:|---:|---:|---:|---:|---:|")
med = {}
for r in h:
    t = r["times"]; m = statistics.median(t) * 1e3; med[r["command"]] = m
    print(f"| {r['command']} | {m:.1f} | {statistics.mean(t)*1e3:.1f} | {min(t)*1e3:.1f} | {max(t)*1e3:.1f} | {r['user']*1e3:.1f} | {r['system']*1e3:.1f} |")
cold = med["backup-hook seal, empty input (whole process)"]
print("\n| target (issue 7) | measured | verdict |\n|---|---:|---|")
print(f"| cold `backup-hook seal` of an empty input, median <= 25 ms | {cold:.1f} ms | {'met' if cold <= 25 else 'missed'} |")
# One traced call: from the first connect() to exit, by the timestamps strace gives.
lines = open(sys.argv[7]).read().splitlines()
def ts(l):
    m = re.match(r"\d+\s+(\d+):(\d+):(\d+\.\d+)", l)
    return int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3]) if m else None
start = next((ts(l) for l in lines if "execve(" in l), None)
conn = next((ts(l) for l in lines if "connect(" in l and "AF_INET" in l), None)
end = next((ts(l) for l in reversed(lines) if "exit_group" in l), None)
if start and conn and end:
    print(f"\nOne call under `strace -f -tt` (slower than untraced): exec to the TCP connect {1e3*(conn-start):.1f} ms, "
          f"connect to exit {1e3*(end-conn):.1f} ms (TLS handshake, GenerateDataKey with its fsynced commit at the server, exit).")
print("\n<details><summary>strace -f -c -w (wall time per syscall) of one call</summary>\n\n```")
print(open(sys.argv[6]).read().strip())
print("```\n\n</details>")
PY

{
    echo "## Cold call: one \`backup-hook seal\` of an empty input"
    echo
    echo "Written by \`bench/cold.sh\`; every figure in this section is from that run."
    echo
    echo "Command (from the workspace root): \`bench/cold.sh\` (RUNS=$RUNS WARMUP=$WARMUP)."
    echo
    echo "What is timed: the whole process, \`backup-hook --client-config sealer.toml seal --keyring default --backup-id cold-call -i EMPTY -o /dev/null\`:"
    echo "start, client config and certificate loading, TCP connect and mTLS handshake to a \`kms-server dev\`"
    echo "(software master key, \`KLUIS_LOG=warn\`) on 127.0.0.1 started by the script, GenerateDataKey (recorded"
    echo "durably at the server: an fsynced commit before the reply), the age header and the empty final chunk, exit."
    echo "Client and server share the machine below."
    echo
    echo "$MACHINE"
    echo
    cat "$W/results.md"
} > "$W/block.md"
bench_replace_section cold "$W/block.md" "$BENCH_OUT"
cat "$W/block.md"
