#!/usr/bin/env bash
# Issuance benchmark: GenerateDataKey and UnwrapDataKey against the health floor,
# for the software and the SoftHSM2 master-key providers.
#
#   bench/issuance.sh
#
# Builds the release binaries it runs (kms-server, kluis-loadgen), then per provider starts a fresh `kms-server dev`
# on 127.0.0.1:0 in a temp dir, runs kluis-loadgen health, generate and unwrap
# (CONNS x STREAMS in flight, BENCH_SECONDS each after BENCH_WARMUP), stops the
# server, and rewrites the section between <!-- issuance:begin --> and
# <!-- issuance:end --> of docs/benchmarks.md with the measured figures.
#
# Knobs (environment): CONNS (4), STREAMS (16), BENCH_SECONDS (10), BENCH_WARMUP (2),
# UNWRAP_KEYS (1000), PROVIDERS ("software softhsm2"), BENCH_OUT (docs/benchmarks.md),
# SOFTHSM_MODULE (/usr/lib/softhsm/libsofthsm2.so); see below for BENCH_QUIET_WAIT, BENCH_ATTEMPTS, BENCH_MAX_OTHERS.
#
# The machine may be shared (other builds and tests). Before each run the script waits up to
# BENCH_QUIET_WAIT (300) seconds for it to go idle; a run during which other work still used more
# than BENCH_MAX_OTHERS (0.25) cores is repeated, up to BENCH_ATTEMPTS (3) runs, and the least
# disturbed run is reported. The report shows each run's CPU split, so disturbance stays visible.
set -euo pipefail
# shellcheck source=bench/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

