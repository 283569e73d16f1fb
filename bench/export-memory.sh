#!/usr/bin/env bash
# Audit export memory: the server's peak RSS while it streams the audit trail, against the trail's
# size and the number of exports running at once (issue 15, point 3 "Export memory").
#
#   bench/export-memory.sh
#
# 1. `kms-server dev` (software master key) is created in a fresh temp dir and stopped;
#    kluis-fillstore fills its trail (each issued key is one chained, checkpointed audit entry, the
#    server's own code and store format) up to each size of EXPORT_KEYS in turn.
# 2. For each trail size, each case on a freshly started server (so VmHWM, the peak RSS from
#    /proc/PID/status, belongs to that case alone):
#    - one export: `kmsctl audit export -o FILE` (identity auditor), timed; the file is then
#      checked offline with `kmsctl audit verify` (whole trail intact) and its size is the trail's
#      export size;
#    - CONCURRENT exports started together (`kmsctl audit export | wc -c` each), with
#      `[audit] max_concurrent_exports = CONCURRENT` so all of them run;
#    - the same CONCURRENT exports with the default cap (no [audit] table): how many ran, how many
#      were refused (kmsctl exit 3, AUDIT_EXPORT_BUSY).
#    For each case: the server's VmRSS after start and its VmHWM after the case, each export's wall
#    time (spawn to exit), the bytes each export delivered, the server's CPU time in the case.
# Rewrites the section between <!-- export-memory:begin --> and <!-- export-memory:end --> of
# docs/benchmarks.md.
#
# Knobs: EXPORT_KEYS ("100000 400000": keys in the trail at each size, cumulative), CONCURRENT (20),
# TMPDIR (where the store and the single export live: about 0.6 KiB per key), BENCH_OUT
# (docs/benchmarks.md), BENCH_QUIET_WAIT (120), BENCH_BIN (a directory with release kms-server,
# kmsctl, kluis-fillstore; default: build them).
set -euo pipefail
# shellcheck source=bench/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
EXPORT_KEYS=${EXPORT_KEYS:-100000 400000}
CONCURRENT=${CONCURRENT:-20}
command -v python3 >/dev/null || bench_die "needs python3"

if [[ -n ${BENCH_BIN:-} ]]; then
    BIN=$BENCH_BIN
else
    cargo build --release --locked --bin kms-server --bin kmsctl --bin kluis-fillstore >&2
    BIN=$(bench_bin_dir)
fi
W=$(mktemp -d "${TMPDIR:-/tmp}/kluis-export-memory.XXXXXX")
SERVER_PID=""
trap 'bench_stop_server; rm -rf "$W"' EXIT
trap 'exit 130' INT TERM
D=$W/kluis
R=$W/results.jsonl
: > "$R"

status_kib() { awk -v k="$1:" '$1 == k {print $2}' "/proc/$SERVER_PID/status"; }
# The server's CPU time so far (user + system), in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$SERVER_PID/stat"; }
now() { date +%s.%N; }

# config CAP: server.toml as created, plus `[audit] max_concurrent_exports = CAP` unless CAP is "default".
config() {
    if [[ $1 == default ]]; then
        cp "$W/server.toml.orig" "$D/server.toml"
    else
        { cat "$W/server.toml.orig"; printf '\n[audit]\nmax_concurrent_exports = %s\n' "$1"; } > "$D/server.toml"
    fi
}

