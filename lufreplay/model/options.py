"""Every modelling assumption marked [I] in luf-model.md, as a named option (``--set name=value``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Option:
    """One model option: its default, allowed values (for choices) and the luf-model.md section it comes from."""

    name: str
    default: Any
    doc: str
    choices: tuple[str, ...] = ()


OPTIONS: tuple[Option, ...] = (
    Option(
        "mm_cpumask",
        "kept",
        "how a CPU leaves mm_cpumask(mm): 'kept' until a flush of the mm reaches it while it runs another mm"
        " (x86 since 'Update mm_cpumask lazily', the bundled traces' 6.18), 'switch' at a switch to another mm"
        " (x86 up to 6.12), 'window' mm_cpumask_trim_s after it last ran the mm [§8.1, §9.9]",
        ("kept", "switch", "window"),
    ),
    Option(
        "mm_cpumask_trim_s",
        1.0,
        "mm_cpumask=window: seconds a CPU stays in mm_cpumask(mm) after it last ran the mm [I, §8.1]",
    ),
    Option(
        "clip_to_recorded",
        False,
        "where the LUF models drop lazy-TLB CPUs [§9.7]: false = as the kernel does, a key holds the whole mm_cpumask"
        " union of its PTEs and every flush skips the CPUs lazy when it is sent (a batch's own flush: the CPUs its"
        " recorded flush did not reach); true = each batch's masks are clipped to the CPUs the recorded flush reached"
        " (+ sender), i.e. CPUs lazy (or PV-preempted) at the unmap stay out of the key even if busy when it is paid",
    ),
    Option(
        "unexplained_targets",
        "flush",
        "recorded batch targets no modelled mask covers: 'flush' them with the non-LUF part (conservative) or 'defer' [I]",
        ("flush", "defer"),
    ),
    Option(
        "unknown_rw",
        "reject",
        "folios whose PTE RO/RW is unknown (anon in reclaim, no VMA found): 'reject' (not eligible) or 'eligible' [I]",
        ("reject", "eligible"),
    ),
    Option(
        "shared_writable_vma",
        "writable",
        "file PTEs in a shared writable VMA (rw-s): 'writable' or 'readonly' (clean PTEs are write-protected by mkclean) [I, host-probing §5]",
        ("writable", "readonly"),
    ),
    Option(
        "shared_ro_maywrite",
        False,
        "a read-only shared file VMA (r--s) has VM_MAYWRITE (file opened O_RDWR), so faults on it run F3 [I, §4 F3]",
    ),
    Option("no_vma_maywrite", True, "a fault whose VMA is not in the maps snapshots is treated as VM_MAYWRITE [I]"),
    Option(
        "config_excludes",
        False,
        "init_on_free / KASAN / DEBUG_PAGEALLOC active on the modelled kernel: no folio is eligible [§3.2]",
    ),
    Option("arch", "x86", "architecture modelled: 'arm64' makes LUF a no-op (R9) [I, §6]", ("x86", "arm64")),
    Option(
        "atomic_no_shootdown",
        True,
        "allocations without __GFP_DIRECT_RECLAIM (0x400) are atomic: they cannot shoot down [I, R3]",
    ),
    Option(
        "non_luf_ok",
        True,
        "the zone always keeps non-LUF pages above WMARK_MIN (free counts are not traced): atomic allocations fall back to clean pages,"
        " and with alloc_order=luf buddy serves clean blocks before pend_list ones (false: pend_list first) [I, §4.1]",
    ),
    Option("pcp_strikes", 3, "pending pcp pages skipped by a no-shootdown context before the buddy fallback [C, F1]"),
    Option(
        "epoch_flush_latency_us",
        5.0,
        "time an epoch-closing flush takes; takeoffs of that epoch inside this window wait (R2) [I, §4.1]",
    ),
    Option(
        "credit_natural_flushes",
        False,
        "other recorded flushes (munmap range, immediate, kernel) also raise done[cpu] [I, §5 / §8.2.14]",
    ),
    Option(
        "dirty_folio_is_mkclean",
        True,
        "a dirty_folio event of a mapping means its writeback will run folio_mkclean (F6) [I]",
    ),
    Option("hbf_max_held_pages", 262144, "hold-before-free: release (flush) when this many pages are held [I]"),
    Option(
        "hbf_flush_on_reclaim",
        True,
        "hold-before-free: a reclaim episode start (memory needed) releases the held pages [I]",
    ),
    Option(
        "alloc_order",
        "luf",
        "which free page an allocation takes: 'luf' = the v12 allocator [C, patch 11 / §4.1]: keyed pages sit at the pcp tail"
        " (a recorded pcp allocation of a keyed page takes the OLDEST keyed page of that CPU, a drain moves the NEWEST to"
        " buddy) and buddy serves clean blocks first while non_luf_ok; 'recorded' = exactly the pfns the traced kernel"
        " re-used (pessimistic bound)",
        ("luf", "recorded"),
    ),
    Option(
        "large_folios",
        "reject",
        "large folios (THP/mTHP, ext4 page-cache folios of order 2-9): 'reject' as v12 does [C, 'XXX: remove later']"
        " or 'eligible' = what if that exclusion were removed [I]",
        ("reject", "eligible"),
    ),
    Option(
        "hooks",
        "posted",
        "luf-v12 hooks F3-F8/F10 (fault, write_begin, truncate, mkclean, zap_vma, ctxsw_kthread): 'posted' = as the"
        " v12 code does, what a patched kernel runs: fold_luf_batch_mm never sets flush_required, so they send no IPI"
        " (unsafe: stale entries survive until the page is reused; see stale_window); 'intended' = they flush the"
        " mm/mapping batch as the cover letter says (the luf-v12-intended model always does) [C, §9.1]",
        ("posted", "intended"),
    ),
    Option(
        "keep",
        "posted",
        "luf-v12 F11, reclaim could not free an eligible folio: 'posted' = as the v12 code does,"
        " luf_flush(fold_unmap_luf()) ends in try_to_unmap_flush(), which also sends the pass's pending non-LUF work"
        " (tlb_ubc), even when no key was made; 'key_only' = only the new key is flushed, the non-LUF work waits for"
        " the batch flush (the cover letter's F11; the luf-v12-intended model always does) [C, §9.3]",
        ("posted", "key_only"),
    ),
    Option(
        "dirty_writeback",
        "posted",
        "luf-v12 F13, reclaim writes a dirty folio: 'posted' = as the v12 code does, try_to_unmap_flush_dirty() flushes"
        " the open batch, its LUF work included, and only when a dirty PTE was cleared in it: the batch whose recorded"
        " flush the pageout row closes (vanilla's own try_to_unmap_flush_dirty) is flushed whole instead of keyed, and"
        " keyed pages are never touched; 'last_key' = the pageout flushes the task's last key (§8.2.5 'everything"
        " pending for the task'; the luf-v12-intended model always does) [C, §9.4]",
        ("posted", "last_key"),
    ),
    Option(
        "oracle_local_flushes",
        True,
        "oracle: a CPU that runs a LUF point (batch end, takeoff, hook) flushes its own TLB there with no IPI, so it"
        " owes nothing older later (true: a bound on any safe scheme, docs/simulate.md 'The oracle'); false: the"
        " former oracle, paying each CPU only at the points a stale entry could be used [I]",
    ),
    Option(
        "v11_atomic_flush",
        True,
        "luf-v11: the allocation-time flush (prep_new_page) happens whatever the context [I, §2.6]",
    ),
)
BY_NAME = {o.name: o for o in OPTIONS}
DEFAULTS: dict[str, Any] = {o.name: o.default for o in OPTIONS}


class OptionError(ValueError):
    """A bad ``--set`` value; the message is one line."""


def _convert(opt: Option, raw: str) -> Any:
    d = opt.default
    try:
        if isinstance(d, bool):
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if isinstance(d, int):
            v = int(raw)
            if v < 0:
                raise ValueError(raw)
            return v
        if isinstance(d, float):
            v = float(raw)
            if v < 0:
                raise ValueError(raw)
            return v
    except ValueError:
        raise OptionError(f"option {opt.name}: bad value {raw!r} (expected {type(d).__name__} ≥ 0)") from None
    if opt.choices and raw not in opt.choices:
        raise OptionError(f"option {opt.name}: {raw!r} is not one of {', '.join(opt.choices)}")
    return raw


def parse_settings(settings: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """Defaults overridden by ``NAME=VALUE`` strings (or a dict of already-typed values)."""
    out = dict(DEFAULTS)
    if not settings:
        return out
    items = settings.items() if isinstance(settings, dict) else [_split(s) for s in settings]
    for name, value in items:
        if name not in BY_NAME:
            raise OptionError(f"unknown option {name!r} (see --list-options)")
        opt = BY_NAME[name]
        out[name] = _convert(opt, value) if isinstance(value, str) else value
    return out


def _split(s: str) -> tuple[str, str]:
    if "=" not in s:
        raise OptionError(f"--set expects NAME=VALUE, got {s!r}")
    k, v = s.split("=", 1)
    return k.strip(), v.strip()


def describe() -> list[dict[str, Any]]:
    """Options as rows (name, default, choices, doc) for --list-options and the results document."""
    return [{"name": o.name, "default": o.default, "choices": list(o.choices), "doc": o.doc} for o in OPTIONS]
