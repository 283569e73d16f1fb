#!/usr/bin/env bash
# Stream benchmark: backup-hook seal/unseal against the Go age tool, gpg and the
# cat|cat pipe floor, on one input in the page cache, all in the same run.
# Usage: bench/stream.sh [SIZE_MIB] [RUNS]     (defaults: 2048 MiB, 5 runs)
# Writes the section between <!-- stream:begin --> and <!-- stream:end --> of docs/benchmarks.md
# (or of $BENCH_OUT). Waits up to BENCH_QUIET_WAIT (120) seconds for a quiet machine first.
set -euo pipefail
# shellcheck source=bench/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
SIZE_MIB=${1:-2048}
RUNS=${2:-5}
for t in hyperfine age age-keygen gpg /usr/bin/time; do
  command -v "$t" >/dev/null || bench_die "needs $t (apt-get install hyperfine age gnupg time)"
done
cargo build --release --locked --bin kms-server --bin backup-hook >&2
BIN=$(bench_bin_dir)
W=$(mktemp -d)
SERVER_PID=""
trap 'bench_stop_server; rm -rf "$W"' EXIT
trap 'exit 130' INT TERM

bench_start_server "$W/kluis"
export KLUIS_CLIENT_CONFIG=$W/kluis/clients/dev.toml

head -c "$((SIZE_MIB << 20))" /dev/urandom > "$W/input"
cat "$W/input" > /dev/null    # into the page cache
age-keygen -o "$W/age.key" 2> /dev/null
RCPT=$(age-keygen -y "$W/age.key")
"$BIN/backup-hook" seal --keyring default --backup-id bench -i "$W/input" -o "$W/input.kluis"
age -r "$RCPT" -o "$W/input.age" "$W/input"
echo bench-passphrase > "$W/gpgpass"
gpg --batch --yes --quiet --pinentry-mode loopback --passphrase-file "$W/gpgpass" --symmetric --cipher-algo AES256 --compress-algo none -o "$W/input.gpg" "$W/input"
cat "$W/input.kluis" "$W/input.age" "$W/input.gpg" > /dev/null

bench_wait_quiet "${BENCH_QUIET_WAIT:-120}" 0.2
MACHINE=$(bench_machine_md)
LOAD_BEFORE=$(cut -d' ' -f1 /proc/loadavg)
hyperfine --warmup 1 --runs "$RUNS" --export-json "$W/h.json" -N \
  -n "backup-hook seal (file to /dev/null)" "$BIN/backup-hook seal --keyring default --backup-id bench -i $W/input -o /dev/null" \
  -n "backup-hook unseal (file to /dev/null)" "$BIN/backup-hook unseal -i $W/input.kluis -o /dev/null" \
  -n "age -r (encrypt, X25519)" "age -r $RCPT -o /dev/null $W/input" \
  -n "age -d (decrypt, X25519)" "age -d -i $W/age.key -o /dev/null $W/input.age" \
  -n "gpg --symmetric AES256" "gpg --batch --yes --quiet --pinentry-mode loopback --passphrase-file $W/gpgpass --symmetric --cipher-algo AES256 --compress-algo none -o /dev/null $W/input" \
  -n "gpg --decrypt" "gpg --batch --yes --quiet --pinentry-mode loopback --passphrase-file $W/gpgpass --decrypt -o /dev/null $W/input.gpg" \
  >&2
# The pipes in interleaved rounds (floor, seal, unseal, floor, ...): the machine may be shared, and a
# disturbance then hits all three alike instead of one command's whole series. Output like hyperfine's JSON,
# plus the ratio to the floor within each round.
python3 - "$W/p.json" "$RUNS" \
  "cat | cat (pipe floor)" "cat $W/input | cat > /dev/null" \
  "cat | backup-hook seal | cat" "cat $W/input | $BIN/backup-hook seal --keyring default --backup-id bench | cat > /dev/null" \
  "cat | backup-hook unseal | cat" "cat $W/input.kluis | $BIN/backup-hook unseal | cat > /dev/null" \
  "cat | cat, 1 MiB pipe (reference)" "python3 -c 'import fcntl, os, sys; fcntl.fcntl(1, 1031, 1 << 20); os.execvp(\"cat\", [\"cat\", sys.argv[1]])' $W/input | cat > /dev/null" \
  "cat | cat | cat (reference)" "cat $W/input | cat | cat > /dev/null" \
  "cat | age -r | cat (peer)" "cat $W/input | age -r $RCPT | cat > /dev/null" <<'PY'
import json, resource, subprocess, sys, time
out, runs, pairs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
cmds = list(zip(pairs[0::2], pairs[1::2]))
res = {n: {"command": n, "times": [], "user_t": [], "system_t": [], "ratio_to_floor": []} for n, _ in cmds}
for rnd in range(runs + 1):  # round 0 is the warm-up
    floor = None
    for name, cmd in cmds:
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN); t0 = time.perf_counter()
        subprocess.run(["bash", "-c", "set -o pipefail; " + cmd], check=True)
        t = time.perf_counter() - t0; r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if rnd == 0: continue
        floor = floor or t
        d = res[name]; d["times"].append(t); d["ratio_to_floor"].append(floor / t)
        d["user_t"].append(r1.ru_utime - r0.ru_utime); d["system_t"].append(r1.ru_stime - r0.ru_stime)
    if rnd: print(f"stream.sh: pipe round {rnd}: " + ", ".join(f"{n} {res[n]['times'][-1]:.3f} s" for n, _ in cmds), file=sys.stderr)
