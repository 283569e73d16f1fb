#!/usr/bin/env bash
# A/B of GenerateDataKey throughput between two builds of the server, alternated in one run so that
# both see the same machine: for a change whose cost is small next to the noise of a shared machine
# (first use: redb quick repair, docs/benchmarks.md "Restart after a crash at scale").
#
#   bench/ab-generate.sh OLD_BIN_DIR NEW_BIN_DIR
#
# Each directory holds release kms-server and kluis-loadgen (build each commit with
# `cargo build --release --locked --bin kms-server --bin kluis-loadgen` and copy them out).
# ROUNDS (3) times, A then B: a fresh `kms-server dev` (software master key) in a temp dir, kluis-loadgen
# generate (CONNS x STREAMS in flight, BENCH_WARMUP then BENCH_SECONDS), stop. Prints one JSON line per
# run and the median rate and server CPU time per request per side; writes nothing else.
set -euo pipefail
# shellcheck source=bench/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
[[ $# -eq 2 ]] || { echo "usage: bench/ab-generate.sh OLD_BIN_DIR NEW_BIN_DIR" >&2; exit 64; }
ROUNDS=${ROUNDS:-3}
for d in "$1" "$2"; do for b in kms-server kluis-loadgen; do [[ -x $d/$b ]] || bench_die "missing $d/$b"; done; done
W=$(mktemp -d "${TMPDIR:-/tmp}/kluis-ab.XXXXXX")
SERVER_PID=""
trap 'bench_stop_server; rm -rf "$W"' EXIT
trap 'exit 130' INT TERM
bench_machine_md >&2
for r in $(seq 1 "$ROUNDS"); do
    for side in A B; do
        if [[ $side == A ]]; then BIN=$1; else BIN=$2; fi
        D=$W/$side$r
        bench_start_server "$D"
        "$BIN/kluis-loadgen" --op generate --connections "$CONNS" --streams "$STREAMS" --seconds "$BENCH_SECONDS" \
            --warmup "$BENCH_WARMUP" --keyring default --client-config "$D/clients/sealer.toml" --server-pid "$SERVER_PID" \
            --tag "$side" --json > "$W/$side$r.json"
        bench_stop_server
        python3 - "$W/$side$r.json" "$side" "$r" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
# Server CPU per request: much less sensitive to other work on the machine than the rate.
cpu_us = r["server_cpu_cores"] * r["seconds"] / r["requests_ok"] * 1e6 if r.get("server_cpu_cores") and r["requests_ok"] else None
print(json.dumps({"side": sys.argv[2], "round": int(sys.argv[3]), "rate": r["rate_per_second"], "server_cpu_us_per_request": round(cpu_us, 1) if cpu_us else None,
                  "errors": r["errors_total"], "load": open("/proc/loadavg").read().split()[0], "other_cpu_cores": r.get("other_cpu_cores")}))
PY
        rm -rf "$D"
    done
done | tee "$W/runs.jsonl"
python3 - "$W/runs.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for side in "AB":
    rates = [r["rate"] for r in rows if r["side"] == side]
    cpu = [r["server_cpu_us_per_request"] for r in rows if r["side"] == side and r["server_cpu_us_per_request"]]
    print(f"{side}: median {statistics.median(rates):,.0f} GenerateDataKey/s ({', '.join(f'{x:,.0f}' for x in rates)}); "
          f"server CPU per request median {statistics.median(cpu):,.1f} us ({', '.join(f'{x:,.1f}' for x in cpu)})")
PY
