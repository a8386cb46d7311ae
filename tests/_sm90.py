"""Ahead-of-time compile of the project's Triton kernels for Hopper (sm_90a), without a GPU.

Used by tests/test_sm90_compile.py (a test helper, not shipped: the package never needs it at run time). The launchers themselves decide which kernels and configurations run:
:func:`record_launches` runs them on ``meta`` tensors (shapes and dtypes, no memory, no GPU) with the
module-level ``launch`` replaced by a recorder, so what gets compiled is exactly what a real launch at those
shapes would compile. :func:`specialise` derives the signature, constexprs and divisibility attributes the
way Triton's JIT does for a real launch (its own binder, for a ``GPUTarget("cuda", 90, 32)``);
:func:`compile_sm90` compiles that with ``triton.compile(ASTSource(...))`` and runs Triton's bundled ptxas
``-v --gpu-name sm_90a`` on the PTX to read registers, spills and the tensor-core instructions.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import re
import subprocess
import tempfile
from typing import NamedTuple

from medst_fast.kernels import _utils

TARGET = ("cuda", 90, 32)
SMEM_LIMIT = 232448  # 227 KB: the most dynamic shared memory one block may use on sm_90


class Launch(NamedTuple):
    module: str  # e.g. "medst_fast.kernels.move_ffn"
    kernel: str  # the kernel's function name in that module
    grid: tuple
    args: tuple
    meta: dict


@contextlib.contextmanager
def record_launches(*modules):
    """Within the block, ``launch`` in each module records instead of running; yields the list of launches."""
    recorded = []
    saved = [(m, m.launch) for m in modules]

    def recorder(fn, grid, *args, _mod=None, **meta):
        recorded.append(Launch(fn.__module__, fn.__name__, tuple(grid), args, meta))

    try:
        for m in modules:
            m.launch = recorder
        yield recorded
    finally:
        for m, orig in saved:
            m.launch = orig


def _compiled_kernel(module: str, kernel: str):
    import triton

    fn = getattr(importlib.import_module(module), kernel)
    # the compiled-mode JITFunction (never the interpreter's), helpers bound as _utils.jit_kernel binds them
    return triton.jit(_utils._rebind(fn, _utils._mode_globals(fn.__globals__, False)))


def specialise(launch: Launch):
    """(signature, constexprs, attrs, options) exactly as Triton's JIT derives them for this launch."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    jf = _compiled_kernel(launch.module, launch.kernel)
    backend = make_backend(GPUTarget(*TARGET))
    binder = create_function_from_signature(jf.signature, jf.params, backend)
    bound, spec, opts = binder(*launch.args, **launch.meta)
    options, signature, constexprs, attrs = jf._pack_args(backend, dict(launch.meta), bound, spec, opts)
    return signature, constexprs, attrs, options


def compile_key(launch: Launch):
    """Launches with equal keys compile to the same binary (the grid is not part of it)."""
    signature, constexprs, attrs, options = specialise(launch)
    return (launch.module, launch.kernel, tuple(signature.items()), tuple(sorted(constexprs.items())),
            tuple(sorted((k, str(v)) for k, v in attrs.items())), options.num_warps, options.num_stages)


def config_label(launch: Launch) -> str:
    """The launch's tuning constexprs and warps/stages, for the report table."""
    _, constexprs, _, options = specialise(launch)
    jf = _compiled_kernel(launch.module, launch.kernel)
    names = jf.arg_names
    parts = [f"{names[k[0]]}={v}" for k, v in sorted(constexprs.items())
             if len(k) == 1 and names[k[0]].isupper() and not isinstance(v, bool) and not names[k[0]] in ("INTERP",)]
    flags = [names[k[0]] for k, v in sorted(constexprs.items()) if len(k) == 1 and v is True]
    parts += flags
    parts.append(f"w{options.num_warps} s{options.num_stages}")
    return " ".join(parts)


_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_st": re.compile(r"(\d+) bytes spill stores"),
    "spill_ld": re.compile(r"(\d+) bytes spill loads"),
}