for d in res.values():
    d["user"] = sum(d.pop("user_t")) / runs; d["system"] = sum(d.pop("system_t")) / runs
json.dump({"results": list(res.values())}, open(out, "w"))
PY

LOAD_AFTER=$(cut -d' ' -f1 /proc/loadavg)
rss() { /usr/bin/time -v "$@" 2>&1 >/dev/null | awk -F': ' '/Maximum resident set size/ {print $2}'; }
RSS_SEAL=$(rss "$BIN/backup-hook" seal --keyring default --backup-id bench -i "$W/input" -o /dev/null)
RSS_UNSEAL=$(rss "$BIN/backup-hook" unseal -i "$W/input.kluis" -o /dev/null)
RSS_AGE=$(rss age -d -i "$W/age.key" -o /dev/null "$W/input.age")

python3 - "$W/h.json" "$W/p.json" "$SIZE_MIB" "$RUNS" "$RSS_SEAL" "$RSS_UNSEAL" "$RSS_AGE" "$(nproc)" "$LOAD_BEFORE" "$LOAD_AFTER" > "$W/section.md" <<'PY'
import json, sys, statistics
h = json.load(open(sys.argv[1]))["results"]; p = json.load(open(sys.argv[2]))["results"]
size, runs = int(sys.argv[3]), int(sys.argv[4]); rss_seal, rss_unseal, rss_age = sys.argv[5:8]
cores, load_before, load_after = int(sys.argv[8]), sys.argv[9], sys.argv[10]
med = {r["command"]: statistics.median(r["times"]) for r in h + p}
cpu = {r["command"]: r["user"] + r["system"] for r in h + p}
def row(r):
    name = r["command"]; t = med[name]
    return f"| {name.replace('|', chr(92) + '|')} | {t:.3f} s | {size / t:.0f} MiB/s | {r['user']:.2f} s | {r['system']:.2f} s |"
print(f"Input: {size} MiB of random bytes in the page cache; {runs} runs each after one warm-up; medians of whole-process wall time (hyperfine for the file rows; the pipe rows in {runs} interleaved rounds after one warm-up round, timed by the script); "
      f"user and system: mean CPU time of all processes of the command. Load average (1 min): {load_before} before, {load_after} after.\n")
print("| command | median | throughput | user | system |\n|---|---|---|---:|---:|")
for r in h + p: print(row(r))
s, u = med["backup-hook seal (file to /dev/null)"], med["backup-hook unseal (file to /dev/null)"]
ae, ad = med["age -r (encrypt, X25519)"], med["age -d (decrypt, X25519)"]
fl = med["cat | cat (pipe floor)"]
ps, pu = med["cat | backup-hook seal | cat"], med["cat | backup-hook unseal | cat"]
print("\n| ratio (speed, higher is faster) | measured | target (issue 7) |\n|---|---|---|")
print(f"| seal vs `age` encrypt | {ae / s:.2f}x | >= 1.5x |")
print(f"| unseal vs `age` decrypt | {ad / u:.2f}x | >= 1.5x |")
rr = {r["command"]: statistics.median(r["ratio_to_floor"]) for r in p}
print(f"| pipe seal vs `cat \\| cat` | {fl / ps:.2f}x (median of the per-round ratios: {rr['cat | backup-hook seal | cat']:.2f}x) | >= 0.9x |")
print(f"| pipe unseal vs `cat \\| cat` | {fl / pu:.2f}x (median of the per-round ratios: {rr['cat | backup-hook unseal | cat']:.2f}x) | >= 0.9x |")
f1, f3, fa = med["cat | cat, 1 MiB pipe (reference)"], med["cat | cat | cat (reference)"], med["cat | age -r | cat (peer)"]
print(f"| (reference) pipe seal vs `cat \\| cat` with a 1 MiB pipe like the hook's | {f1 / ps:.2f}x | - |")
print(f"| (reference) pipe seal vs `cat \\| cat \\| cat` (the hook's place taken by `cat`) | {f3 / ps:.2f}x | - |")
print(f"| (peer) pipe seal vs `cat \\| age -r \\| cat` | {fa / ps:.2f}x | - |")
bs, bu = cpu["cat | backup-hook seal | cat"] / cores, cpu["cat | backup-hook unseal | cat"] / cores
print(f"\nCPU bound of the pipes on {cores} cores (CPU time of all three processes / {cores}, i.e. every core busy all the time): "
      f"seal {bs:.3f} s, unseal {bu:.3f} s, so at most {fl / bs:.2f}x and {fl / bu:.2f}x of this floor "
      f"(the floor itself used {cpu['cat | cat (pipe floor)']:.2f} s of CPU in {fl:.3f} s).")
print(f"\nPeak RSS (/usr/bin/time -v): backup-hook seal {int(rss_seal)//1024} MiB, unseal {int(rss_unseal)//1024} MiB; age -d {int(rss_age)//1024} MiB (target for the hook: <= 32 MiB).")
PY

{
  echo "## Stream: seal and unseal"
  echo
  echo "Written by \`bench/stream.sh\`; every figure in this section is from that run."
  echo
  echo "Command (from the workspace root): \`bench/stream.sh $SIZE_MIB $RUNS\` ($(age --version 2>/dev/null | head -1 | sed 's/^/age /'), $(gpg --version | head -1), $(cat --version | head -1))."
  echo
  echo "$MACHINE"
  echo
  cat "$W/section.md"
} > "$W/block.md"
bench_replace_section stream "$W/block.md" "$BENCH_OUT"
cat "$W/block.md"
