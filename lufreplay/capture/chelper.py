"""The small C helpers lufreplay runs (the workloads' ``lrwork``, calibrate's ``shootcost``): built once per
source version with the host's C compiler, so a change of the source gives a new binary."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path


class HelperBuildError(RuntimeError):
    """No C compiler, or the source did not compile (the message is one line)."""


def compiled(source: Path, bin_dir: Path, stem: str, needed_by: str) -> Path:
    """``source`` compiled into ``bin_dir/STEM-TAG`` (TAG: the source's hash), once; concurrent builds race
    safely (each writes its own file and renames it into place)."""
    tag = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    out = bin_dir / f"{stem}-{tag}"
    if out.is_file() and os.access(out, os.X_OK):
        return out
    cc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if cc is None:
        raise HelperBuildError(f"{needed_by} a C compiler (gcc) to build {source.name}; install gcc")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    r = subprocess.run([cc, "-O2", "-pthread", "-o", str(tmp), str(source)], capture_output=True, text=True)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        first = (r.stderr.strip().splitlines() or ["no output"])[0]
        raise HelperBuildError(f"cannot compile {source.name}: {first}")
    os.replace(tmp, out)
    return out
