#!/usr/bin/env bash
# Runs every benchmark of issue 7, one after the other (never two at once: they would measure
# each other), each rewriting its own section of docs/benchmarks.md:
#   issuance.sh  GenerateDataKey / UnwrapDataKey rates, software and SoftHSM2
#   stream.sh    seal / unseal throughput against age, gpg and the cat | cat pipe floor; RSS
#   cold.sh      one whole `backup-hook seal` of an empty input (start, mTLS, issuance, exit)
#   scale.sh     a registry of 1,000,000 keys: bytes per key, start time, RSS, issuance rate
#   ha.sh        redb against PostgreSQL with one and two replicas; replica memory; kill -9 of a replica
#
#   bench/run-all.sh [NAME...]      (default: all five, in that order)
#
# Takes about 10 minutes on 2 cores (scale.sh fills the registry at the issuance rate). Each script
# waits for a quiet machine first and reports the load average it measured under.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
names=("$@")
[[ ${#names[@]} -gt 0 ]] || names=(issuance stream cold scale ha)
for n in "${names[@]}"; do
    [[ -x bench/$n.sh ]] || { echo "run-all.sh: no benchmark bench/$n.sh" >&2; exit 64; }
done
failed=()
for n in "${names[@]}"; do
    echo "run-all.sh: === bench/$n.sh ===" >&2
    start=$(date +%s)
    if bench/"$n".sh > /dev/null; then
        echo "run-all.sh: bench/$n.sh done in $(( $(date +%s) - start )) s" >&2
    else
        echo "run-all.sh: bench/$n.sh FAILED" >&2
        failed+=("$n")
    fi
done
[[ ${#failed[@]} -eq 0 ]] || { echo "run-all.sh: failed: ${failed[*]}" >&2; exit 1; }
echo "run-all.sh: all done; see docs/benchmarks.md" >&2
