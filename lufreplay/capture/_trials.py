"""Capability trials for ``features.detect``, run as a child process so each is time-bounded and a crash
(bcc, libbpf, a bad syscall) cannot take ``doctor`` down.

Run by path with the standard library only (no package import, so it starts fast)::

    python3 _trials.py bcc   # bcc import, tracepoint + raw tracepoint + kprobe: compile, load, attach, fire
    python3 _trials.py bpf   # raw bpf(2)/perf_event_open(2): ring buffer, tp_btf, fentry, PMU dTLB misses

Prints one JSON document on stdout.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import platform
import sys
import time
from typing import Any

BCC_PATH = "/usr/lib/python3/dist-packages"

# bpf(2) and perf_event_open(2) numbers per architecture.
SYSCALLS = {"x86_64": (321, 298), "aarch64": (280, 241), "riscv64": (280, 241), "ppc64le": (361, 319)}

BPF_MAP_CREATE, BPF_PROG_LOAD, BPF_RAW_TRACEPOINT_OPEN = 0, 5, 17
BPF_MAP_TYPE_RINGBUF = 27
BPF_PROG_TYPE_TRACING = 26
BPF_TRACE_RAW_TP, BPF_TRACE_FENTRY = 23, 24

# A trivial program: r0 = 0; exit.
INSNS = (0x00000000000000B7, 0x0000000000000095)


def _err(e: BaseException) -> str:
    """One line for an exception (bcc errors are multi-line)."""
    lines = [x for x in str(e).splitlines() if x.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}".strip()


# --------------------------------------------------------------------------------------------------
# bcc
# --------------------------------------------------------------------------------------------------

BCC_TEXT = r"""
BPF_ARRAY(hits, u64, 4);
static inline void hit(int i) { u64 *v = hits.lookup(&i); if (v) __sync_fetch_and_add(v, 1); }
TRACEPOINT_PROBE(sched, sched_switch) { hit(0); return 0; }
%(extra_tp)s
int lr_rawtp(struct bpf_raw_tracepoint_args *ctx) { hit(1); return 0; }
int lr_kprobe(void *ctx) { hit(2); return 0; }
"""
# Reads a field through the format-derived args struct: proves header compile and format parsing.
TLB_TP = "TRACEPOINT_PROBE(tlb, tlb_flush) { if (args->reason == 1000) hit(3); return 0; }"


def trial_bcc() -> dict[str, Any]:
    out: dict[str, Any] = {"import": False}
    sys.path.append(BCC_PATH)
    t0 = time.monotonic()
    try:
        import bcc
        from bcc import BPF
    except Exception as e:
        out["error"] = _err(e)
        return out
    out["import"] = True
    out["import_s"] = round(time.monotonic() - t0, 3)
    out["version"] = getattr(bcc, "__version__", None)
    b = None
    for extra in (TLB_TP, ""):
        t0 = time.monotonic()
        try:
            b = BPF(text=BCC_TEXT % {"extra_tp": extra})
            out["compile_load_attach_s"] = round(time.monotonic() - t0, 3)
            out["args_struct"] = bool(extra)
            break
        except Exception as e:
            out.setdefault("compile_errors", []).append(_err(e))
    if b is None:
        out["tracepoint"] = {"ok": False, "error": out["compile_errors"][-1]}
        return out
    out["tracepoint"] = {"ok": True, "detail": "TRACEPOINT_PROBE(sched, sched_switch) loaded and attached"}
    t0 = time.monotonic()
    try:
        b.attach_raw_tracepoint(tp="sched_switch", fn_name="lr_rawtp")
        out["raw_tracepoint"] = {"ok": True, "attach_s": round(time.monotonic() - t0, 3)}
    except Exception as e:
        out["raw_tracepoint"] = {"ok": False, "error": _err(e)}
    t0 = time.monotonic()
    try:
        b.attach_kprobe(event="vfs_read", fn_name="lr_kprobe")
        out["kprobe"] = {"ok": True, "attach_s": round(time.monotonic() - t0, 3)}
    except Exception as e:
        out["kprobe"] = {"ok": False, "error": _err(e)}
    # Make the programs fire: context switches and a read.
    for _ in range(5):
        time.sleep(0.01)
        with open("/proc/self/stat", "rb") as f:
            f.read()
    hits = b["hits"]
    counts = [int(hits[hits.Key(i)].value) for i in range(3)]
    out["tracepoint"]["fired"] = counts[0]
    if out["raw_tracepoint"]["ok"]:
        out["raw_tracepoint"]["fired"] = counts[1]
    if out["kprobe"]["ok"]:
        out["kprobe"]["fired"] = counts[2]
    t0 = time.monotonic()
    b.cleanup()
    out["detach_s"] = round(time.monotonic() - t0, 3)
    return out


# --------------------------------------------------------------------------------------------------
# raw bpf(2) / perf_event_open(2)
# --------------------------------------------------------------------------------------------------


class _Sys:
    def __init__(self) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        nrs = SYSCALLS.get(platform.machine())
        if nrs is None:
            raise OSError(f"bpf(2) number unknown on {platform.machine()}")
        self.nr_bpf, self.nr_perf = nrs

    def bpf(self, cmd: int, attr: ctypes.Array) -> tuple[int, int]:
        r = self.libc.syscall(self.nr_bpf, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
        return r, ctypes.get_errno()


def _attr(size: int, fields: list[tuple[int, type, int]]) -> ctypes.Array:
    buf = (ctypes.c_uint8 * size)()
    for off, ctype, val in fields:
        ctypes.memmove(ctypes.addressof(buf) + off, ctypes.byref(ctype(val)), ctypes.sizeof(ctype))
    return buf


def _libbpf() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    lib.libbpf_find_vmlinux_btf_id.argtypes = [ctypes.c_char_p, ctypes.c_int]
    lib.libbpf_find_vmlinux_btf_id.restype = ctypes.c_int
    # Silence libbpf's own warnings on stderr; the trial reports errors itself.
    lib.libbpf_set_print.argtypes = [ctypes.c_void_p]
    lib.libbpf_set_print(None)
    return lib


def _load_tracing(s: _Sys, attach_type: int, btf_id: int) -> tuple[int, int, str]:
    insns = (ctypes.c_uint64 * len(INSNS))(*INSNS)
    lic = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(4096)
    attr = _attr(
        128,
        [
            (0, ctypes.c_uint32, BPF_PROG_TYPE_TRACING),
            (4, ctypes.c_uint32, len(INSNS)),
            (8, ctypes.c_uint64, ctypes.addressof(insns)),
            (16, ctypes.c_uint64, ctypes.addressof(lic)),
            (24, ctypes.c_uint32, 1),
            (28, ctypes.c_uint32, len(log)),
            (32, ctypes.c_uint64, ctypes.addressof(log)),
            (68, ctypes.c_uint32, attach_type),
            (108, ctypes.c_uint32, btf_id),
        ],
    )
    fd, e = s.bpf(BPF_PROG_LOAD, attr)
    return fd, e, log.value.decode(errors="replace").strip().splitlines()[-1:][0] if log.value else ""


def _trial_tracing(s: _Sys, lib: ctypes.CDLL | None, attach_type: int, target: str) -> dict[str, Any]:
    if lib is None:
        return {"ok": None, "error": "libbpf not found (needed to look up BTF ids)"}
    btf_id = lib.libbpf_find_vmlinux_btf_id(target.encode(), attach_type)
    if btf_id < 0:
        return {"ok": False, "error": f"{target}: no BTF id ({os.strerror(-btf_id)})"}
    t0 = time.monotonic()
    fd, e, log = _load_tracing(s, attach_type, btf_id)
    if fd < 0:
        return {
            "ok": False,
            "target": target,
            "error": f"load: {os.strerror(e)} (errno {e})" + (f"; {log}" if log else ""),
        }
    try:
        link, e2 = s.bpf(BPF_RAW_TRACEPOINT_OPEN, _attr(16, [(0, ctypes.c_uint64, 0), (8, ctypes.c_uint32, fd)]))
        if link < 0:
            return {"ok": False, "target": target, "error": f"attach: {os.strerror(e2)} (errno {e2})"}
        os.close(link)
        return {"ok": True, "target": target, "load_attach_s": round(time.monotonic() - t0, 4)}
    finally:
        os.close(fd)


def _trial_ringbuf(s: _Sys) -> dict[str, Any]:
    size = 64 * os.sysconf("SC_PAGE_SIZE")
    fd, e = s.bpf(
        BPF_MAP_CREATE,
        _attr(72, [(0, ctypes.c_uint32, BPF_MAP_TYPE_RINGBUF), (12, ctypes.c_uint32, size)]),
    )
    if fd < 0:
        return {"ok": False, "error": f"{os.strerror(e)} (errno {e})"}
    os.close(fd)
    return {"ok": True, "size": size}


def _trial_pmu(s: _Sys) -> dict[str, Any]:
    # PERF_TYPE_HW_CACHE, config = cache | op << 8 | RESULT_MISS << 16: the three events record counts by default.
    perf_type_hw_cache, dtlb, itlb, op_read, op_write, result_miss = 3, 3, 4, 0, 1, 1
    events = {
        "dTLB-load-misses": dtlb | (op_read << 8) | (result_miss << 16),
        "dTLB-store-misses": dtlb | (op_write << 8) | (result_miss << 16),
        "iTLB-load-misses": itlb | (op_read << 8) | (result_miss << 16),
    }
    out: dict[str, Any] = {"ok": True, "event": "dTLB-load-misses", "events": {}}
    for name, config in events.items():
        attr = _attr(
            64,
            [(0, ctypes.c_uint32, perf_type_hw_cache), (4, ctypes.c_uint32, 64), (8, ctypes.c_uint64, config)],
        )
        fd = s.libc.syscall(s.nr_perf, ctypes.byref(attr), 0, -1, -1, 0)
        e = ctypes.get_errno()
        if fd < 0:
            out["events"][name] = f"{os.strerror(e)} (errno {e})"
            if name == "dTLB-load-misses":  # the event that decides the trace's counters.pmu
                out.update(ok=False, error=out["events"][name])
            continue
        os.close(fd)
        out["events"][name] = "ok"
    return out


def trial_bpf() -> dict[str, Any]:
    try:
        s = _Sys()
    except OSError as e:
        return {"error": str(e)}
    lib = _libbpf()
    out: dict[str, Any] = {"libbpf": lib is not None}
    for key, fn in (
        ("ringbuf", lambda: _trial_ringbuf(s)),
        ("tp_btf", lambda: _trial_tracing(s, lib, BPF_TRACE_RAW_TP, "tlb_flush")),
        ("fentry", lambda: _trial_tracing(s, lib, BPF_TRACE_FENTRY, "flush_tlb_func")),
        ("pmu_tlb", lambda: _trial_pmu(s)),
    ):
        try:
            out[key] = fn()
        except Exception as e:
            out[key] = {"ok": False, "error": _err(e)}
    return out


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else ""
    trials = {"bcc": trial_bcc, "bpf": trial_bpf}
    if which not in trials:
        sys.exit(f"usage: {sys.argv[0]} {{bcc|bpf}}")
    try:
        res = trials[which]()
    except Exception as e:
        res = {"error": _err(e)}
    sys.stdout.write(json.dumps(res) + "\n")