def ptxas_path() -> str:
    import triton

    return triton.knobs.nvidia.ptxas.path


def compile_sm90(module: str, kernel: str, signature: dict, constexprs: dict, attrs: dict, options: dict) -> dict:
    """Compile one specialisation for sm_90 and read ptxas -v. Runs in a worker process (picklable in/out)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jf = _compiled_kernel(module, kernel)
    k = triton.compile(ASTSource(jf, signature, constexprs, attrs), target=GPUTarget(*TARGET), options=options)
    ptx = k.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas_path(), "-v", "--regAllocOptLevel=2", "--gpu-name", "sm_90a", src, "-o",
                            os.path.join(d, "k.o")], capture_output=True, text=True, check=True)
    log = r.stderr + r.stdout
    stats = {key: int(m.group(1)) if (m := rx.search(log)) else 0 for key, rx in _PTXAS_RE.items()}
    stats.update(shared=int(k.metadata.shared), wgmma=ptx.count("wgmma.mma_async"),
                 mma_sync=len(re.findall(r"\bmma\.sync", ptx)), ptxas_log=log)
    return stats


# ------------------------------------------------------------------------------ the launches at ViT-B shapes
def _meta(*shape, dtype=None):
    import torch

    return torch.empty(*shape, device="meta", dtype=dtype if dtype is not None else torch.float32)


def move_ffn_launches(studies: int, x_dtype, compute_dtype, width: int = 768, hidden: int = 3072):
    """Forward + backward launches of the MoVE FFN over ``studies`` packed studies, half with a lateral."""
    import torch

    from medst_fast.kernels import move_ffn as mf

    n = studies * 197 + (studies // 2) * 196
    n_tiles = -(-n // mf.BLOCK_M) + mf.N_EXPERTS - 1
    i32 = torch.int32
    rows, te, seg = _meta(n_tiles * mf.BLOCK_M, dtype=i32), _meta(n_tiles, dtype=i32), _meta(3, dtype=i32)
    x = _meta(n, width, dtype=x_dtype)
    w1, w2 = _meta(2, hidden, width, dtype=compute_dtype), _meta(2, width, hidden, dtype=compute_dtype)
    with record_launches(mf) as rec:
        _, h, mean, rstd, z1, g = mf._fwd_triton(x, rows, te, _meta(2, width), _meta(2, width), w1, _meta(2, hidden),
                                                 w2, _meta(2, width), 1e-6)
        mf._bwd_triton(_meta(n, width, dtype=x_dtype), x, rows, te, seg, _meta(2, width), w1, w2, h, mean, rstd, z1,
                       g)
    return rec


def local_align_launches(batch: int, tq: int, tc: int, masks: bool, renorm: bool, compute_dtype, d: int = 128):
    """Forward + backward launches of the fused local-alignment loss."""
    import torch

    from medst_fast.kernels import local_align as la

    q, c = _meta(batch, tq, d), _meta(batch, tc, d)
    qm = _meta(batch, tq, dtype=torch.bool) if masks else None
    cm = _meta(batch, tc, dtype=torch.bool) if masks else None
    w, b = _meta(3 * d, d), _meta(3 * d)
    with record_launches(la) as rec:
        _, ctx, a, rows, vecs, dcst = la._loss_fwd_triton(q, c, qm, cm, w, b, 0.1, renorm, compute_dtype)
        la._loss_bwd_triton(_meta(()), q, c, qm, cm, w, ctx, a, rows, vecs, dcst, 0.1, renorm, compute_dtype)
    return rec


def compile_job(spec: tuple) -> dict:
    """Worker entry: spec = (module, kernel, signature, constexprs, attrs, options)."""
    stats = compile_sm90(*spec)
    stats.pop("ptxas_log")
    return stats


def job_spec(launch: Launch) -> tuple:
    signature, constexprs, attrs, options = specialise(launch)
    opts = dict(num_warps=options.num_warps, num_stages=options.num_stages)
    return (launch.module, launch.kernel, signature, constexprs, attrs, opts)
