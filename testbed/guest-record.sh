#!/usr/bin/env bash
# Runs INSIDE the test-bed guest (as root): prepares the guest, records one case with `lufreplay record`,
# and leaves the trace plus kernel counter snapshots in OUTDIR (a directory shared with the host).
# Usage: guest-record.sh CASE OUTDIR [DATA_DEV]
#   CASE: stream | mixed | three | migration | smoke   (see case_args below)
# Env: LR_PYTHON (default python3), LR_DURATION (workload seconds), LR_THREADS (stream readers, default 4),
#      LR_SPARSE=1 (hole files for the streamed files), LR_LIMIT (memory limit instead of the case's).
set -uo pipefail
case_name=${1:?case}
out=${2:?outdir}
dev=${3:-}
py=${LR_PYTHON:-python3}
dur=${LR_DURATION:-4}
threads=${LR_THREADS:-4}
log() { printf '[guest %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

trap 'rc=$?; sync; log "$case_name done (rc=$rc)"' EXIT

mnt() { mountpoint -q "$2" 2>/dev/null || { mkdir -p "$2"; mount -t "$1" "$1" "$2"; }; }
mnt proc /proc
mnt sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mnt tmpfs /tmp
mnt debugfs /sys/kernel/debug
mnt tracefs /sys/kernel/tracing
# cgroup v2 with the memory controller (the recorder makes its own child with memory.max)
grep -q ' /sys/fs/cgroup cgroup2 ' /proc/mounts || { mkdir -p /sys/fs/cgroup; mount -t cgroup2 none /sys/fs/cgroup; }
echo 1 > /proc/sys/kernel/sysrq

# The data disk (ext4): the workload's files live there, in order-0 page cache on 6.12.
data=/tmp/lrdata  # /tmp: writable in every route (the host root is read-only)
if [ -z "$dev" ]; then
    for d in /dev/vda /dev/vdb /dev/sda /dev/sdb; do
        [ -b "$d" ] && [ "$(blkid -o value -s LABEL "$d" 2>/dev/null)" = lrdata ] && { dev=$d; break; }
    done
fi
[ -n "$dev" ] || { log "no data disk labelled lrdata"; exit 2; }
mkdir -p "$data"
mountpoint -q "$data" || mount -t ext4 "$dev" "$data" || exit 2

mem_mb=$(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo)
log "kernel $(uname -r), $(nproc) CPUs, ${mem_mb} MiB RAM, data on $dev"

# case -> memory limit and workload arguments (issue 7 item 2; files sized to be >= 2x the limit)
case "$case_name" in
    stream)    limit=256M; wl=(mmap-stream --threads "$threads" --file-size 512M) ;;
    mixed)     limit=128M; wl=(mixed-file --file-size 384M --readers 2 --threads 2) ;;
    three)     limit=256M; wl=(mmap-stream --processes 3 --threads 2 --file-size 256M) ;;
    migration) limit="";   wl=(compact --region-size 8M) ;;
    smoke)     limit=64M;  wl=(mmap-stream --threads 2 --file-size 128M --sparse) ;;
    *) log "unknown case $case_name"; exit 2 ;;
esac
limit=${LR_LIMIT:-$limit}  # LR_LIMIT overrides the case's memory limit
wl+=(--dir "$data/work")
mkdir -p "$data/work" "$out"

# Create the data files (and compile the helper) outside the recording, unless they exist.
helper() { ls "$data"/work/.bin/lrwork-* 2>/dev/null | head -1; }
if [ "$case_name" = smoke ] || [ -z "$(helper)" ]; then
    log "warm-up: ${wl[*]}"
    "$py" -m lufreplay workload "${wl[@]}" --duration 0.2 ${limit:+--memory-limit "$limit"} > /dev/null 2> "$out/warmup.err" \
        || { log "warm-up failed"; tail -5 "$out/warmup.err" >&2; exit 3; }
