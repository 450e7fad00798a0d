#!/usr/bin/env bash
# `make testbed-test`: record the issue-7 stream workload (4 pinned readers of a 512 MiB read-only shared
# mmap under a 256M memory cgroup) in the 6.12 guest at 4 and 8 vCPUs, bring the traces out, and check them on
# the host with `lufreplay info` and `lufreplay simulate` (testbed/summarize.py --check).
# Env: LR_TESTBED_OUT (default $cache/out), LR_TESTBED_CPUS (default "4 8"), LR_TESTBED_CASES (default stream),
#      plus run-guest.sh's (LR_ROUTE, LR_KERNEL, LR_MEM, LR_DURATION).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
cache=${LUFREPLAY_TESTBED_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lufreplay-testbed}
outroot=${LR_TESTBED_OUT:-$cache/out}
py=$(command -v python3)
fail=0
for case_name in ${LR_TESTBED_CASES:-stream}; do
    for n in ${LR_TESTBED_CPUS:-4 8}; do
        out="$outroot/$case_name-${n}cpu"
        if ! "$here/run-guest.sh" "$n" "$case_name" "$out"; then
            echo "testbed: $case_name at $n vCPUs: the guest run failed (see $out/console.log, $out/record.err)" >&2
            fail=1
            continue
        fi
        (cd "$repo" && PYTHONPATH="$repo" nice -n 10 "$py" -m lufreplay info "$out/trace" --json > "$out/info.json")
        (cd "$repo" && PYTHONPATH="$repo" nice -n 10 "$py" -m lufreplay simulate "$out/trace" --json > "$out/simulate.json")
        "$py" "$here/summarize.py" "$out" --check || fail=1
    done
done
exit "$fail"
