#!/usr/bin/env bash
# Stream benchmark: backup-hook seal/unseal against the Go age tool, gpg and the
# cat|cat pipe floor, on one input in the page cache, all in the same run.
# Usage: bench/stream.sh [SIZE_MIB] [RUNS]     (defaults: 1024 MiB, 5 runs)
# Writes the section between <!-- stream:begin --> and <!-- stream:end --> of docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-1024}
RUNS=${2:-5}
for t in hyperfine age age-keygen gpg /usr/bin/time; do
  command -v "$t" >/dev/null || { echo "stream.sh: needs $t (apt-get install hyperfine age gnupg time)" >&2; exit 1; }
done
cargo build --release --locked --bin kms-server --bin backup-hook >&2
BIN=$PWD/target/release
W=$(mktemp -d)
SERVER_PID=
cleanup() { [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null; rm -rf "$W"; }
trap cleanup EXIT

KLUIS_LOG=warn "$BIN/kms-server" dev --data-dir "$W/kluis" --listen 127.0.0.1:0 > "$W/server.out" 2> "$W/server.err" &
SERVER_PID=$!
until grep -q 'listening on' "$W/server.out" 2>/dev/null; do
  kill -0 "$SERVER_PID" 2>/dev/null || { cat "$W/server.err" >&2; exit 1; }
  sleep 0.1
done
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

hyperfine --warmup 1 --runs "$RUNS" --export-json "$W/h.json" -N \
  -n "backup-hook seal (file to /dev/null)" "$BIN/backup-hook seal --keyring default --backup-id bench -i $W/input -o /dev/null" \
  -n "backup-hook unseal (file to /dev/null)" "$BIN/backup-hook unseal -i $W/input.kluis -o /dev/null" \
  -n "age -r (encrypt, X25519)" "age -r $RCPT -o /dev/null $W/input" \
  -n "age -d (decrypt, X25519)" "age -d -i $W/age.key -o /dev/null $W/input.age" \
  -n "gpg --symmetric AES256" "gpg --batch --yes --quiet --pinentry-mode loopback --passphrase-file $W/gpgpass --symmetric --cipher-algo AES256 --compress-algo none -o /dev/null $W/input" \
  -n "gpg --decrypt" "gpg --batch --yes --quiet --pinentry-mode loopback --passphrase-file $W/gpgpass --decrypt -o /dev/null $W/input.gpg" \
  >&2
hyperfine --warmup 1 --runs "$RUNS" --export-json "$W/p.json" \
  -n "cat | cat (pipe floor)" "cat $W/input | cat > /dev/null" \
  -n "cat | backup-hook seal | cat" "cat $W/input | $BIN/backup-hook seal --keyring default --backup-id bench | cat > /dev/null" \
  -n "cat | backup-hook unseal | cat" "cat $W/input.kluis | $BIN/backup-hook unseal | cat > /dev/null" \
  >&2

rss() { /usr/bin/time -v "$@" 2>&1 >/dev/null | awk -F': ' '/Maximum resident set size/ {print $2}'; }
RSS_SEAL=$(rss "$BIN/backup-hook" seal --keyring default --backup-id bench -i "$W/input" -o /dev/null)
RSS_UNSEAL=$(rss "$BIN/backup-hook" unseal -i "$W/input.kluis" -o /dev/null)
RSS_AGE=$(rss age -d -i "$W/age.key" -o /dev/null "$W/input.age")

python3 - "$W/h.json" "$W/p.json" "$SIZE_MIB" "$RUNS" "$RSS_SEAL" "$RSS_UNSEAL" "$RSS_AGE" > "$W/section.md" <<'PY'
import json, sys, statistics
h = json.load(open(sys.argv[1]))["results"]; p = json.load(open(sys.argv[2]))["results"]
size, runs = int(sys.argv[3]), int(sys.argv[4]); rss_seal, rss_unseal, rss_age = sys.argv[5:8]
med = {r["command"]: statistics.median(r["times"]) for r in h + p}
def row(name):
    t = med[name]; return f"| {name} | {t:.3f} s | {size / t:.0f} MiB/s |"
print(f"Input: {size} MiB of random bytes in the page cache; {runs} runs each after one warm-up; medians of whole-process wall time (hyperfine).\n")
print("| command | median | throughput |\n|---|---|---|")
for r in h + p: print(row(r["command"]))
s, u = med["backup-hook seal (file to /dev/null)"], med["backup-hook unseal (file to /dev/null)"]
ae, ad = med["age -r (encrypt, X25519)"], med["age -d (decrypt, X25519)"]
fl = med["cat | cat (pipe floor)"]
ps, pu = med["cat | backup-hook seal | cat"], med["cat | backup-hook unseal | cat"]
print("\n| ratio (speed, higher is faster) | measured | target (issue 7) |\n|---|---|---|")
print(f"| seal vs `age` encrypt | {ae / s:.2f}x | >= 1.5x |")
print(f"| unseal vs `age` decrypt | {ad / u:.2f}x | >= 1.5x |")
print(f"| pipe seal vs `cat \\| cat` | {fl / ps:.2f}x | >= 0.9x |")
print(f"| pipe unseal vs `cat \\| cat` | {fl / pu:.2f}x | >= 0.9x |")
print(f"\nPeak RSS (/usr/bin/time -v): backup-hook seal {int(rss_seal)//1024} MiB, unseal {int(rss_unseal)//1024} MiB; age -d {int(rss_age)//1024} MiB (target for the hook: <= 32 MiB).")
PY

{
  echo "<!-- stream:begin -->"
  echo "## Stream: seal and unseal"
  echo
  echo "Reproduce: \`bench/stream.sh $SIZE_MIB $RUNS\` (run on $(date -u +%Y-%m-%d); $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/ {print $2}') GiB; $(age --version 2>/dev/null | head -1 | sed 's/^/age /'), $(gpg --version | head -1), $(rustc --version))."
  echo
  cat "$W/section.md"
  echo "<!-- stream:end -->"
} > "$W/block.md"
mkdir -p docs
[ -f docs/benchmarks.md ] || printf '# Benchmarks\n\nEvery figure here comes from a real run of the command next to it, on the machine it names.\n' > docs/benchmarks.md
python3 - docs/benchmarks.md "$W/block.md" <<'PY'
import re, sys
doc = open(sys.argv[1]).read(); block = open(sys.argv[2]).read().strip()
pat = re.compile(r"<!-- stream:begin -->.*?<!-- stream:end -->", re.S)
doc = pat.sub(lambda m: block, doc) if pat.search(doc) else doc.rstrip() + "\n\n" + block + "\n"
open(sys.argv[1], "w").write(doc)
PY
cat "$W/block.md"
