"""Machine models of LUF and its baselines; every model consumes the same model-op stream (ops.py)."""

from __future__ import annotations

from lufreplay import jitcache

jitcache.check()  # before any cached core is loaded

# ruff: noqa: E402
from lufreplay.model.base import Model, SafetyViolation
from lufreplay.model.hold_before_free import HoldBeforeFree
from lufreplay.model.luf_v11 import LufV11
from lufreplay.model.luf_v12 import LufV12, LufV12Intended
from lufreplay.model.oracle import Oracle
from lufreplay.model.vanilla import Vanilla

MODELS: dict[str, type[Model]] = {m.name: m for m in (Vanilla, LufV12, LufV12Intended, LufV11, HoldBeforeFree, Oracle)}
#: luf-v12 follows the posted code (what a patched kernel does); luf-v12-intended the cover letter (§9.1)
DEFAULT_MODELS = ("vanilla", "luf-v12", "luf-v12-intended", "luf-v11", "hold-before-free", "oracle")

__all__ = ["DEFAULT_MODELS", "MODELS", "Model", "SafetyViolation"]
