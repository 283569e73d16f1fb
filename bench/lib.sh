# Shared by the bench scripts (sourced, not run): machine facts, doc sections, the dev server.
# Needs: python3. Callers set -euo pipefail and cd to the workspace root first.

bench_log() { printf '%s: %s\n' "${BENCH_NAME:-bench}" "$*" >&2; }
bench_die() { bench_log "$*"; exit 1; }

# Release binaries directory of this workspace (honours CARGO_TARGET_DIR).
bench_bin_dir() {
    local t
    t=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
    printf '%s/release\n' "$t"
}

# Markdown table of the machine: CPU (lscpu), memory (free), kernel, rustc, commit, load average now.
bench_machine_md() {
    local model mem avail dirty=""
    model=$(lscpu 2>/dev/null | awk -F: '/^Model name/ {gsub(/^[ \t]+/, "", $2); print $2; exit}')
    mem=$(free -m | awk '/^Mem:/ {printf "%.1f GiB total, %.1f GiB available", $2/1024, $7/1024}')
    git diff --quiet HEAD -- . ':(exclude)docs/benchmarks.md' 2>/dev/null || dirty=" (uncommitted changes in the tree)"
    echo "| | |"
    echo "|---|---|"
    echo "| CPU | $(nproc) cores, ${model:-unknown} (lscpu: $(lscpu 2>/dev/null | awk -F: '/^Thread\(s\) per core/ {gsub(/ /,"",$2); t=$2} /^Hypervisor vendor/ {gsub(/^[ \t]+/,"",$2); h=$2} END {printf "%s thread(s) per core, hypervisor %s", t, (h ? h : "none")}')) |"
    echo "| memory | $mem (free -m) |"
    echo "| kernel | $(uname -r) |"
    echo "| rustc | $(rustc --version 2>/dev/null) |"
    echo "| commit | $(git rev-parse --short HEAD 2>/dev/null)$dirty |"
    echo "| date | $(date -u '+%Y-%m-%d %H:%M UTC') |"
    echo "| load average at start (1/5/15 min) | $(cut -d' ' -f1-3 /proc/loadavg) |"
}

# Waits up to $1 seconds (default 120) for the 1-minute load average to drop below $2 (default 1.0).
bench_wait_quiet() {
    local secs=${1:-120} max=${2:-1.0} i
    for ((i = 0; i < secs; i += 5)); do
        python3 -c "import sys; sys.exit(0 if float(open('/proc/loadavg').read().split()[0]) < $max else 1)" && return 0
        sleep 5
    done
    bench_log "machine still busy after ${secs}s (load $(cut -d' ' -f1 /proc/loadavg)); measuring anyway, see the load in the report"
}

# bench_replace_section NAME BLOCK_FILE [DOC]: puts BLOCK_FILE between <!-- NAME:begin --> and
# <!-- NAME:end --> in DOC (default docs/benchmarks.md), appending the section if it is not there.
bench_replace_section() {
    local name=$1 block=$2 doc=${3:-docs/benchmarks.md}
    python3 - "$doc" "$block" "$name" <<'PY'
import re, sys
doc_path, block_path, name = sys.argv[1:4]
doc = open(doc_path).read()
block = f"<!-- {name}:begin -->\n" + open(block_path).read().strip() + f"\n<!-- {name}:end -->"
pat = re.compile(rf"<!-- {re.escape(name)}:begin -->.*?<!-- {re.escape(name)}:end -->", re.S)
doc = pat.sub(lambda m: block, doc) if pat.search(doc) else doc.rstrip() + "\n\n" + block + "\n"
open(doc_path, "w").write(doc)
PY
}

# bench_start_server DATA_DIR [extra kms-server dev args...]: starts `kms-server dev` on 127.0.0.1:0
# (KLUIS_LOG=warn), waits for its "listening on" line; sets SERVER_PID, SERVER_ADDR, SERVER_READY_S
# (seconds from spawn to that line). $BIN must point at the release binaries.
bench_start_server() {
    local dir=$1; shift
    local out="$dir.out" err="$dir.err" t0 line
    : > "$out"
    t0=$(date +%s.%N)
    KLUIS_LOG=${KLUIS_LOG:-warn} "$BIN/kms-server" dev --data-dir "$dir" --listen 127.0.0.1:0 "$@" > "$out" 2> "$err" &
    SERVER_PID=$!
    until line=$(grep -m1 'listening on' "$out" 2>/dev/null); do
        kill -0 "$SERVER_PID" 2>/dev/null || { cat "$err" >&2; bench_die "kms-server exited before listening"; }
        sleep 0.005
    done
    SERVER_READY_S=$(python3 -c "import time; print(f'{time.time() - $t0:.3f}')")
    SERVER_ADDR=${line##* }
}

bench_stop_server() {
    if [[ -n "${SERVER_PID:-}" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$SERVER_PID" 2>/dev/null && kill -KILL "$SERVER_PID" 2>/dev/null
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
}
