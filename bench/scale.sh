#!/usr/bin/env bash
# Scale benchmark: a registry of SCALE_KEYS (1,000,000) issued keys.
#
#   bench/scale.sh
#
# 1. `kms-server dev` (software master key) in a fresh temp dir; restarted on the empty registry
#    START_RUNS (3) times: time from spawn to its "kms-server listening on" line, RSS 1 s later.
# 2. GenerateDataKey rate on the empty registry (kluis-loadgen, CONNS x STREAMS, BENCH_SECONDS after
#    BENCH_WARMUP), RSS after it.
# 3. Fill: kluis-loadgen generate in FILL_SECONDS (15) runs until SCALE_KEYS keys were issued; each
#    run's rate is kept (rate against registry size).
# 4. Server stopped; store file size, and per table (kluis-storestat): entries, pages, bytes.
# 5. Restart on the full registry: once with the store file dropped from the page cache
#    (posix_fadvise DONTNEED on that file only), then START_RUNS times warm; RSS 1 s after start.
# 6. GenerateDataKey and UnwrapDataKey rates on the full registry, RSS after them (unwrap only
#    here, after the store was measured: every unwrap writes an audit entry too).
# Rewrites the section between <!-- scale:begin --> and <!-- scale:end --> of docs/benchmarks.md.
#
# Knobs: SCALE_KEYS (1000000), FILL_SECONDS (15), CONNS (4), STREAMS (16), BENCH_SECONDS (10),
# BENCH_WARMUP (2), START_RUNS (3), BENCH_OUT (docs/benchmarks.md), TMPDIR (where the store lives),
# BENCH_QUIET_WAIT (120: at most that many seconds of waiting for a quiet machine first).
set -euo pipefail
# shellcheck source=bench/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
SCALE_KEYS=${SCALE_KEYS:-1000000}
FILL_SECONDS=${FILL_SECONDS:-15}
START_RUNS=${START_RUNS:-3}
command -v python3 >/dev/null || bench_die "needs python3"

cargo build --release --locked --bin kms-server --bin kluis-loadgen --bin kluis-storestat >&2
BIN=$(bench_bin_dir)
W=$(mktemp -d "${TMPDIR:-/tmp}/kluis-scale.XXXXXX")
R=$W/results
mkdir -p "$R"
SERVER_PID=""
trap 'bench_stop_server; rm -rf "$W"' EXIT
trap 'exit 130' INT TERM
D=$W/kluis
STORE=$D/data/kluis.redb

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$SERVER_PID/status"; }
# start_measured TAG: starts the server on $D, records ready seconds and RSS 1 s later.
start_measured() {
    bench_start_server "$D"
    sleep 1
    echo "{\"tag\": \"$1\", \"ready_s\": $SERVER_READY_S, \"rss_kib\": $(rss_kib), \"threads\": $(awk '/^Threads:/ {print $2}' "/proc/$SERVER_PID/status")}" >> "$R/starts.jsonl"
    bench_log "$1: listening after ${SERVER_READY_S}s, RSS $(rss_kib) KiB"
}
# loadgen TAG OP SECONDS WARMUP: one kluis-loadgen run against the running server, JSON to results.
loadgen() {
    local extra=()
    [[ $2 == unwrap ]] && extra=(--unwrap-client-config "$D/clients/restorer.toml")
    "$BIN/kluis-loadgen" --client-config "$D/clients/sealer.toml" "${extra[@]}" --op "$2" \
        --connections "$CONNS" --streams "$STREAMS" --seconds "$3" --warmup "$4" \
        --server-pid "$SERVER_PID" --tag "$1" --json > "$R/$1.json" 2> "$W/loadgen.err" \
        || { cat "$W/loadgen.err" >&2; bench_die "kluis-loadgen $2 failed"; }
    python3 - "$R/$1.json" "$(rss_kib)" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); d["rss_kib_after"] = int(sys.argv[2]); json.dump(d, open(sys.argv[1], "w"))
