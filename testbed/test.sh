#!/usr/bin/env bash
# `make testbed-test`: record the issue-7 stream workload (4 pinned readers of a 512 MiB read-only shared
# mmap under a 256M memory cgroup) in the 6.12 guest at 4 and 8 vCPUs, bring the traces out, and check them on
# the host with `lufreplay info` and `lufreplay simulate` (testbed/summarize.py --check).
# Env: LR_TESTBED_OUT (default $cache/out), LR_TESTBED_CPUS (default "4 8"), LR_TESTBED_CASES (default stream;
#      comma-separated, all in one boot),
#      plus run-guest.sh's (LR_ROUTE, LR_KERNEL, LR_MEM, LR_DURATION).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
cache=${LUFREPLAY_TESTBED_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lufreplay-testbed}
outroot=${LR_TESTBED_OUT:-$cache/out}
py=$(command -v python3)
# Under TCG on 2 host CPUs a real file streams at ~700 pages/s (4 KiB disk reads): a hole file and 40 s
# are what fill and cycle the 256M cgroup.
export LR_SPARSE=${LR_SPARSE:-1} LR_DURATION=${LR_DURATION:-40}
fail=0
cases=${LR_TESTBED_CASES:-stream}
for n in ${LR_TESTBED_CPUS:-4 8}; do
    boot="$outroot/${n}cpu"
    "$here/run-guest.sh" "$n" "$cases" "$boot" || echo "testbed: a case failed at $n vCPUs (see $boot/console.log)" >&2
    for c in ${cases//,/ }; do
        out="$boot/$c"
        [ -f "$out/trace/meta.json" ] || { echo "testbed: $c at $n vCPUs: no trace (see $out/record.err)" >&2; fail=1; continue; }
        (cd "$repo" && PYTHONPATH="$repo" nice -n 10 "$py" -m lufreplay info "$out/trace" --json > "$out/info.json")
        (cd "$repo" && PYTHONPATH="$repo" nice -n 10 "$py" -m lufreplay simulate "$out/trace" --json > "$out/simulate.json")
        "$py" "$here/summarize.py" "$out" --check || fail=1
    done
done
exit "$fail"
