#!/usr/bin/env bash
# Boot the test-bed kernel under qemu (TCG) with N vCPUs over the host's own filesystem (read-only) and run
# testbed/guest-record.sh for each CASE inside (one boot); each case's trace and counter snapshots land in
# OUTDIR/CASE on the host.
# Usage: testbed/run-guest.sh CPUS CASE[,CASE...] OUTDIR
# Env: LR_ROUTE=vng|qemu (default vng when installed; qemu = this script's own qemu + 9p command line),
#      LR_MEM (guest RAM, default 2G), LR_DURATION, LR_THREADS, LR_SPARSE, LR_LIMIT (passed to the guest),
#      LR_DISK_OVERLAY=1 (write to a qcow2 overlay in OUTDIR, not the cached data disk: parallel guests),
#      LUFREPLAY_TESTBED_CACHE (kernel and data disk; default ${XDG_CACHE_HOME:-~/.cache}/lufreplay-testbed)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
cpus=${1:?cpus}
cases=${2:?case}
out=${3:?outdir}
cache=${LUFREPLAY_TESTBED_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lufreplay-testbed}
# The kernel: LR_KERNEL, else the one `make testbed` built, else Debian's own 6.12 image if installed
# (linux-image-6.12.*-amd64-unsigned: built from the same linux-source-6.12, modules on the host fs).
kernel=${LR_KERNEL:-$cache/bzImage}
if [ ! -e "$kernel" ] && [ -z "${LR_KERNEL:-}" ]; then
    kernel=$(ls /boot/vmlinuz-6.12.*-amd64 2>/dev/null | grep -v -e cloud -e rt-amd64 | sort -V | tail -1)
    kernel=${kernel:-$cache/bzImage}
fi
mem=${LR_MEM:-2G}
route=${LR_ROUTE:-$(command -v vng > /dev/null && echo vng || echo qemu)}
log() { printf '[testbed %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
[ -e "$kernel" ] || { echo "testbed: no kernel at $kernel: run 'make testbed' first" >&2; exit 1; }

# The data disk: an ext4 image kept in the cache (the workloads' files persist across boots).
disk="$cache/data.img"
mkdir -p "$cache"
if [ ! -f "$disk" ]; then
    log "creating data disk $disk (8 GiB sparse ext4)"
    truncate -s 8G "$disk.tmp"
    mkfs.ext4 -q -F -L lrdata "$disk.tmp"
    mv "$disk.tmp" "$disk"
fi

rm -rf "$out"
mkdir -p "$out"
out=$(cd "$out" && pwd)
if [ "${LR_DISK_OVERLAY:-0}" = 1 ]; then
    # a private copy-on-write view of the data disk, so that several guests can run at once
    qemu-img create -q -f qcow2 -F raw -b "$disk" "$out/data.qcow2"
    disk="$out/data.qcow2"
fi
py=$(command -v python3)
# what the guest runs: the same Python (host fs), this checkout first on the path
cat > "$out/guest-cmd.sh" <<EOS
#!/bin/bash
export PATH="$PATH" PYTHONPATH="$repo" HOME=/tmp NUMBA_CACHE_DIR=/tmp/numba PYTHONDONTWRITEBYTECODE=1
export LR_PYTHON="$py" LR_DURATION="${LR_DURATION:-4}" LR_THREADS="${LR_THREADS:-4}" LR_SPARSE="${LR_SPARSE:-0}" LR_LIMIT="${LR_LIMIT:-}"
cd "$repo"
rc=0
for c in ${cases//,/ }; do
    "$here/guest-record.sh" "\$c" "$out/\$c" "\$@" || rc=1
done
exit \$rc
EOS
chmod +x "$out/guest-cmd.sh"

t0=$(date +%s)
log "booting $(basename "$(readlink -f "$kernel")") with $cpus vCPUs, $mem RAM via $route; cases $cases -> $out"
if [ "$route" = vng ]; then
    # virtme-ng: host root read-only (virtiofs or 9p), OUTDIR writable, the data disk on virtio-scsi
    set +e
    vng --run "$kernel" --disable-kvm --cpus "$cpus" --memory "$mem" --rwdir "$out" --disk "$disk" \
        --append "sysrq_always_enabled=1" --exec "$out/guest-cmd.sh" > "$out/console.log" 2>&1
    rc=$?
    set -e
else
    # Own route: qemu + 9p root (read-only host /), OUTDIR as a second 9p share mounted at the same path.
    cat > "$out/guest-init.sh" <<EOS
#!/bin/bash
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp; mount -t tmpfs tmpfs /run; mount -t tmpfs tmpfs /var/tmp
mount -t 9p -o trans=virtio,version=9p2000.L,msize=1048576 out "$out"
"$out/guest-cmd.sh" /dev/vda > "$out/guest.log" 2>&1
echo \$? > "$out/guest.rc"; sync; echo o > /proc/sysrq-trigger; sleep 30
EOS
    chmod +x "$out/guest-init.sh"
    set +e
    timeout 3600 qemu-system-x86_64 -accel tcg,thread=multi -cpu max -smp "$cpus" -m "$mem" -nographic -no-reboot \
        -kernel "$kernel" \
        -append "console=ttyS0 root=host rootfstype=9p rootflags=trans=virtio,version=9p2000.L,msize=1048576,cache=loose ro init=$out/guest-init.sh sysrq_always_enabled=1 panic=-1" \
        -virtfs local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap \
        -virtfs local,path="$out",mount_tag=out,security_model=none \
        -drive file="$disk",if=virtio,cache=unsafe \
        -nic none > "$out/console.log" 2>&1
    rc=$(cat "$out/guest.rc" 2>/dev/null || echo 99)
    set -e
fi
log "guest finished in $(( $(date +%s) - t0 )) s (rc=$rc); console: $out/console.log"
exit "$rc"
