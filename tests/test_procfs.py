"""procfs parsers on fixed texts and on this host's live files; kallsyms; clocks."""

from __future__ import annotations

import mmap
import os
import time
from pathlib import Path

import numpy as np
import pytest

from lufreplay import schema
from lufreplay.capture import procfs

INTERRUPTS = """\
           CPU0       CPU1       CPU2
  0:         44          0          0  IO-APIC   2-edge      timer
 24:          1          0          7  IO-APIC   5-edge      ACPI:Ged
NMI:          0          1          2   Non-maskable interrupts
CAL:      50089      26977        300   Function call interrupts
TLB:       2722       2088         15   TLB shootdowns
ERR:          3
MIS:          0
"""

MAPS = (
    """\
55d0c0a00000-55d0c0a21000 r--p 00000000 fe:01 2146443                    /usr/bin/my prog (deleted)
7f0000000000-7f00c0000000 r--s 00001000 103:02 42                         /data/ro3g.bin
7ffd1e3c0000-7ffd1e3e1000 rw-p 00000000 00:00 0                          [stack]
"""
    + "7f1000000000-7f1000021000 rw-p 00000000 00:00 0 \n"
)  # anonymous: the kernel leaves a trailing space


def test_parse_interrupts() -> None:
    irq = procfs.parse_interrupts(INTERRUPTS)
    assert irq["TLB"] == [2722, 2088, 15]
    assert irq["CAL"] == [50089, 26977, 300]
    assert irq["24"] == [1, 0, 7]
    assert irq["ERR"] == [3] and irq["MIS"] == [0]


def test_parse_vmstat_and_meminfo() -> None:
    vm = procfs.parse_vmstat("pgfree 4017845\npgalloc_normal 12\nbogus line here\n")
    assert vm == {"pgfree": 4017845, "pgalloc_normal": 12}
    mem = procfs.parse_meminfo("MemTotal:       24683656 kB\nHugePages_Total:       0\nweird\n")
    assert mem == {"MemTotal": 24683656, "HugePages_Total": 0}


def test_parse_maps() -> None:
    t = procfs.parse_maps(MAPS, tgid=7, ts_ns=123, snapshot=4)
    df = t.to_pandas()
    assert t.schema.equals(schema.MAPS.schema, check_metadata=False)
    assert df["start"].tolist()[:2] == [0x55D0C0A00000, 0x7F0000000000]
    assert df["perms"].tolist() == ["r--p", "r--s", "rw-p", "rw-p"]
    assert df["offset"].tolist()[1] == 0x1000
    assert df["dev"].tolist()[:2] == [(0xFE << 20) | 1, (0x103 << 20) | 2]
    assert df["path"].tolist() == ["/usr/bin/my prog (deleted)", "/data/ro3g.bin", "[stack]", "[anon]"]
    assert set(df["tgid"]) == {7} and set(df["snapshot"]) == {4} and set(df["ts_ns"]) == {123}


def test_read_maps_live_and_gone(tmp_path: Path) -> None:
    f = tmp_path / "mapped.bin"
    f.write_bytes(b"\0" * 65536)
    with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as m:
        df = procfs.read_maps(os.getpid(), procfs.monotonic_ns(), 0).to_pandas()
        row = df[df["path"] == str(f)]
        assert len(row) == 1
        assert row["perms"].iloc[0] == "r--s"
        assert row["end"].iloc[0] - row["start"].iloc[0] == len(m)
        st = os.stat(f)
        assert row["ino"].iloc[0] == st.st_ino
        # maps prints major:minor; the table stores the kernel's major<<20|minor.
        assert row["dev"].iloc[0] == (os.major(st.st_dev) << 20) | os.minor(st.st_dev)
    # A pid that cannot exist (above pid_max).
    gone = procfs.read_maps(2**22 + 1, 0, 1)
    assert gone.num_rows == 0 and gone.schema.equals(schema.MAPS.schema, check_metadata=False)