fi
# Under TCG a Python start (lufreplay imports pandas) takes minutes, so every case but smoke records the
# workload's C helper `lrwork` directly, with the arguments its `lufreplay workload` runs it with, and the
# recording holds the workload and not an interpreter start. Each helper reads one gate line on stdin
# (`echo go`) and prints one JSON line on stdout (workload.json).
#   stream:    THREADS pinned readers from CPU 0 of one 512 MiB MAP_SHARED file, MADV_RANDOM (1)
#   mixed:     2 readers x 2 threads (CPUs 0-1, 2-3) of one 384 MiB file + the writer (200 writes/s through
#              its shared RW mapping and 200 pwrite()s/s, pinned to CPU 1) - mixed-file's processes
#   three:     3 processes x 2 threads, each streaming its own 256 MiB file (CPUs 0-1, 2-3, 4-5 mod N)
#   migration: compact's `regions` (7 regions of 8 MiB with known permissions, 128 MiB filler interleaved
#              then freed), one write of compact_memory once the regions are ready, then release; the
#              pre-compaction (the Python workload's, see common.pre_compact) runs before the recording
# LR_SPARSE=1: hole files for the streamed files (no disk I/O: under TCG the disk reads of a real file run
# at ~700 pages/s, too slow to fill the cgroup in a short run; the bundled 2-vCPU mmap-stream trace uses
# --sparse too). The writer of `mixed` then fills holes of the file it writes (ext4 delalloc).
H=$(helper)
ext=bin
[ "${LR_SPARSE:-0}" = 1 ] && ext=sparse
mkfile() {  # mkfile NAME SIZE: a hole file, or a file of real (written) blocks
    local f="$data/work/$1"
    if [ "$ext" = sparse ]; then
        [ -f "$f" ] || truncate -s "$2" "$f"
    else
        [ -f "$f" ] || dd if=/dev/zero of="$f" bs=1M count="${2%M}" conv=fsync status=none
    fi
    printf '%s' "$f"
}
case "$case_name" in
    stream)
        f=$(mkfile "stream0-512M.$ext" 512M)
        cmd=(-- sh -c "echo go | exec $H stream $f $dur $threads 0 0 s0 1") ;;
    mixed)
        f=$(mkfile "mixed-384M.$ext" 384M)
        cmd=(-- sh -c "(echo go | exec $H stream $f $dur 2 0 0 r0 1) & (echo go | exec $H stream $f $dur 2 2 0 r1 1) &
(echo go | exec $H writer $f $dur 200) & wait") ;;
    three)
        f0=$(mkfile "stream0-256M.$ext" 256M); f1=$(mkfile "stream1-256M.$ext" 256M); f2=$(mkfile "stream2-256M.$ext" 256M)
        cmd=(-- sh -c "(echo go | exec $H stream $f0 $dur 2 0 0 p0 1) & (echo go | exec $H stream $f1 $dur 2 2 0 p1 1) &
(echo go | exec $H stream $f2 $dur 2 4 0 p2 1) & wait") ;;
    migration)
        ext=bin  # the regions' file pages must be real page cache with data, as compact's files are
        fro=$(mkfile compact-ro-16M.bin 16M); frw=$(mkfile compact-rw-16M.bin 16M)
        sync; echo 3 > /proc/sys/vm/drop_caches
        log "pre-compaction"; echo 1 > /proc/sys/vm/compact_memory
        rdy=/tmp/regions.out
        cmd=(-- sh -c "{ echo go; until grep -q ready $rdy 2>/dev/null; do sleep 0.2; done;
echo 1 > /proc/sys/vm/compact_memory; echo done; } | $H regions $fro $frw 8388608 134217728 > $rdy; cat $rdy") ;;
    *)
        cmd=(--workload "${wl[0]}" -- "${wl[@]:1}" --duration "$dur" --json) ;;
esac

sync
echo 3 > /proc/sys/vm/drop_caches
cat /proc/interrupts > "$out/interrupts.before"
cat /proc/vmstat > "$out/vmstat.before"
log "record: ${cmd[*]} (limit ${limit:-none})"
t0=$(date +%s.%N)
"$py" -m lufreplay record -o "$out/trace" --segment-seconds 30 ${limit:+--memory-limit "$limit"} \
    "${cmd[@]}" > "$out/workload.json" 2> "$out/record.err"
rc=$?
t1=$(date +%s.%N)
cat /proc/interrupts > "$out/interrupts.after"
cat /proc/vmstat > "$out/vmstat.after"
{
    echo "case=$case_name"
    echo "kernel=$(uname -r)"
    echo "cpus=$(nproc)"
    echo "mem_mb=$mem_mb"
    echo "limit=${limit:-none}"
    echo "workload=${cmd[*]}"
    echo "record_rc=$rc"
    echo "record_wall_s=$(echo "$t1 - $t0" | bc)"
} > "$out/guest.txt"
tail -3 "$out/record.err" >&2
chmod -R a+rX "$out" 2>/dev/null
exit "$rc"
