#!/usr/bin/env bash
# One idempotent set-up step for lufreplay on a Debian/Ubuntu host; `make demo`, `make test` and .ci/run call it.
#  - Python package (editable) with its test extras and the fleet extra (Ray, for `lufreplay sweep`).
#  - As root: bcc (python3-bpfcc), kernel headers bcc can compile against, tracefs mounted,
#    Chromium for the report's browser test. Without root only the Python part runs (simulate needs no root).
# Kernel headers: bcc looks in /lib/modules/$(uname -r)/build. A custom kernel (as on Firecracker guests) has
# none, so we point it at the closest Debian header set. Tracepoint argument layouts come from the live format
# files, so they stay correct; raw struct reads would not, and the probes make none. `lufreplay doctor`
# reports the mismatch.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "setup: $*" >&2; }

# numba compiles the replay and models on first use (~1 min on 2 vCPUs); compile them here, into numba's
# on-disk cache, so the first `simulate` a user runs answers in seconds. A warm cache makes this a ~3 s no-op.
warm_numba() {
  [ -d traces/mmap-stream ] || return 0
  local t0=$SECONDS
  if $PY -m lufreplay simulate traces/mmap-stream --json >/dev/null 2>/tmp/lufreplay-warm.$$.err; then
    if [ $((SECONDS - t0)) -gt 10 ]; then say "compiled the replay and models into numba's cache ($((SECONDS - t0)) s)"; fi
  else
    say "warning: warming numba's cache failed: $(tail -n1 /tmp/lufreplay-warm.$$.err)"
  fi
  rm -f /tmp/lufreplay-warm.$$.err
}

PY=${PYTHON:-python3}
if ! $PY -c 'import lufreplay, pytest, hypothesis, duckdb, ray' 2>/dev/null || [ pyproject.toml -nt .setup-stamp ]; then
  say "installing the lufreplay Python package (editable, with test and fleet (Ray) extras)"
  $PY -m pip install -q --disable-pip-version-check -e '.[test,fleet]' 2>&1 | grep -v 'Running pip as the\|is ignored: it is neither' || true
  touch .setup-stamp
fi

if [ "$(id -u)" != 0 ]; then
  say "not root: skipping bcc, kernel headers and tracefs (only 'simulate', 'info' and 'report' will work)"
  warm_numba
  exit 0
fi

arch=$(dpkg --print-architecture 2>/dev/null || echo amd64)
pkgs=()
[ -e /usr/lib/python3/dist-packages/bcc/__init__.py ] || pkgs+=(python3-bpfcc)
kver=$(uname -r)
if [ ! -e "/lib/modules/$kver/build/include" ] && ! ls -d /usr/src/linux-headers-*-"$arch" >/dev/null 2>&1; then
  if apt-cache show "linux-headers-$kver" >/dev/null 2>&1; then pkgs+=("linux-headers-$kver"); else pkgs+=("linux-headers-$arch"); fi
fi
command -v chromium >/dev/null 2>&1 || pkgs+=(chromium)
if [ ${#pkgs[@]} -gt 0 ]; then
  say "apt-get install ${pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
fi

if [ ! -e "/lib/modules/$kver/build/include" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-"$arch" 2>/dev/null | sort -V | tail -n1)
  common=${hdr%-"$arch"}-common
  if [ -n "$hdr" ] && [ -d "$common" ]; then
    say "no headers for kernel $kver: pointing bcc at $(basename "$hdr") (tracepoint args only; see 'lufreplay doctor')"
    mkdir -p "/lib/modules/$kver"
    ln -sfn "$hdr" "/lib/modules/$kver/build"
    ln -sfn "$common" "/lib/modules/$kver/source"
  else
    say "warning: no kernel headers found; 'lufreplay record' will not compile its probes"
  fi
fi

if [ ! -d /sys/kernel/tracing/events ]; then
  mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || say "warning: could not mount tracefs"
fi

warm_numba