# one_export KEYS: one export to a file, timed, then verified offline.
one_export() {
    local keys=$1 f=$W/export.jsonl t0 t1 c0 c1 rss0 verified
    config default
    bench_start_server "$D"
    rss0=$(status_kib VmRSS)
    c0=$(cpu_ticks); t0=$(now)
    "$BIN/kmsctl" --client-config "$D/clients/auditor.toml" audit export -o "$f" 2> "$W/export.err" \
        || { cat "$W/export.err" >&2; bench_die "kmsctl audit export failed"; }
    t1=$(now); c1=$(cpu_ticks)
    echo "{\"keys\": $keys, \"case\": \"one\", \"cap\": \"default (4)\", \"started\": 1, \"rss_start_kib\": $rss0, \"hwm_kib\": $(status_kib VmHWM), \"cpu_s\": $(python3 -c "print($((c1 - c0)) / $(getconf CLK_TCK))"), \"wall_s\": [$(python3 -c "print($t1 - $t0)")], \"ok\": 1, \"refused\": 0, \"bytes\": [$(stat -c %s "$f")]}" >> "$R"
    bench_stop_server
    "$BIN/kmsctl" audit verify "$f" --public-key "$W/audit.pub" > "$W/verify.out" 2>&1 \
        || { cat "$W/verify.out" >&2; bench_die "the export did not verify"; }
    verified=$(grep -m1 'audit trail intact' "$W/verify.out") || bench_die "verify did not say the whole trail is intact: $(cat "$W/verify.out")"
    bench_log "$keys keys: one export, $(stat -c %s "$f") bytes; $verified"
    echo "{\"keys\": $keys, \"case\": \"verify\", \"line\": $(python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$verified")}" >> "$R"
    rm -f "$f"
}

# many_exports KEYS CAP: CONCURRENT exports started together against a server with CAP.
many_exports() {
    local keys=$1 cap=$2 t0 t1 c0 c1 rss0 i pids=()
    config "$cap"
    bench_start_server "$D"
    rss0=$(status_kib VmRSS)
    rm -f "$W"/job.*
    c0=$(cpu_ticks); t0=$(now)
    for i in $(seq 1 "$CONCURRENT"); do
        (
            set +e
            s=$(now)
            "$BIN/kmsctl" --client-config "$D/clients/auditor.toml" audit export 2> "$W/job.$i.err" | wc -c > "$W/job.$i.n"
            rc=${PIPESTATUS[0]}
            echo "$rc $(cat "$W/job.$i.n") $s $(now)" > "$W/job.$i"
        ) &
        pids+=("$!")
    done
    wait "${pids[@]}"
    t1=$(now); c1=$(cpu_ticks)
    python3 - "$W" "$CONCURRENT" "$keys" "$cap" "$rss0" "$(status_kib VmHWM)" "$((c1 - c0))" "$(getconf CLK_TCK)" "$t0" "$t1" >> "$R" <<'PY'
import json, sys
w, n, keys, cap, rss0, hwm, ticks, hz, t0, t1 = sys.argv[1:]
jobs = []
for i in range(1, int(n) + 1):
    rc, nbytes, s, e = open(f"{w}/job.{i}").read().split()
    err = open(f"{w}/job.{i}.err").read()
    jobs.append({"rc": int(rc), "bytes": int(nbytes), "wall": float(e) - float(s), "busy": "too many audit exports" in err, "err": err.strip()})
bad = [j for j in jobs if j["rc"] != 0 and not (j["rc"] == 3 and j["busy"])]
if bad:
    sys.exit(f"an export failed other than AUDIT_EXPORT_BUSY: {bad[0]}")
ok = [j for j in jobs if j["rc"] == 0]
print(json.dumps({"keys": int(keys), "case": "many", "cap": "default (4)" if cap == "default" else cap, "started": int(n),
                  "rss_start_kib": int(rss0), "hwm_kib": int(hwm), "cpu_s": int(ticks) / int(hz), "all_wall_s": float(t1) - float(t0),
                  "wall_s": [j["wall"] for j in ok], "ok": len(ok), "refused": len(jobs) - len(ok), "bytes": [j["bytes"] for j in ok]}))
PY
    bench_stop_server
    bench_log "$keys keys, $CONCURRENT exports, cap $cap: $(tail -1 "$R")"
}

bench_wait_quiet "${BENCH_QUIET_WAIT:-120}" 0.2
MACHINE=$(bench_machine_md)
FS=$(findmnt -n -o FSTYPE,SOURCE --target "$W" | awk '{print $1 " on " $2}')

