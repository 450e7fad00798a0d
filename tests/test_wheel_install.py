"""`pip install .` as a wheel (not editable) records: the BPF C source ships as package data (issue #8 item 5).

Builds a wheel from a copy of the source tree (an in-tree build would write build/ and *.egg-info into the
checkout), installs it into a fresh venv that sees the system's packages (Debian's bcc, numpy, ...), and records
`sleep 1` with that venv's `lufreplay`, from a directory outside the checkout and without PYTHONPATH."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.bpf  # record needs root + BPF: runs for real in CI (as root), never skipped


def _run(args: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, args))}: {r.stderr[-3000:]}"
    return r


def test_wheel_install_records(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for f in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy2(REPO / f, src / f)
    for d in ("lufreplay", "probes"):
        shutil.copytree(REPO / d, src / d, ignore=shutil.ignore_patterns("__pycache__", "*.so", "build"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"), str(src)], tmp_path)
    (wheel,) = (tmp_path / "dist").glob("lufreplay-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], tmp_path)
    py = venv / "bin" / "python"
    _run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        tmp_path,
    )

    where = _run(
        [
            str(py),
            "-c",
            "import lufreplay, lufreplay.capture.probes as p; print(lufreplay.__file__); print(p.PROBE_SOURCE)",
        ],
        tmp_path,
    ).stdout.split()
    site = venv / "lib"
    assert Path(where[0]).is_relative_to(site), f"lufreplay imported from {where[0]}, not the venv"
    shipped = Path(where[1])
    assert shipped.is_relative_to(site) and shipped.read_bytes() == (REPO / "probes" / "lufreplay.bpf.c").read_bytes()

    out = tmp_path / "X"
    rec = _run([str(venv / "bin" / "lufreplay"), "record", "-o", str(out), "--", "sleep", "1"], tmp_path)
    assert f"into {out}" in rec.stderr
    info = _run([str(venv / "bin" / "lufreplay"), "info", str(out), "--json"], tmp_path)
    doc = json.loads(info.stdout)
    assert doc["recording"]["complete"] and doc["counts"]["_total"]["kernel_events"] > 0, doc["recording"]

    # doctor notices an install without the program source (record could not compile anything).
    check = "from lufreplay.capture import doctor; import json; print(json.dumps(doctor.probe_source_check()))"
    assert json.loads(_run([str(py), "-c", check], tmp_path).stdout)["status"] == "ok"
    shipped.unlink()
    got = json.loads(_run([str(py), "-c", check], tmp_path).stdout)
    assert got["status"] == "fail" and got["required"] and "missing" in got["detail"]
