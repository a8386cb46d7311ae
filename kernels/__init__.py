"""Fused ops of medst_fast (installed as ``medst_fast.kernels``).

One op per file: Triton kernels, launcher, autograd Function, the functional entry point and a pure
PyTorch ``*_ref`` beside it. Every entry point dispatches through :mod:`._utils` and falls back to the
reference wherever Triton or a CUDA tensor is missing.
"""
from ._utils import get_backend, has_triton, set_backend, use_triton

__all__ = ["get_backend", "has_triton", "set_backend", "use_triton"]