UNWRAP_KEYS=${UNWRAP_KEYS:-1000}
BENCH_QUIET_WAIT=${BENCH_QUIET_WAIT:-300}
BENCH_ATTEMPTS=${BENCH_ATTEMPTS:-3}
BENCH_MAX_OTHERS=${BENCH_MAX_OTHERS:-0.25}
PROVIDERS=${PROVIDERS:-software softhsm2}
SOFTHSM_MODULE=${SOFTHSM_MODULE:-/usr/lib/softhsm/libsofthsm2.so}
COMMAND="bench/issuance.sh"
[[ $# -eq 0 ]] || { echo "usage: bench/issuance.sh (no arguments; knobs are environment variables)" >&2; exit 64; }

command -v python3 >/dev/null || bench_die "python3 is required to write the report"

# Only what this benchmark runs: the server and the load generator.
bench_log "building release binaries (kms-server, kluis-loadgen)"
cargo build --release --locked --bin kms-server --bin kluis-loadgen >&2
BIN=$(bench_bin_dir)
for b in kms-server kluis-loadgen; do [[ -x "$BIN/$b" ]] || bench_die "missing $BIN/$b after the build"; done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/kluis-issuance.XXXXXX")
RESULTS="$WORK/results"
mkdir -p "$RESULTS"
SERVER_PID=""

cleanup() {
    local rc=$? keep
    bench_stop_server
    # A failure after some runs keeps their raw reports.
    if (( rc != 0 )) && compgen -G "$RESULTS/*.json" >/dev/null; then
        keep=$(mktemp -d "${TMPDIR:-/tmp}/kluis-issuance-results.XXXXXX")
        cp "$RESULTS"/*.json "$keep"/ && bench_log "failed; the raw loadgen reports so far are in $keep"
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start_server PROVIDER DIR: starts a fresh dev server on DIR/dev (output in DIR/dev.out, DIR/dev.err),
# sets SERVER_PID and CLIENTS.
start_server() {
    local provider=$1 dir=$2
    if [[ $provider == softhsm2 ]]; then
        command -v softhsm2-util >/dev/null || bench_die "softhsm2-util not found (Debian package softhsm2)"
        [[ -f $SOFTHSM_MODULE ]] || bench_die "PKCS#11 module $SOFTHSM_MODULE not found"
        mkdir -p "$dir/hsm/tokens"
        printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$dir/hsm/tokens" > "$dir/hsm/softhsm2.conf"
        SOFTHSM2_CONF="$dir/hsm/softhsm2.conf" softhsm2-util --init-token --free --label kluis --pin 1234 --so-pin 5678 >/dev/null
        (umask 077; printf '1234' > "$dir/hsm/pin")
        chmod 600 "$dir/hsm/pin"
        SOFTHSM2_CONF="$dir/hsm/softhsm2.conf" bench_start_server "$dir/dev" \
            --pkcs11-module "$SOFTHSM_MODULE" --pkcs11-token-label kluis --pkcs11-pin-file "$dir/hsm/pin"
    else
        bench_start_server "$dir/dev"
    fi
    CLIENTS="$dir/dev/clients"
    bench_log "$provider: $(head -n1 "$dir/dev.out") (pid $SERVER_PID)"
}

# loadgen PROVIDER OP ARGS...: a measured run, JSON into $RESULTS/PROVIDER-OP.json. Waits for a
# quiet machine first; when other work still took more than BENCH_MAX_OTHERS cores during the run,
# runs again (at most BENCH_ATTEMPTS in all) and keeps the run least disturbed.
loadgen() {
    local provider=$1 op=$2; shift 2
    local attempt load out="$RESULTS/$provider-$op"
    for attempt in $(seq 1 "$BENCH_ATTEMPTS"); do
        # Other work above 0.2 cores over 3 s counts as busy: the server is idle between runs.
        bench_wait_quiet "$BENCH_QUIET_WAIT" 0.2
        load=$(cut -d' ' -f1 /proc/loadavg)
        "$BIN/kluis-loadgen" --op "$op" --connections "$CONNS" --streams "$STREAMS" \
            --seconds "$BENCH_SECONDS" --warmup "$BENCH_WARMUP" --keyring default \
            --server-pid "$SERVER_PID" --tag "$provider" --json "$@" > "$out.try$attempt"
        # Attach the attempt number and the 1-minute load average just before the run; stop once a
        # run was undisturbed.
        if python3 - "$out.try$attempt" "$load" "$attempt" "$BENCH_MAX_OTHERS" <<'EOF'
import json, sys
path, load, attempt, limit = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
r = json.load(open(path))
r["loadavg_before"] = load
r["attempt"] = attempt
open(path, "w").write(json.dumps(r))
sys.exit(0 if r.get("other_cpu_cores", 0.0) <= limit else 1)
EOF
        then
            break
        fi
        bench_log "$provider $op: other work took more than $BENCH_MAX_OTHERS cores during attempt $attempt"
    done
    # Keep the attempt with the least other work (every attempt is a complete, real run).
    python3 - "$out" "$attempt" > "$out.json" <<'EOF'
import json, sys
runs = [json.load(open(f"{sys.argv[1]}.try{i}")) for i in range(1, int(sys.argv[2]) + 1)]
best = min(runs, key=lambda r: r.get("other_cpu_cores", 0.0))
best["attempts"] = len(runs)
print(json.dumps(best))
EOF
    rm -f "$out".try*
}

for provider in $PROVIDERS; do
    case $provider in software|softhsm2) ;; *) bench_die "unknown provider $provider (software, softhsm2)";; esac
    dir="$WORK/$provider"
    mkdir -p "$dir"
    start_server "$provider" "$dir"
    loadgen "$provider" health --client-config "$CLIENTS/sealer.toml"
    loadgen "$provider" generate --client-config "$CLIENTS/sealer.toml"
    loadgen "$provider" unwrap --client-config "$CLIENTS/sealer.toml" \
        --unwrap-client-config "$CLIENTS/restorer.toml" --unwrap-keys "$UNWRAP_KEYS"
    bench_stop_server
    if grep -qE 'WARN|ERROR' "$dir/dev.err"; then
        bench_log "$provider: the server logged warnings or errors:"
        grep -E 'WARN|ERROR' "$dir/dev.err" | tail -n 20 >&2
    fi
done

# Machine facts (this section's own table: nproc, CPU, memory, kernel, rustc, date, commit, file system).
F_CPU=$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || true)
F_MEM=$(awk '/^MemTotal:/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
F_FS=$(df -PT "$WORK" | awk 'NR == 2 { print $2 " on " $1 }')
F_GIT=$(bench_git_rev)
F_NPROC=$(nproc)
F_KERNEL=$(uname -sr)
F_RUSTC=$(rustc --version)
F_DATE=$(date -u '+%Y-%m-%d %H:%M UTC')
export RESULTS PROVIDERS CONNS STREAMS BENCH_SECONDS BENCH_WARMUP UNWRAP_KEYS COMMAND \
    BENCH_QUIET_WAIT BENCH_ATTEMPTS BENCH_MAX_OTHERS F_NPROC F_KERNEL F_RUSTC F_DATE F_CPU F_MEM F_GIT F_FS
python3 - > "$WORK/block.md" <<'EOF'
import json, os

E = os.environ
results = E["RESULTS"]
providers = E["PROVIDERS"].split()
ops = ["health", "generate", "unwrap"]
R = {p: {o: json.load(open(os.path.join(results, f"{p}-{o}.json"))) for o in ops} for p in providers}
conns, streams = int(E["CONNS"]), int(E["STREAMS"])
in_flight = conns * streams
cmd = E["COMMAND"]
limit = float(E["BENCH_MAX_OTHERS"])

def ms(us): return f"{us / 1000:.2f}"
def ratio(a, b): return a / b if b else float("nan")
def cpu(v): return "" if v is None else f"{v:.2f}"

L = []
A = L.append
A("## Data-key issuance (GenerateDataKey, UnwrapDataKey)")
A("")
A(f"Written by `{cmd}`; every figure in this section is from that run. Re-run it to refresh the section.")
A("")
A("Command (from the workspace root):")
A("")
A("```sh")
A(cmd)
A("```")
A("")
A(f"Settings: CONNS={conns} STREAMS={streams} ({in_flight} requests in flight), BENCH_SECONDS={E['BENCH_SECONDS']} "
  f"after BENCH_WARMUP={E['BENCH_WARMUP']}, UNWRAP_KEYS={E['UNWRAP_KEYS']}, BENCH_QUIET_WAIT={E['BENCH_QUIET_WAIT']}, "
  f"BENCH_ATTEMPTS={E['BENCH_ATTEMPTS']}, BENCH_MAX_OTHERS={E['BENCH_MAX_OTHERS']}.")
A("Each provider gets a fresh `kms-server dev --listen 127.0.0.1:0` in a temp dir (`KLUIS_LOG=warn`). kluis-loadgen runs")
A("`health` (grpc.health.v1.Health/Check, identity `sealer`), then `generate` (identity `sealer`, keyring `default`,")
A("a unique backup id and two labels per call, durable: each reply waits for its fsynced group commit), then `unwrap`")
A("(UNWRAP_KEYS keys issued first by `sealer`, then unwrapped round-robin by `restorer`, each answer checked against the")
A("issued key). Each connection is its own mTLS HTTP/2 channel, built like `KmsClient::connect`. Closed loop: every")
A("stream sends its next request when the previous one answers. Latency per request from a log-linear histogram")
A("(within 1.6 %); only requests completed inside the measured window count.")
A("")
A("### Machine")
A("")
A("| | |")
A("|---|---|")
for k, v in [("nproc", E["F_NPROC"]), ("CPU", E["F_CPU"]), ("memory", E["F_MEM"]), ("kernel", E["F_KERNEL"]),
             ("rustc", E["F_RUSTC"]), ("date", E["F_DATE"]), ("commit", E["F_GIT"]), ("store file system", E["F_FS"])]:
    A(f"| {k} | {v} |")
A("")
A(f"Load generator and server share the same {E['F_NPROC']} cores, and other work (builds, tests) may run on this machine")
A("at the same time. The CPU column gives, in cores over the measured window: the server, kluis-loadgen, everything")
A("else on the machine, and steal (time the hypervisor gave to other guests); plus the 1-minute load average just")
A("before each run. A run where `others` is well above zero measured a shared machine, not the server alone.")
A("The script waits for an idle machine before each run and repeats a disturbed run (column `runs`: how many")
A("runs it took; the least disturbed one is reported).")
A("")
A("### Results")
A("")
A("| provider | op | requests/s | p50 ms | p99 ms | p99.9 ms | max ms | ok | errors | x health | CPU server / loadgen / others / steal | load avg before | runs |")
A("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for p in providers:
    h = R[p]["health"]["rate_per_second"]
    for o in ops:
        r = R[p][o]
        lat = r["latency_us"]
        errs = str(r["errors_total"])
        if r["errors"]:
            errs += " (" + ", ".join(f"{k} {v}" for k, v in r["errors"].items()) + ")"
        x = "1.00" if o == "health" else f"{ratio(r['rate_per_second'], h):.2f}"
        A(f"| {p} | {o} | {r['rate_per_second']:,.0f} | {ms(lat['p50'])} | {ms(lat['p99'])} | {ms(lat['p999'])} | "
          f"{ms(lat['max'])} | {r['requests_ok']:,} | {errs} | {x} | {cpu(r.get('server_cpu_cores'))} / "
          f"{cpu(r.get('client_cpu_cores'))} / {cpu(r.get('other_cpu_cores'))} / {cpu(r.get('steal_cpu_cores'))} | "
          f"{r['loadavg_before']:.2f} | {r.get('attempts', 1)} |")
A("")
both = "software" in providers and "softhsm2" in providers
if both:
    A("SoftHSM2 against software (requests/s):")
    A("")
    A("| op | software | softhsm2 | softhsm2 / software |")
    A("|---|---:|---:|---:|")
    for o in ops:
        s, k = R["software"][o]["rate_per_second"], R["softhsm2"][o]["rate_per_second"]
        A(f"| {o} | {s:,.0f} | {k:,.0f} | {ratio(k, s):.2f} |")
    A("")
# The floor is the no-op health check: with SoftHSM2 the check asks the token, so the software run's is the floor.
floor_from = "software" if "software" in providers else providers[0]
floor = R[floor_from]["health"]["rate_per_second"]
A("### Targets (from the performance issue)")
A("")
A(f"The health floor is the `{floor_from}` health check ({floor:,.0f}/s): with the software provider Check costs nothing")
A("beyond gRPC and TLS, while with SoftHSM2 every Check asks the token (a PKCS#11 call on a blocking thread), so")
A("SoftHSM2's own health rate is no floor; its ratio to that is given alongside.")
A("")
A(f"A verdict marked *disturbed* rests on a run during which other work on the machine took more than {limit} cores;")
A("read it as a lower bound for that run's rate and an upper bound for its latency, and re-run the script.")
A("")
A("| target | provider | measured | verdict |")
A("|---|---|---:|---|")
names = {"generate": "GenerateDataKey", "unwrap": "UnwrapDataKey"}
def disturbed(*runs):
    """A note when other work took more than BENCH_MAX_OTHERS cores during one of these runs."""
    bad = [f"{r['tag']} {r['op']}: others {r['other_cpu_cores']:.2f} cores" for r in runs
           if r.get("other_cpu_cores", 0.0) > limit]
    return f" (disturbed run: {'; '.join(bad)})" if bad else ""
for o in ["generate", "unwrap"]:
    for p in providers:
        r = R[p][o]
        h = R[p]["health"]["rate_per_second"]
        v = r["rate_per_second"]
        met = v >= 10000 and r["errors_total"] == 0
        d = disturbed(r)
        A(f"| {names[o]} >= 10,000/s, 64 streams | {p} | {v:,.0f}/s, {r['errors_total']} errors | {'met' if met else 'missed'}{d} |")
        x = ratio(v, floor)
        own = "" if p == floor_from else f"; {ratio(v, h):.2f}x its own health"
        d = disturbed(r, R[floor_from]["health"])
        A(f"| {names[o]} >= 0.4x health floor | {p} | {x:.2f}x ({v:,.0f} / {floor:,.0f}{own}) | {'met' if x >= 0.4 else 'missed'}{d} |")
        p99 = r["latency_us"]["p99"]
        A(f"| {names[o]} p99 <= 25 ms | {p} | {ms(p99)} ms | {'met' if p99 <= 25000 else 'missed'}{disturbed(r)} |")
    if both:
        s, k = R["software"][o]["rate_per_second"], R["softhsm2"][o]["rate_per_second"]
        x = ratio(k, s)
        d = disturbed(R["software"][o], R["softhsm2"][o])
        A(f"| {names[o]}: SoftHSM2 within 10 % of software | both | {x:.2f}x ({k:,.0f} / {s:,.0f}) | {'met' if x >= 0.9 else 'missed'}{d} |")
if in_flight != 64:
    A("")
    A(f"Note: this run kept {in_flight} requests in flight, not the 64 the targets name.")
A("")
A("<details><summary>Raw kluis-loadgen reports (JSON, one per run)</summary>")
A("")
A("```json")
for p in providers:
    for o in ops:
        A(json.dumps(R[p][o], sort_keys=True))
A("```")
A("")
A("</details>")
print("\n".join(L))
EOF
bench_replace_section issuance "$WORK/block.md" "$BENCH_OUT"
bench_log "wrote $BENCH_OUT"
python3 - <<'EOF'
import json, os
for p in os.environ["PROVIDERS"].split():
    for o in ["health", "generate", "unwrap"]:
        r = json.load(open(os.path.join(os.environ["RESULTS"], f"{p}-{o}.json")))
        lat = r["latency_us"]
        print(f"{p:9} {o:8} {r['rate_per_second']:>10,.0f}/s  p50 {lat['p50'] / 1000:.2f} ms  "
              f"p99 {lat['p99'] / 1000:.2f} ms  p99.9 {lat['p999'] / 1000:.2f} ms  errors {r['errors_total']}")
EOF