PY
}
# Keys issued so far by the generate runs (a lower bound: warm-up requests are not counted).
issued() { python3 -c "import json,sys; print(sum(d['requests_ok'] for d in map(json.load, map(open, sys.argv[1:])) if d['op'] == 'generate'))" "$@"; }

bench_wait_quiet "${BENCH_QUIET_WAIT:-120}" 0.2
MACHINE=$(bench_machine_md)
FS=$(findmnt -n -o FSTYPE,SOURCE --target "$W" | awk '{print $1 " on " $2}')

bench_log "creating the dev server in $W"
bench_start_server "$D"; bench_stop_server
for i in $(seq 1 "$START_RUNS"); do start_measured "empty-$i"; [[ $i -lt $START_RUNS ]] && bench_stop_server; done
loadgen empty-generate generate "$BENCH_SECONDS" "$BENCH_WARMUP"

bench_log "filling the registry to $SCALE_KEYS keys"
FILL_T0=$(date +%s.%N)
i=0
n=$(issued "$R"/*.json)
while (( n < SCALE_KEYS )); do
    i=$((i + 1))
    # The last run only as long as the remaining keys need at the rate of the run before.
    secs=$(python3 -c "import glob, json, math; f = (sorted(glob.glob('$R/fill-*.json')) or ['$R/empty-generate.json'])[-1]; rate = json.load(open(f))['rate_per_second']; print(max(1, min($FILL_SECONDS, math.ceil(($SCALE_KEYS - $n) / max(rate, 1) + 1))))")
    loadgen "fill-$(printf %03d $i)" generate "$secs" 0
    n=$(issued "$R"/*.json)
    bench_log "fill run $i: $n keys so far"
done
FILL_S=$(python3 -c "import time; print(f'{time.time() - $FILL_T0:.0f}')")
bench_stop_server
"$BIN/kluis-storestat" "$STORE" > "$R/storestat.json"

python3 - "$STORE" <<'PY'
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)
PY
start_measured "full-cold-cache"
bench_stop_server
for i in $(seq 1 "$START_RUNS"); do start_measured "full-$i"; [[ $i -lt $START_RUNS ]] && bench_stop_server; done
loadgen full-generate generate "$BENCH_SECONDS" "$BENCH_WARMUP"
loadgen full-unwrap unwrap "$BENCH_SECONDS" "$BENCH_WARMUP"
bench_stop_server
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

python3 - "$R" "$SCALE_KEYS" "$FILL_S" "$LOAD_END" > "$W/results.md" <<'PY'
import glob, json, os, statistics, sys
R, target_keys, fill_s, load_end = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
starts = [json.loads(l) for l in open(f"{R}/starts.jsonl")]
st = json.load(open(f"{R}/storestat.json"))
tables = {t["name"]: t for t in st["tables"]}
keys = tables["data_keys"]["entries"]
run = lambda tag: json.load(open(f"{R}/{tag}.json"))
fills = sorted(glob.glob(f"{R}/fill-*.json"))
mib = lambda kib: kib / 1024
def fmt(n): return f"{n:,.0f}"

print(f"Registry: {fmt(keys)} data keys (`data_keys` entries after the fill; target {fmt(target_keys)}), "
      f"filled in {fill_s} s by {len(fills)} kluis-loadgen runs; load average at the end: {load_end}.\n")

print("### Store size\n")
fb = st["file_bytes"]
print(f"Store file `kluis.redb`: {fb/2**20:,.0f} MiB, **{fb/keys:,.0f} bytes per key** (file size / data keys).\n")
print("| table | entries | entries per key | pages (4 KiB) | on-disk bytes per key | stored key+value bytes per entry | fragmented |")
print("|---|---:|---:|---:|---:|---:|---:|")
for t in sorted(st["tables"], key=lambda t: -t["page_bytes"]):
    if t["entries"] == 0 and t["page_bytes"] == 0: continue
    per_entry = t["stored_bytes"] / t["entries"] if t["entries"] else 0
    print(f"| {t['name']} | {fmt(t['entries'])} | {t['entries']/keys:.3f} | {fmt(t['leaf_pages'] + t['branch_pages'])} | "
          f"{t['page_bytes']/keys:,.1f} | {per_entry:,.0f} | {t['fragmented_bytes']/max(t['page_bytes'],1)*100:.0f} % |")
pages = sum(t["page_bytes"] for t in st["tables"])
audit = tables.get("audit", {}).get("page_bytes", 0) + tables.get("audit_checkpoints", {}).get("page_bytes", 0)
print(f"\nTables hold {pages/fb*100:.0f} % of the file ({pages/keys:,.0f} bytes per key); the rest is redb's own "
      f"allocator state and free pages. The audit trail (`audit` + `audit_checkpoints`) is {audit/keys:,.0f} bytes per key "
      f"({audit/max(pages,1)*100:.0f} % of the table pages): {tables['audit']['entries']/keys:.2f} entries per key (one per issuance, "
      f"plus the server's own: keyring creation, checkpoints), {tables['audit']['page_bytes']/max(tables['audit']['entries'],1):,.0f} bytes on disk per entry, "
      f"of which {tables['audit']['stored_bytes']/max(tables['audit']['entries'],1):,.0f} the stored record and its key "
      f"(store format 2 stores audit records compactly, see kms-server/src/store/audit.rs; format 1 stored JSON). "
      f"The data-key records (`data_keys`) take {tables['data_keys']['page_bytes']/keys:,.0f} bytes per key.\n")

print("### Start and memory\n")
print("Start: from spawning `kms-server dev --data-dir D --listen 127.0.0.1:0` to its `kms-server listening on` line "
      "(polled every 5 ms). RSS: VmRSS 1 s after that line, and after the load runs.\n")
print("| registry | start | ready s | RSS after start MiB | threads |")
print("|---|---|---:|---:|---:|")
for s in starts:
    reg = "empty" if s["tag"].startswith("empty") else fmt(keys) + " keys"
    kind = "store file dropped from page cache" if "cold" in s["tag"] else "warm (" + s["tag"].split("-")[-1] + ")"
    print(f"| {reg} | {kind} | {s['ready_s']:.3f} | {mib(s['rss_kib']):.1f} | {s['threads']} |")

print("\n### Issuance against registry size\n")
print("| registry | op | requests/s | p50 ms | p99 ms | errors | RSS after MiB | CPU server / loadgen / others |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
for tag, reg in [("empty-generate", "empty"), ("full-generate", fmt(keys) + " keys"), ("full-unwrap", fmt(keys) + " keys")]:
    d = run(tag)
    print(f"| {reg} | {d['op']} | {d['rate_per_second']:,.0f} | {d['latency_us']['p50']/1e3:.2f} | {d['latency_us']['p99']/1e3:.2f} | "
          f"{d['errors_total']} | {mib(d['rss_kib_after']):.1f} | {d.get('server_cpu_cores', 0):.2f} / {d.get('client_cpu_cores', 0):.2f} / {d.get('other_cpu_cores', 0):.2f} |")
print("\nFill runs (generate, no warm-up, the registry growing):\n")
print("| run | keys issued by its end | requests/s | p99 ms | RSS after MiB | others (cores) |")
print("|---:|---:|---:|---:|---:|---:|")
tot = run("empty-generate")["requests_ok"]
for i, f in enumerate(fills, 1):
    d = json.load(open(f)); tot += d["requests_ok"]
    print(f"| {i} | >= {fmt(tot)} | {d['rate_per_second']:,.0f} | {d['latency_us']['p99']/1e3:.2f} | {mib(d['rss_kib_after']):.1f} | {d.get('other_cpu_cores', 0):.2f} |")

warm_full = [s["ready_s"] for s in starts if s["tag"].startswith("full-") and "cold" not in s["tag"]]
cold_full = [s["ready_s"] for s in starts if "cold" in s["tag"]]
rss_empty = statistics.median(s["rss_kib"] for s in starts if s["tag"].startswith("empty"))
rss_full = statistics.median(s["rss_kib"] for s in starts if s["tag"].startswith("full"))
print("\n### Targets (issue 7)\n")
print("| target | measured | verdict |\n|---|---:|---|")
print(f"| registry <= 512 bytes per key | {fb/keys:,.0f} bytes per key ({fmt(keys)} keys, {fb/2**20:,.0f} MiB) | {'met' if fb/keys <= 512 else 'missed'} |")
worst = max(warm_full + cold_full)
print(f"| start <= 2 s with {fmt(keys)} keys | {statistics.median(warm_full):.3f} s warm (median), {cold_full[0]:.3f} s store not cached | {'met' if worst <= 2 else 'missed'} |")
ratio = rss_full / rss_empty
print(f"| memory after start independent of registry size | {mib(rss_full):.1f} MiB with {fmt(keys)} keys vs {mib(rss_empty):.1f} MiB empty ({ratio:.2f}x) | {'met' if ratio <= 1.2 else 'missed'} |")
loaded = [json.load(open(f))["rss_kib_after"] for f in fills] + [run("full-generate")["rss_kib_after"], run("full-unwrap")["rss_kib_after"]]
first_fill = json.load(open(fills[0]))["rss_kib_after"] if fills else loaded[0]
grow = max(loaded) / first_fill
first_keys = run("empty-generate")["requests_ok"] + (json.load(open(fills[0]))["requests_ok"] if fills else 0)
print(f"| memory under load independent of registry size | largest RSS after any fill or full-registry run {mib(max(loaded)):.1f} MiB vs {mib(first_fill):.1f} MiB after the first fill run ({grow:.2f}x, while the registry grew from about {fmt(first_keys)} to {fmt(keys)} keys) | {'met' if grow <= 1.25 else 'missed'} |")
ge, gf = run("empty-generate")["rate_per_second"], run("full-generate")["rate_per_second"]
print(f"| issuance with {fmt(keys)} keys (no target; against the empty registry in the same run) | {gf:,.0f}/s vs {ge:,.0f}/s ({gf/ge:.2f}x) | - |")
print("\n<details><summary>Raw: kluis-storestat and kluis-loadgen JSON</summary>\n\n```json")
print(json.dumps(st))
for f in sorted(glob.glob(f"{R}/*.json")):
    if not f.endswith("storestat.json"): print(open(f).read().strip())
print("```\n\n</details>")
PY

{
    echo "## Scale: a registry of $(python3 -c "print(f'{$SCALE_KEYS:,}')") keys"
    echo
    echo "Written by \`bench/scale.sh\`; every figure in this section is from that run."
    echo
    echo "Command (from the workspace root): \`bench/scale.sh\` (SCALE_KEYS=$SCALE_KEYS FILL_SECONDS=$FILL_SECONDS CONNS=$CONNS STREAMS=$STREAMS BENCH_SECONDS=$BENCH_SECONDS BENCH_WARMUP=$BENCH_WARMUP START_RUNS=$START_RUNS)."
    echo "\`kms-server dev\` (software master key, \`KLUIS_LOG=warn\`) on 127.0.0.1, store on $FS; keys issued by"
    echo "kluis-loadgen (identity \`sealer\`, keyring \`default\`, a unique backup id and two labels per key, every"
    echo "issuance durable and audited). Server, load generator and other work share the machine below."
    echo
    echo "$MACHINE"
    echo
    cat "$W/results.md"
} > "$W/block.md"
bench_replace_section scale "$W/block.md" "$BENCH_OUT"
cat "$W/block.md"
