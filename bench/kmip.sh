#!/usr/bin/env bash
# KMIP benchmark (issue 17): Create (AES-256, durable) and Get over KMIP with many concurrent
# connections, against the gRPC GenerateDataKey rate of the same server in the same run.
# Target: KMIP Create at least 0.5x the gRPC issuance rate.
#
#   bench/kmip.sh
#
# One `kms-server dev --kmip-listen` (software master key, redb store) on this machine; then
# kluis-loadgen generate (CONNS x STREAMS in flight), kluis-kmipload create and get (KMIP_CONNS
# connections, one request in flight each: KMIP has no multiplexing), BENCH_SECONDS each after
# BENCH_WARMUP. Rewrites the section between <!-- kmip:begin --> and <!-- kmip:end --> of
# docs/benchmarks.md.
#
# Knobs (environment): CONNS (4), STREAMS (16), KMIP_CONNS (64), BENCH_SECONDS (10),
# BENCH_WARMUP (2), GET_KEYS (1000), BENCH_OUT (docs/benchmarks.md).
set -euo pipefail
BENCH_NAME=kmip
# shellcheck source=bench/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CONNS=${CONNS:-4}
STREAMS=${STREAMS:-16}
KMIP_CONNS=${KMIP_CONNS:-64}
BENCH_SECONDS=${BENCH_SECONDS:-10}
BENCH_WARMUP=${BENCH_WARMUP:-2}
GET_KEYS=${GET_KEYS:-1000}
BENCH_OUT=${BENCH_OUT:-docs/benchmarks.md}
[[ $# -eq 0 ]] || { echo "usage: bench/kmip.sh (no arguments; knobs are environment variables)" >&2; exit 64; }
command -v python3 >/dev/null || bench_die "python3 is required to write the report"

bench_log "building release binaries (kms-server, kluis-loadgen, kluis-kmipload)"
cargo build --release --locked --bin kms-server --bin kluis-loadgen --bin kluis-kmipload >&2
BIN=$(bench_bin_dir)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/kluis-kmip.XXXXXX")
SERVER_PID=""
cleanup() { bench_stop_server; rm -rf "$WORK"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

MACHINE=$(bench_machine_md)
bench_wait_quiet 120
bench_start_server "$WORK/dev" --kmip-listen 127.0.0.1:0
KMIP_ADDR=$(sed -n 's/^kmip listening on //p' "$WORK/dev.out")
[[ -n $KMIP_ADDR ]] || bench_die "the server printed no KMIP address"
PKI="$WORK/dev/pki"
kmipload() {
    "$BIN/kluis-kmipload" --addr "$KMIP_ADDR" --ca "$PKI/ca.pem" --cert "$PKI/clients/dev.pem" --key "$PKI/clients/dev.key" \
        --connections "$KMIP_CONNS" --seconds "$BENCH_SECONDS" --warmup "$BENCH_WARMUP" "$@"
}
bench_log "gRPC GenerateDataKey: $CONNS x $STREAMS in flight"
"$BIN/kluis-loadgen" --client-config "$WORK/dev/clients/dev.toml" --op generate --connections "$CONNS" --streams "$STREAMS" \
    --seconds "$BENCH_SECONDS" --warmup "$BENCH_WARMUP" --server-pid "$SERVER_PID" --json > "$WORK/grpc.json"
bench_log "KMIP Create: $KMIP_CONNS connections"
kmipload --op create > "$WORK/create.json"
bench_log "KMIP Get: $KMIP_CONNS connections over $GET_KEYS keys"
kmipload --op get --keys "$GET_KEYS" > "$WORK/get.json"
bench_stop_server

python3 - "$WORK" "$MACHINE" "$CONNS" "$STREAMS" "$KMIP_CONNS" > "$WORK/block.md" <<'PY'
import json, sys
work, machine, conns, streams, kconns = sys.argv[1:6]
g = json.load(open(f"{work}/grpc.json"))
c = json.load(open(f"{work}/create.json"))
t = json.load(open(f"{work}/get.json"))
gr = float(g["rate_per_second"])
def grpc_p(r, q):
    return f'{r["latency_us"][f"p{q}"] / 1000:.3f}'

ratio = c["per_second"] / gr if gr else 0
print("## KMIP: Create and Get against gRPC issuance (`bench/kmip.sh`)\n")
print(machine + "\n")
print("One `kms-server dev --kmip-listen` (software master key, redb store, durable commits); the load")
print("generators on the same machine. KMIP carries one request per connection at a time, so its")
print(f"concurrency is its connections ({kconns}); gRPC ran {conns} connections x {streams} streams.\n")
print("| load | ok/s | p50 ms | p99 ms | errors |")
print("|---|---|---|---|---|")
print(f"| gRPC GenerateDataKey | {gr:,.0f} | {grpc_p(g, 50)} | {grpc_p(g, 99)} | {g.get('errors', {})} |")
print(f"| KMIP Create (AES-256) | {c['per_second']:,.0f} | {c['p50_ms']} | {c['p99_ms']} | {c['errors']} |")
print(f"| KMIP Get | {t['per_second']:,.0f} | {t['p50_ms']} | {t['p99_ms']} | {t['errors']} |\n")
verdict = "met" if ratio >= 0.5 else "NOT met"
print(f"KMIP Create / gRPC issuance = {ratio:.2f} (target >= 0.5: {verdict}).")
PY
bench_replace_section kmip "$WORK/block.md"
bench_log "wrote the kmip section of $BENCH_OUT"
cat "$WORK/block.md"
