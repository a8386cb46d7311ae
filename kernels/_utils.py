"""Backend switch shared by every op: ``"triton"`` (fast path where possible) or ``"torch"`` (reference).

Select with ``medst_fast.set_backend(...)`` or the environment variable ``MEDST_FAST_KERNELS``
(``triton``/``1`` or ``torch``/``0``). The default is ``triton``: ops still take the reference path for
CPU tensors (unless ``TRITON_INTERPRET=1``, which runs the kernels on CPU tensors for tests) and when
Triton does not import. The first fallback logs one line saying why.
"""
from __future__ import annotations

import functools
import logging
import os

import torch

log = logging.getLogger("medst_fast")

_VALID = ("triton", "torch")


def _from_env() -> str:
    v = os.environ.get("MEDST_FAST_KERNELS", "triton").strip().lower()
    if v in ("0", "torch", "ref", "reference", "off"):
        return "torch"
    return "triton"


_backend = _from_env()


def set_backend(name: str) -> None:
    global _backend
    if name not in _VALID:
        raise ValueError(f"backend must be one of {_VALID}, got {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


@functools.lru_cache(None)
def has_triton() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install that fails at import time
        log.info("medst_fast: Triton unavailable (%s); using the PyTorch reference ops", e)
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_warned = set()


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton path should run for these tensors."""
    if _backend != "triton" or not has_triton():
        return False
    ok = all(t.is_cuda for t in tensors) or (interpreting() and all(t.device.type == "cpu" for t in tensors))
    if not ok and "device" not in _warned:
        _warned.add("device")
        log.info("medst_fast: tensors are not on a CUDA device; the fused ops use the PyTorch reference")
    return ok
