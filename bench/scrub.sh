#!/usr/bin/env bash
# Store scrub at scale: how long a scrub (the rewrite of the redb file that removes destroyed
# key material's bytes) holds commits, with registries of SCRUB_KEYS keys (default "100000 1000000").
#
#   bench/scrub.sh
#
# For each size, in a fresh temp dir: `kms-server dev` (software master key) is created and
# stopped; kluis-fillstore issues the keys in process through the server's KeyManager (real
# records with their secrets, audit chain and checkpoints, the real redb store), then scrubs the
# store (`KeyManager::scrub_now`, as the maintenance run does after a destruction) and reports
# the store's size before and after and the time commits waited. Big files are deleted after each size.
# Rewrites the section between <!-- scrub:begin --> and <!-- scrub:end --> of docs/benchmarks.md.
#
# Knobs: SCRUB_KEYS ("100000 1000000"), TMPDIR (where the stores live), BENCH_OUT
# (docs/benchmarks.md), BENCH_QUIET_WAIT (120), BENCH_BIN (a directory with release kms-server
# and kluis-fillstore; default: build them).
set -euo pipefail
# shellcheck source=bench/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
BENCH_NAME=scrub
BENCH_OUT=${BENCH_OUT:-$(dirname "${BASH_SOURCE[0]}")/../docs/benchmarks.md}
SCRUB_KEYS=${SCRUB_KEYS:-100000 1000000}
command -v python3 >/dev/null || bench_die "needs python3"

if [[ -n ${BENCH_BIN:-} ]]; then
    BIN=$BENCH_BIN
else
    cargo build --release --locked --bin kms-server --bin kluis-fillstore >&2
    BIN=$(bench_bin_dir)
fi
W=$(mktemp -d "${TMPDIR:-/tmp}/kluis-scrub.XXXXXX")
SERVER_PID=""
trap 'bench_stop_server; rm -rf "$W"' EXIT
R=$W/results.jsonl

bench_wait_quiet "${BENCH_QUIET_WAIT:-120}" 0.2
MACHINE=$(bench_machine_md)
FS=$(findmnt -n -o FSTYPE,SOURCE --target "$W" | awk '{print $1 " on " $2}')

for n in $SCRUB_KEYS; do
    D=$W/k$n
    bench_log "creating a dev server in $D, filling $n keys, then scrubbing"
    bench_start_server "$D"; bench_stop_server
    "$BIN/kluis-fillstore" --data-dir "$D" --keys "$n" --scrub | python3 -c "import json,sys; d=json.load(sys.stdin); d['keys']=$n; print(json.dumps(d))" >> "$R"
    rm -rf "$D"
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

{
    echo "## Store scrub"
    echo
    echo "Written by \`bench/scrub.sh\`; every figure in this section is from that run."
    echo
    echo "Command (from the workspace root): \`bench/scrub.sh\` (SCRUB_KEYS=\"$SCRUB_KEYS\"). A registry filled by"
    echo "\`kluis-fillstore\` (every key with its record, secret, expiry entry and chained audit entry), then one scrub:"
    echo "every live row copied into a new file beside the store (50,000 rows per transaction), the copy renamed"
    echo "over it, the directory synced. Commits wait for the whole scrub; reads go on. Store on $FS."
    echo
    echo "$MACHINE"
    echo
    echo "| registry | store before | store after | scrub (commits wait) s |"
    echo "|---:|---:|---:|---:|"
    python3 - "$R" <<'PY'
import json, sys
for l in open(sys.argv[1]):
    d = json.loads(l)
    s = d["scrub"]
    print(f"| {d['keys']:,} keys | {s['bytes_before']/2**20:,.0f} MiB | {s['bytes_after']/2**20:,.0f} MiB | {s['seconds']:.2f} |")
PY
    echo
    echo "Load average at the end: $LOAD_END."
} > "$W/block.md"
bench_replace_section scrub "$W/block.md" "$BENCH_OUT"
cat "$W/block.md"
