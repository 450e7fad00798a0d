#!/usr/bin/env bash
# Build the test bed's guest kernel (vanilla 6.12 from Debian's linux-source-6.12) once, cached outside the repo.
# Usage: testbed/build-kernel.sh            (idempotent: a built bzImage whose config matches is reused)
# Env:   LUFREPLAY_TESTBED_CACHE (default ${XDG_CACHE_HOME:-~/.cache}/lufreplay-testbed), JOBS (default nproc)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${LUFREPLAY_TESTBED_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lufreplay-testbed}
jobs=${JOBS:-$(nproc)}
mkdir -p "$cache"
log() { printf '[testbed %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

pkgs=(linux-source-6.12 qemu-system-x86 build-essential bc flex bison libelf-dev libssl-dev cpio xz-utils dwarves kmod)
missing=()
for p in "${pkgs[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p"); done
if ((${#missing[@]})); then
    [ "$(id -u)" = 0 ] || { echo "testbed: need root to apt-get install ${missing[*]}" >&2; exit 1; }
    log "apt-get install ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

tarball=$(ls /usr/src/linux-source-6.12.tar.* | head -1)
src="$cache/src"
if [ ! -f "$src/Makefile" ]; then
    log "unpacking $tarball"
    rm -rf "$src.tmp" && mkdir -p "$src.tmp"
    tar -C "$src.tmp" --strip-components=1 -xf "$tarball"
    mv "$src.tmp" "$src"
fi
version=$(make -s -C "$src" kernelversion)
build="$cache/build-$version"
mkdir -p "$build"

# Config: x86_64_defconfig + kernel.fragment, resolved by olddefconfig.
if [ ! -f "$build/.config.fragment" ] || ! cmp -s "$here/kernel.fragment" "$build/.config.fragment"; then
    log "configuring $version in $build"
    make -s -C "$src" O="$build" x86_64_defconfig
    "$src/scripts/kconfig/merge_config.sh" -m -O "$build" "$build/.config" "$here/kernel.fragment" >/dev/null
    make -s -C "$src" O="$build" olddefconfig
    cp "$here/kernel.fragment" "$build/.config.fragment"
    # Every option the fragment asks for must have survived olddefconfig (a missing dependency drops it silently).
    bad=0
    while IFS= read -r line; do
        case "$line" in
            CONFIG_*=*) grep -qxF "$line" "$build/.config" || { echo "testbed: config lost: $line" >&2; bad=1; } ;;
            "# CONFIG_"*" is not set") opt=${line#\# }; opt=${opt%% *}; grep -q "^$opt=" "$build/.config" && { echo "testbed: config kept (selected by another option): $opt" >&2; } ;;
        esac
    done < "$here/kernel.fragment"
    [ "$bad" = 0 ] || exit 1
fi

image="$build/arch/x86/boot/bzImage"
if [ ! -f "$image" ] || [ "$build/.config" -nt "$image" ]; then
    log "building bzImage with -j$jobs (this takes 10-30 min)"
    start=$(date +%s)
    nice -n 10 make -s -C "$src" O="$build" -j"$jobs" bzImage
    log "built in $(( $(date +%s) - start )) s"
fi
cp "$build/.config" "$cache/kernel.config"
ln -sfn "$image" "$cache/bzImage"
echo "$cache/bzImage"
