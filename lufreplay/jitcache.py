"""Keep numba's on-disk cache honest across source edits.

numba keys a cached function on its own file's timestamp only: a core compiled with an inlined helper from
another module (``model/rmap.py``, ``model/rules.py``, ``model/kernels.py`` ...) keeps loading the old helper's
code after that file changes. ``check()`` drops every cached ``.nbi``/``.nbc`` of the jitted packages when
the sources they are built from differ from those of the last run (a hash of their contents, stamped in the
cache directory), so an edited rule always takes effect. It costs one read of ~30 small files per process.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_ROOT = Path(__file__).resolve().parent
#: packages holding @numba.njit(cache=True) functions (their caches live in their __pycache__ directories)
JIT_PACKAGES = ("model", "replay")
_STAMP = _ROOT / "__pycache__" / "numba-sources.sha1"


def sources_digest() -> str:
    """Hash of every source file the jitted code is compiled from."""
    h = hashlib.sha1()
    for pkg in JIT_PACKAGES:
        for f in sorted((_ROOT / pkg).glob("*.py")):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def check() -> None:
    """Drop stale numba cache files when the jitted sources changed since the stamp was written."""
    digest = sources_digest()
    try:
        if _STAMP.read_text() == digest:
            return
    except OSError:
        pass
    try:
        for pkg in JIT_PACKAGES:
            for f in (_ROOT / pkg / "__pycache__").glob("*.nb[ic]"):
                f.unlink(missing_ok=True)
        _STAMP.parent.mkdir(exist_ok=True)
        tmp = _STAMP.with_suffix(".tmp")
        tmp.write_text(digest)
        tmp.replace(_STAMP)
    except OSError:  # a read-only install: numba then caches elsewhere (NUMBA_CACHE_DIR), nothing to drop here
        pass