bench_log "creating a dev server in $D"
bench_start_server "$D"
"$BIN/kmsctl" --client-config "$D/clients/auditor.toml" audit public-key > "$W/audit.pub"
bench_stop_server
cp "$D/server.toml" "$W/server.toml.orig"
filled=0
for keys in $EXPORT_KEYS; do
    (( keys > filled )) || bench_die "EXPORT_KEYS must grow: $EXPORT_KEYS"
    bench_log "filling the trail to $keys keys"
    "$BIN/kluis-fillstore" --data-dir "$D" --keys $((keys - filled)) > "$W/fill-$keys.json"
    filled=$keys
    echo "{\"keys\": $keys, \"case\": \"store\", \"store_bytes\": $(stat -c %s "$D/data/kluis.redb")}" >> "$R"
    one_export "$keys"
    many_exports "$keys" "$CONCURRENT"
    many_exports "$keys" default
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

python3 - "$R" "$LOAD_END" > "$W/results.md" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
mib = lambda kib: kib / 1024
sizes = sorted({r["keys"] for r in rows})
print("| trail | exports started together | cap | ran / refused | server RSS after start | server peak RSS (VmHWM) | time per export: median (max) | server CPU |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|")
peaks = {}
for k in sizes:
    store = next(r for r in rows if r["keys"] == k and r["case"] == "store")
    one = next(r for r in rows if r["keys"] == k and r["case"] == "one")
    trail = f"{k:,} entries, {one['bytes'][0] / 2**20:,.0f} MiB export ({store['store_bytes'] / 2**20:,.0f} MiB store)"
    for r in rows:
        if r["keys"] != k or r["case"] not in ("one", "many"):
            continue
        w = r["wall_s"]
        # Every export delivered the whole trail (later ones also the entries of the exports before them).
        assert all(b >= one["bytes"][0] for b in r["bytes"]), r
        peaks[(k, r["case"], str(r["cap"]))] = r["hwm_kib"]
        print(f"| {trail} | {r['started']} | {r['cap']} | {r['ok']} / {r['refused']} | {mib(r['rss_start_kib']):.1f} MiB | "
              f"{mib(r['hwm_kib']):.1f} MiB | {statistics.median(w):.2f} s ({max(w):.2f} s) | {r['cpu_s']:.1f} s |")
print()
for r in rows:
    if r["case"] == "verify":
        print(f"- {r['keys']:,} entries: the single export, checked offline with `kmsctl audit verify --public-key`: `{r['line']}`")
print(f"\nLoad average at the end: {sys.argv[2]}.")
PY

{
    echo "## Audit export memory"
    echo
    echo "Written by \`bench/export-memory.sh\`; every figure in this section is from that run."
    echo
    echo "Command (from the workspace root): \`bench/export-memory.sh\` (EXPORT_KEYS=\"$EXPORT_KEYS\" CONCURRENT=$CONCURRENT)."
    echo "The trail is filled by \`kluis-fillstore\` (one chained, checkpointed audit entry per issued key, the server's own"
    echo "code and file format; store on $FS). Each row is a freshly started \`kms-server dev\` (software master key,"
    echo "release build, \`KLUIS_LOG=warn\`), so its peak RSS (VmHWM from /proc/PID/status, read after the last export"
    echo "ended) belongs to that case alone. Exports are \`kmsctl audit export\` (identity auditor) on the same machine:"
    echo "one to a file (\`-o\`), then verified offline; \"started together\" are that many \`kmsctl audit export | wc -c\`"
    echo "spawned at once, every one delivering the whole trail. The cap is \`[audit] max_concurrent_exports\`; with the"
    echo "default (4) the exports over it are refused at once with AUDIT_EXPORT_BUSY (kmsctl exit 3). Time per export:"
    echo "spawn of kmsctl to its exit, of the exports that ran. Server CPU: user + system time of the server in the case."
    echo
    echo "$MACHINE"
    echo
    cat "$W/results.md"
} > "$W/block.md"
bench_replace_section export-memory "$W/block.md" "$BENCH_OUT"
cat "$W/block.md"
