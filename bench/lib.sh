# shellcheck shell=bash
# Shared by the bench scripts (sourced, not run): the common preamble, machine facts, the quiet-machine
# wait, doc sections, the dev server. Needs: python3. A script starts with
#
#   set -euo pipefail
#   # shellcheck source=bench/lib.sh
#   . "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# which puts it in the workspace root and names its log lines after it.

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
BENCH_NAME=${BENCH_NAME:-$(basename "$0")}
# Knobs several scripts share (environment): the report to rewrite, and the load of kluis-loadgen runs.
BENCH_OUT=${BENCH_OUT:-docs/benchmarks.md}
CONNS=${CONNS:-4}
STREAMS=${STREAMS:-16}
BENCH_SECONDS=${BENCH_SECONDS:-10}
BENCH_WARMUP=${BENCH_WARMUP:-2}

bench_log() { printf '%s: %s\n' "${BENCH_NAME:-bench}" "$*" >&2; }
bench_die() { bench_log "$*"; exit 1; }

# Release binaries directory of this workspace (honours CARGO_TARGET_DIR).
bench_bin_dir() {
    local t
    t=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
    printf '%s/release\n' "$t"
}

# The commit measured: short hash, marked when the tree (other than the report) has uncommitted changes.
bench_git_rev() {
    local rev
    rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
    git diff --quiet HEAD -- . ':(exclude)docs/benchmarks.md' 2>/dev/null || rev="$rev (uncommitted changes in the tree)"
    printf '%s\n' "$rev"
}

# Markdown table of the machine: CPU (lscpu), memory (free), kernel, rustc, commit, load average now.
bench_machine_md() {
    local model mem
    model=$(lscpu 2>/dev/null | awk -F: '/^Model name/ {gsub(/^[ \t]+/, "", $2); print $2; exit}')
    mem=$(free -m | awk '/^Mem:/ {printf "%.1f GiB total, %.1f GiB available", $2/1024, $7/1024}')
    echo "| | |"
    echo "|---|---|"
    echo "| CPU | $(nproc) cores, ${model:-unknown} (lscpu: $(lscpu 2>/dev/null | awk -F: '/^Thread\(s\) per core/ {gsub(/ /,"",$2); t=$2} /^Hypervisor vendor/ {gsub(/^[ \t]+/,"",$2); h=$2} END {printf "%s thread(s) per core, hypervisor %s", t, (h ? h : "none")}')) |"
    echo "| memory | $mem (free -m) |"
    echo "| kernel | $(uname -r) |"
    echo "| rustc | $(rustc --version 2>/dev/null) |"
    echo "| commit | $(bench_git_rev) |"
    echo "| date | $(date -u '+%Y-%m-%d %H:%M UTC') |"
    echo "| load average at start (1/5/15 min) | $(cut -d' ' -f1-3 /proc/loadavg) |"
}

# Machine-wide busy CPU ticks (USER_HZ) from /proc/stat, steal excluded.
bench_busy_ticks() {
    local user nice system irq softirq
    read -r _ user nice system _ _ irq softirq _ < /proc/stat
    echo $((user + nice + system + irq + softirq))
}

# bench_wait_quiet [SECS] [CORES]: waits at most SECS (default 120) seconds until the whole machine
# uses less than CORES (default 0.2) cores over 3 s. Call it while no server of ours is busy, so what
# it sees is other work (builds, tests) on the shared cores. SECS 0: no wait.
bench_wait_quiet() {
    local secs=${1:-120} cores=${2:-0.2} limit deadline a b
    (( secs > 0 )) || return 0
    limit=$(awk -v c="$cores" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%d", c * 3 * hz }')
    deadline=$((SECONDS + secs))
    while (( SECONDS < deadline )); do
        a=$(bench_busy_ticks); sleep 3; b=$(bench_busy_ticks)
        (( b - a < limit )) && return 0
    done
    bench_log "the machine stayed busy (>= $cores cores) for ${secs} s (load $(cut -d' ' -f1 /proc/loadavg)); measuring anyway, see the load and CPU figures in the report"
}

# bench_replace_section NAME BLOCK_FILE [DOC]: puts BLOCK_FILE between <!-- NAME:begin --> and
# <!-- NAME:end --> in DOC (default $BENCH_OUT), appending the section if it is not there and creating
# DOC if it does not exist. DOC is replaced atomically (written beside it, then renamed).
bench_replace_section() {
    local name=$1 block=$2 doc=${3:-$BENCH_OUT}
    mkdir -p "$(dirname "$doc")"
    python3 - "$doc" "$block" "$name" <<'PY'
import os, re, sys
doc_path, block_path, name = sys.argv[1:4]
if os.path.exists(doc_path):
    doc = open(doc_path).read()
else:
    doc = ("# Kluis benchmarks\n\n"
           "Measured figures only: every number in a section comes from the script named in it, run on the machine\n"
           "described there. Each script rewrites its own section in place, between its markers.\n")
block = f"<!-- {name}:begin -->\n" + open(block_path).read().strip() + f"\n<!-- {name}:end -->"
pat = re.compile(rf"<!-- {re.escape(name)}:begin -->.*?<!-- {re.escape(name)}:end -->", re.S)
doc = pat.sub(lambda m: block, doc, count=1) if pat.search(doc) else doc.rstrip() + "\n\n" + block + "\n"
tmp = doc_path + ".tmp"
with open(tmp, "w") as f:
    f.write(doc)
os.replace(tmp, doc_path)
PY
}

# bench_start_server DATA_DIR [extra kms-server dev args...]: starts `kms-server dev` on 127.0.0.1:0
# (KLUIS_LOG=warn; stdout to DATA_DIR.out, stderr to DATA_DIR.err), waits (at most 60 s) for its
# "listening on" line; sets SERVER_PID, SERVER_ADDR, SERVER_READY_S (seconds from spawn to that line).
# $BIN must point at the release binaries. Environment the server needs (SOFTHSM2_CONF) can be given
# as an assignment before the call.
bench_start_server() {
    local dir=$1; shift
    local out="$dir.out" err="$dir.err" t0 line deadline=$((SECONDS + 60))
    : > "$out"
    t0=$(date +%s.%N)
    KLUIS_LOG=warn "$BIN/kms-server" dev --data-dir "$dir" --listen 127.0.0.1:0 "$@" > "$out" 2> "$err" &
    SERVER_PID=$!
    until line=$(grep -m1 '^kms-server listening on' "$out" 2>/dev/null); do
        kill -0 "$SERVER_PID" 2>/dev/null || { cat "$err" >&2; bench_die "kms-server exited before listening"; }
        (( SECONDS < deadline )) || { cat "$err" >&2; bench_die "kms-server did not start within 60 s"; }
        sleep 0.005
    done
    # shellcheck disable=SC2034 # read by the scripts
    SERVER_READY_S=$(python3 -c "import time; print(f'{time.time() - $t0:.3f}')")
    # shellcheck disable=SC2034 # read by the scripts
    SERVER_ADDR=${line##* }
}

bench_stop_server() {
    if [[ -n "${SERVER_PID:-}" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$SERVER_PID" 2>/dev/null; then kill -KILL "$SERVER_PID" 2>/dev/null || true; fi
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
}
