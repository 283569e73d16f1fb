#!/usr/bin/env bash
# HA benchmark (issue 16): GenerateDataKey and UnwrapDataKey with CONNS x STREAMS (64) in
# flight on the redb store (one server), on PostgreSQL with one replica, and on PostgreSQL
# with two replicas (kluis-loadgen --spread: connections round-robin over both); then the
# memory of a replica against the registry's size, and the time from kill -9 of a replica
# to the last failed request of backup-hook clients that list both endpoints.
#
#   bench/ha.sh
#
# PostgreSQL is a real cluster the script makes (initdb in a temp dir, unix socket only,
# fsync on, synchronous_commit on; as the user `nobody` when run as root). Everything shares
# this machine's cores: PostgreSQL, the replicas and the load generator. The CPU columns say
# who used what. Rewrites the section between <!-- ha:begin --> and <!-- ha:end --> of
# docs/benchmarks.md.
#
# Knobs (environment): CONNS (4), STREAMS (16), BENCH_SECONDS (10), BENCH_WARMUP (2),
# UNWRAP_KEYS (1000), KILL_CLIENTS (8), KILL_SECONDS (4), BENCH_OUT (docs/benchmarks.md),
# PG_USER (nobody, when root).
set -euo pipefail
BENCH_NAME=ha
# shellcheck source=bench/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CONNS=${CONNS:-4}
STREAMS=${STREAMS:-16}
BENCH_SECONDS=${BENCH_SECONDS:-10}
BENCH_WARMUP=${BENCH_WARMUP:-2}
UNWRAP_KEYS=${UNWRAP_KEYS:-1000}
KILL_CLIENTS=${KILL_CLIENTS:-8}
KILL_SECONDS=${KILL_SECONDS:-4}
BENCH_OUT=${BENCH_OUT:-docs/benchmarks.md}
COMMAND="bench/ha.sh"
[[ $# -eq 0 ]] || { echo "usage: bench/ha.sh (no arguments; knobs are environment variables)" >&2; exit 64; }
command -v python3 >/dev/null || bench_die "python3 is required to write the report"
PGBIN=$(find /usr/lib/postgresql -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n1)
[[ -x "$PGBIN/initdb" ]] || bench_die "PostgreSQL server binaries not found under /usr/lib/postgresql (Debian package postgresql)"

bench_log "building release binaries (kms-server, kluis-loadgen, backup-hook)"
cargo build --release --locked --bin kms-server --bin kluis-loadgen --bin backup-hook >&2
BIN=$(bench_bin_dir)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/kluis-ha.XXXXXX")
chmod 755 "$WORK"
RESULTS="$WORK/results"
mkdir -p "$RESULTS"
SERVER_PID="" PG_PID="" B_PID="" C_PID=""
as_pg() {
    if [[ $(id -u) == 0 ]]; then runuser -u "${PG_USER:-nobody}" -- "$@"; else "$@"; fi
}
cleanup() {
    bench_stop_server
    for p in $B_PID $C_PID; do kill -KILL "$p" 2>/dev/null || true; done
    [[ -n $PG_PID ]] && as_pg "$PGBIN/pg_ctl" -D "$WORK/pg/data" stop -m immediate >/dev/null 2>&1 || true
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- PostgreSQL ---
mkdir -p "$WORK/pg/data" "$WORK/pg/sock"
chmod 700 "$WORK/pg/data"; chmod 777 "$WORK/pg/sock"
[[ $(id -u) == 0 ]] && chown "${PG_USER:-nobody}" "$WORK/pg/data"
as_pg "$PGBIN/initdb" -D "$WORK/pg/data" -U kluis --auth=trust --locale=C -E UTF8 --no-instructions >/dev/null
as_pg "$PGBIN/postgres" -D "$WORK/pg/data" -k "$WORK/pg/sock" -c listen_addresses= -c port=5432 \
    -c max_connections=100 -c shared_buffers=128MB -c fsync=on -c synchronous_commit=on 2> "$WORK/pg/log" &
PG_PID=$!
for _ in $(seq 1 600); do "$PGBIN/pg_isready" -q -h "$WORK/pg/sock" -p 5432 && break; sleep 0.1; done
"$PGBIN/pg_isready" -q -h "$WORK/pg/sock" -p 5432 || { cat "$WORK/pg/log" >&2; bench_die "PostgreSQL did not start"; }
"$PGBIN/psql" -h "$WORK/pg/sock" -p 5432 -U kluis -d postgres -XAtqc "CREATE DATABASE kluis"
URL="postgresql://kluis@$(printf '%s' "$WORK/pg/sock" | sed 's|/|%2F|g'):5432/kluis"
PG_VERSION=$("$PGBIN/postgres" --version)
psql_kluis() { "$PGBIN/psql" -h "$WORK/pg/sock" -p 5432 -U kluis -d kluis -XAtqc "$1"; }

# CPU seconds (user + system) of a set of pids, from /proc.
cpu_of() {
    local t=0 p
    for p in "$@"; do
        [[ -r /proc/$p/stat ]] || continue
        t=$(( t + $(awk '{ print $14 + $15 }' "/proc/$p/stat") ))
    done
    echo "$t"
}
pg_pids() { pgrep -f "postgres" -u "$([[ $(id -u) == 0 ]] && echo "${PG_USER:-nobody}" || id -un)" | tr '\n' ' '; }
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

# run LABEL OP PIDS -- LOADGEN-ARGS: one measured run; JSON with the CPU (cores) of the
# replicas (PIDS) and of PostgreSQL over the whole run added.
run() {
    local label=$1 op=$2 pids=$3; shift 4
    local hz a_srv a_pg a_t b_srv b_pg b_t out="$RESULTS/$label-$op.json"
    hz=$(getconf CLK_TCK)
    bench_wait_quiet 120 0.3
    # shellcheck disable=SC2086
    a_srv=$(cpu_of $pids); a_pg=$(cpu_of $(pg_pids)); a_t=$(date +%s.%N)
    "$BIN/kluis-loadgen" --op "$op" --connections "$CONNS" --streams "$STREAMS" --seconds "$BENCH_SECONDS" \
        --warmup "$BENCH_WARMUP" --keyring default --tag "$label" --json "$@" > "$out.raw"
    # shellcheck disable=SC2086
    b_srv=$(cpu_of $pids); b_pg=$(cpu_of $(pg_pids)); b_t=$(date +%s.%N)
    python3 - "$out.raw" "$out" "$a_srv" "$b_srv" "$a_pg" "$b_pg" "$a_t" "$b_t" "$hz" <<'PY'
import json, sys
raw, out, a_srv, b_srv, a_pg, b_pg, a_t, b_t, hz = sys.argv[1:]
r = json.load(open(raw))
wall = float(b_t) - float(a_t)
r["replicas_cores"] = (int(b_srv) - int(a_srv)) / int(hz) / wall
r["pg_cores"] = (int(b_pg) - int(a_pg)) / int(hz) / wall
json.dump(r, open(out, "w"))
PY
    bench_log "$label $op: $(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(round(r['rate_per_second']), 'req/s, p99', r['latency_us']['p99']/1000, 'ms')" "$out" 2>/dev/null || echo done)"
}

# start_replica CONFIG VAR: kms-server serve on 127.0.0.1:0; sets VAR_PID and VAR_ADDR.
start_replica() {
    local cfg=$1 var=$2 out="$WORK/$2.out" line
    KLUIS_LOG=warn "$BIN/kms-server" serve --config "$cfg" --listen 127.0.0.1:0 > "$out" 2> "$WORK/$2.err" &
    printf -v "${var}_PID" '%s' $!
    for _ in $(seq 1 600); do line=$(grep -m1 'listening on' "$out" 2>/dev/null) && break; sleep 0.05; done
    [[ -n ${line:-} ]] || { cat "$WORK/$2.err" >&2; bench_die "replica $var did not start"; }
    printf -v "${var}_ADDR" '%s' "${line##* }"
}

# --- redb, one server ---
bench_start_server "$WORK/redb"
C="$WORK/redb/clients"
run redb generate "$SERVER_PID" -- --client-config "$C/sealer.toml"
run redb unwrap "$SERVER_PID" -- --client-config "$C/sealer.toml" --unwrap-client-config "$C/restorer.toml" --unwrap-keys "$UNWRAP_KEYS"
bench_stop_server

# --- PostgreSQL, one replica (A) ---
bench_start_server "$WORK/pg1" --store-url "$URL"
A_PID=$SERVER_PID A_ADDR=$SERVER_ADDR
C="$WORK/pg1/clients"
run pg-1 generate "$A_PID" -- --client-config "$C/sealer.toml"
run pg-1 unwrap "$A_PID" -- --client-config "$C/sealer.toml" --unwrap-client-config "$C/restorer.toml" --unwrap-keys "$UNWRAP_KEYS"

# --- PostgreSQL, two replicas (A, B), load spread ---
start_replica "$WORK/pg1/server.toml" B
KEYS_AT_B=$(psql_kluis "SELECT count(*) FROM kluis_data_keys")
RSS_B_START=$(rss_kib "$B_PID")
for who in sealer restorer; do
    sed "s|^endpoint = .*|endpoints = [\"https://$A_ADDR\", \"https://$B_ADDR\"]|" "$C/$who.toml" > "$WORK/both-$who.toml"
    grep -q '^endpoints' "$WORK/both-$who.toml" || bench_die "could not write a two-endpoint config from $C/$who.toml"
done
run pg-2 generate "$A_PID $B_PID" -- --client-config "$WORK/both-sealer.toml" --spread
run pg-2 unwrap "$A_PID $B_PID" -- --client-config "$WORK/both-sealer.toml" --unwrap-client-config "$WORK/both-restorer.toml" --unwrap-keys "$UNWRAP_KEYS" --spread
RSS_B_END=$(rss_kib "$B_PID")

# --- memory against registry size: a replica started now, on the larger registry ---
start_replica "$WORK/pg1/server.toml" C
KEYS_AT_C=$(psql_kluis "SELECT count(*) FROM kluis_data_keys")
RSS_C_START=$(rss_kib "$C_PID")
kill -TERM "$C_PID"; wait "$C_PID" 2>/dev/null || true; C_PID=""

# --- kill -9 of a replica under backup-hook clients with both endpoints (B first) ---
sed "s|^endpoint = .*|endpoints = [\"https://$B_ADDR\", \"https://$A_ADDR\"]|" "$C/sealer.toml" > "$WORK/kill-sealer.toml"
STOP="$WORK/stop"
client_loop() {
    local i=0 t
    while [[ ! -e $STOP ]]; do
        if head -c 4096 /dev/urandom | "$BIN/backup-hook" --client-config "$WORK/kill-sealer.toml" seal --keyring default --backup-id "kill/$1/$i" > /dev/null 2>> "$WORK/kill-$1.err"; then
            t=ok
        else
            t=fail
        fi
        echo "$(date +%s%3N) $t" >> "$WORK/kill-$1.log"
        i=$((i + 1))
    done
}
LOOPS=()
for n in $(seq 1 "$KILL_CLIENTS"); do client_loop "$n" & LOOPS+=($!); done
sleep "$KILL_SECONDS"
KILLED_AT=$(date +%s%3N)
kill -KILL "$B_PID"; wait "$B_PID" 2>/dev/null || true; B_PID=""
sleep "$KILL_SECONDS"
touch "$STOP"
wait "${LOOPS[@]}" 2>/dev/null || true
cat "$WORK"/kill-*.log > "$WORK/kill.all"
# A client that never got a seal through measured nothing: say why and stop.
if ! awk -v k="$KILLED_AT" '$1 < k && $2 == "ok" { found = 1 } END { exit !found }' "$WORK/kill.all"; then
    head -n 5 "$WORK"/kill-1.err >&2 || true
    bench_die "no seal succeeded before the kill: the client loop is broken, not the failover"
fi
bench_stop_server

# --- report ---
export RESULTS WORK CONNS STREAMS BENCH_SECONDS BENCH_WARMUP UNWRAP_KEYS KILL_CLIENTS KILL_SECONDS COMMAND PG_VERSION \
    KEYS_AT_B KEYS_AT_C RSS_B_START RSS_B_END RSS_C_START KILLED_AT
MACHINE=$(bench_machine_md)
export MACHINE
python3 - > "$WORK/block.md" <<'PY'
import json, os
E = os.environ
R = lambda label, op: json.load(open(os.path.join(E["RESULTS"], f"{label}-{op}.json")))
L = []
A = L.append
A("## High availability: replicas on PostgreSQL (issue 16)")
A("")
A(f"Written by `{E['COMMAND']}`; every figure in this section is from that run.")
A("")
A("```sh")
A(E["COMMAND"])
A("```")
A("")
A(f"Settings: CONNS={E['CONNS']} STREAMS={E['STREAMS']} ({int(E['CONNS']) * int(E['STREAMS'])} requests in flight), "
  f"BENCH_SECONDS={E['BENCH_SECONDS']} after BENCH_WARMUP={E['BENCH_WARMUP']}, UNWRAP_KEYS={E['UNWRAP_KEYS']}. "
  f"{E['PG_VERSION']}, a cluster made by the script (unix socket, fsync on, synchronous_commit on, no standby), "
  "on the same machine as the replicas and kluis-loadgen. Every GenerateDataKey reply waits for its durable commit "
  "(redb: fsync; PostgreSQL: the commit of the transaction that holds the key and its audit entry). `pg-2` spreads "
  "the connections over both replicas (`kluis-loadgen --spread`).")
A("")
A("### Machine")
A("")
A(E["MACHINE"])
A("")
A("### Issuance and unwrap")
A("")
A("| store | op | requests/s | p50 ms | p99 ms | p99.9 ms | max ms | ok | errors | CPU replicas / PostgreSQL / loadgen (cores) |")
A("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for label in ["redb", "pg-1", "pg-2"]:
    for op in ["generate", "unwrap"]:
        r = R(label, op)
        l = r["latency_us"]
        A(f"| {label} | {op} | {r['rate_per_second']:,.0f} | {l['p50']/1000:.2f} | {l['p99']/1000:.2f} | {l['p999']/1000:.2f} | "
          f"{l['max']/1000:.2f} | {r['requests_ok']:,} | {r['errors_total']:,} | {r['replicas_cores']:.2f} / {r['pg_cores']:.2f} / "
          f"{(r.get('client_cpu_cores') or 0):.2f} |")
A("")
g2 = R("pg-2", "generate")
ok = g2["rate_per_second"] >= 5000 and g2["latency_us"]["p99"] <= 50000
A(f"Target (issue 16): PostgreSQL with two replicas at least 5,000 durable issuances/s with p99 at most 50 ms: "
  f"**{'met' if ok else 'not met'}** ({g2['rate_per_second']:,.0f}/s, p99 {g2['latency_us']['p99']/1000:.2f} ms).")
A("")
A("### Replica memory against registry size")
A("")
A("| replica | data keys in the registry | RSS |")
A("|---|---:|---:|")
A(f"| B, just started | {int(E['KEYS_AT_B']):,} | {int(E['RSS_B_START'])/1024:.1f} MiB |")
A(f"| B, after the pg-2 runs | | {int(E['RSS_B_END'])/1024:.1f} MiB |")
A(f"| C, started after them | {int(E['KEYS_AT_C']):,} | {int(E['RSS_C_START'])/1024:.1f} MiB |")
A("")
rows = [l.split() for l in open(os.path.join(E["WORK"], "kill.all")) if l.strip()]
killed = int(E["KILLED_AT"])
fails = [int(t) for t, s in rows if s == "fail"]
oks = [int(t) for t, s in rows if s == "ok"]
after = [t for t in oks if t > killed]
A("### Killing a replica under load")
A("")
A(f"{E['KILL_CLIENTS']} backup-hook seal loops (4 KiB each) with `endpoints = [B, A]`, the default retry policy; "
  f"kill -9 of B after {E['KILL_SECONDS']} s, {E['KILL_SECONDS']} s more.")
A("")
A("| seals acknowledged | before the kill | after the kill | failed | last failure after the kill |")
A("|---:|---:|---:|---:|---:|")
last = f"{(max(fails) - killed) / 1000:.2f} s" if fails else "none (no request failed)"
A(f"| {len(oks):,} | {len(oks) - len(after):,} | {len(after):,} | {len(fails)} | {last} |")
print("\n".join(L))
PY
bench_replace_section ha "$WORK/block.md" "$BENCH_OUT"
bench_log "wrote the ha section of $BENCH_OUT"
