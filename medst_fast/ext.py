"""Loader for the optional compiled extension ``medst_fast._C`` (csrc/).

Importing ``medst_fast._C`` registers the ``medst_fast::*`` ops with the PyTorch dispatcher. When it is not
built (no compiler, ``MEDST_FAST_NO_EXT=1`` at build time) or fails to load (ABI mismatch after a torch
upgrade), every caller falls back to its PyTorch path; this module logs that once, with the reason.
Set ``MEDST_FAST_NO_EXT=1`` at run time to ignore a built extension.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch

log = logging.getLogger("medst_fast")

_state = {"loaded": None, "error": ""}


def load() -> bool:
    """Import ``medst_fast._C`` once; True when its ops are registered."""
    if _state["loaded"] is None:
        if os.environ.get("MEDST_FAST_NO_EXT", "0") not in ("", "0"):
            _state["loaded"], _state["error"] = False, "disabled by MEDST_FAST_NO_EXT"
        else:
            try:
                from . import _C  # noqa: F401  (registers the ops)
                _state["loaded"] = hasattr(torch.ops.medst_fast, "resize_pad_crop_normalize")
                if not _state["loaded"]:
                    _state["error"] = "medst_fast._C imported but registered no ops"
            except Exception as e:  # ImportError, or an OSError from an ABI mismatch
                _state["loaded"], _state["error"] = False, f"{type(e).__name__}: {e}"
        if _state["loaded"]:
            log.info("medst_fast._C loaded (CUDA kernels: %s)", "yes" if has_cuda() else "no")
        else:
            log.info("medst_fast._C not available (%s); using PyTorch fallbacks", _state["error"])
    return bool(_state["loaded"])


def load_error() -> str:
    load()
    return _state["error"]


def op(name: str) -> Optional[object]:
    """The registered op ``torch.ops.medst_fast.<name>``, or None when the extension is not loaded."""
    if not load():
        return None
    return getattr(torch.ops.medst_fast, name, None)


def has_cuda() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    if not load():
        return False
    return bool(torch.ops.medst_fast.built_with_cuda())


def info() -> dict:
    """For ``python -m medst_fast.env``."""
    ok = load()
    return {"loaded": ok, "cuda": has_cuda() if ok else False, "error": "" if ok else _state["error"]}


def status() -> str:
    """One line for ``python -m medst_fast.env``: loaded (with or without CUDA kernels), or why not."""
    if load():
        return "built and loaded (" + ("CPU + CUDA kernels" if has_cuda() else "CPU kernels only") + ")"
    return f"not loaded ({_state['error']})"