def test_counter_rows_live() -> None:
    ts = procfs.monotonic_ns()
    t = procfs.counter_rows(1, ts, {"pages_allocated": 17})
    assert t.schema.equals(schema.COUNTERS.schema, check_metadata=False)
    df = t.to_pandas()
    ncpu = os.cpu_count()
    tlb = df[(df["name"] == "TLB") & (df["source_name"] == "interrupts")]
    assert sorted(tlb["cpu"]) == list(range(ncpu))
    assert len(df[(df["name"] == "CAL")]) == ncpu
    assert not df["name"].str.fullmatch(r"\d+").any()  # numbered device IRQs are left out
    rec = df[df["source_name"] == "recorder"]
    assert rec[["name", "cpu", "value"]].values.tolist()[0] == ["pages_allocated", -1, 17]
    # the interrupts read began at the row's own time, after ``ts`` and before the read ended
    (begin,) = rec[rec["name"] == procfs.READ_BEGIN_IRQ][["value", "ts_ns"]].values.tolist()
    assert len(rec) == 2 and begin[0] == begin[1] and ts <= begin[0] <= df[df["name"] == "TLB"]["ts_ns"].min()
    assert {"pgfree", "pgalloc_normal"} <= set(df[df["source_name"] == "vmstat"]["name"])
    assert "MemTotal" in set(df[df["source_name"] == "meminfo"]["name"])
    assert set(df["phase_name"].astype(str)) == {"end"}
    # each file's rows carry the time it was read (in that order); the recorder's own rows the given time
    read = df[df["name"] != procfs.READ_BEGIN_IRQ].groupby("source_name", observed=True)["ts_ns"].agg(["min", "max"])
    assert (read["min"] == read["max"]).all()
    assert ts == read.loc["recorder", "min"] < read.loc["interrupts", "min"]
    assert read.loc["interrupts", "min"] <= read.loc["vmstat", "min"] <= read.loc["meminfo", "min"]
    # with_vmstat is read right after vmstat, before meminfo
    t2 = procfs.counter_rows(0, ts, with_vmstat=lambda: {"pages_freed": 3}).to_pandas()
    beside = t2[t2["name"] == "pages_freed"]
    assert beside[["source_name", "value"]].values.tolist() == [["recorder", 3]]
    vm_ts, mem_ts = (t2.loc[t2["source_name"] == s, "ts_ns"].iloc[0] for s in ("vmstat", "meminfo"))
    assert vm_ts <= beside["ts_ns"].iloc[0] <= mem_ts


def test_symbols(tmp_path: Path) -> None:
    f = tmp_path / "kallsyms"
    f.write_text(
        "ffffffff81000000 T _stext\n"
        "ffffffff8134ae80 t flush_tlb_func\n"
        "ffffffff8134b000 T native_flush_tlb_multi\n"
        "ffffffff82000000 d flush_tlb_func\n"  # a data symbol of the same name must not win
        "ffffffffc0000000 t luf_flush\t[somemod]\n"
    )
    s = procfs.Symbols(f)
    assert s.address("flush_tlb_func") == 0xFFFFFFFF8134AE80
    assert s.resolve(0xFFFFFFFF8134AE80) == "flush_tlb_func+0x0"
    assert s.resolve(0xFFFFFFFF8134AE85) == "flush_tlb_func+0x5"
    assert s.resolve(0xFFFFFFFF8134B010) == "native_flush_tlb_multi+0x10"
    assert s.resolve(0x1000) == "0x1000"
    assert s.matching(r"(^|_)luf(_|$)") == ["luf_flush"]
    try:
        s.address("nope")
        raise AssertionError("missing symbol must raise")
    except KeyError as e:
        assert "nope" in str(e)
    hidden = tmp_path / "hidden"
    hidden.write_text("0000000000000000 T _stext\n0000000000000000 t flush_tlb_func\n")
    h = procfs.Symbols(hidden)
    assert h.hidden and h.get("flush_tlb_func") is None and h.resolve(0xFFFF) == "0xffff"


@pytest.mark.bpf  # real addresses need root (kptr_restrict)
def test_symbols_live_round_trip() -> None:
    s = procfs.Symbols()
    assert len(s) > 1000
    a = s.address("flush_tlb_func")  # kptr_restrict=0 and root on this host
    assert s.resolve(a) == "flush_tlb_func+0x0"
    assert s.resolve(a + 3) == "flush_tlb_func+0x3"


def test_clocks() -> None:
    a = procfs.clock_anchor()
    assert a["clock"] == "CLOCK_MONOTONIC"
    wall = procfs.monotonic_ns() + a["realtime_minus_monotonic_ns"]
    assert abs(wall - time.time_ns()) < 50_000_000
    assert 0 <= a["uncertainty_ns"] < 50_000_000


def test_host_facts() -> None:
    h = procfs.host_facts()
    assert h["nr_cpus"] == os.cpu_count()
    assert h["page_size"] == mmap.PAGESIZE
    assert h["uname"]["release"] == os.uname().release
    assert len(h["boot_id"]) == 36
    assert h["numa_nodes"] == list(range(len(h["numa_nodes"])))
    assert isinstance(h["hypervisor"]["guest"], bool)
    assert procfs.parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert np.iinfo(np.int64).max > h["mem_total_kb"] > 0
