"""Loaded at start-up by the child processes that run Triton's CPU interpreter (tests/_interp.py puts this
folder first on their PYTHONPATH); it applies :func:`fix_interpreter_index` when TRITON_INTERPRET=1.

Why: Triton 3.6's interpreter turns a one-element block into a Python int with ``int(ndarray)``; numpy 2.4
made that a TypeError for arrays with ndim > 0 (``only 0-dimensional arrays can be converted to Python
scalars``), so every kernel that indexes with a loaded scalar fails under the interpreter. Later Triton
squeezes first. The fix replaces only that one conversion, only when numpy >= 2.4 and the installed
interpreter still has the old code; it changes nothing on a GPU (no interpreter there).
"""
import inspect
import os


def fix_interpreter_index() -> bool:
    """Patch Triton's interpreter ``tensor.__index__`` to squeeze first; True when it was needed and applied."""
    try:
        import numpy as np
        from triton.runtime import interpreter as ti
    except Exception:  # no Triton (or a build without the interpreter): nothing to fix
        return False
    if tuple(int(x) for x in np.__version__.split(".")[:2] if x.isdigit()) < (2, 4):
        return False
    orig = getattr(ti, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_medst_index_fix", False):
        return False
    try:
        if "int(self.handle.data)" not in inspect.getsource(orig):  # a Triton that squeezes already
            return False
    except (OSError, TypeError):
        return False

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._medst_index_fix = True
    ti._patch_lang_tensor = patched
    return True


if os.environ.get("TRITON_INTERPRET") == "1":
    fix_interpreter_index()
