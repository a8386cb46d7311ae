"""Backend switch shared by every op: ``"triton"`` (fast path where possible) or ``"torch"`` (reference).

Select with ``medst_fast.set_backend(...)`` or the environment variable ``MEDST_FAST_KERNELS``
(``triton``/``1`` or ``torch``/``0``). The default is ``triton``: ops still take the reference path for
CPU tensors (unless ``TRITON_INTERPRET=1``, which runs the kernels on CPU tensors for tests) and when
Triton does not import. The first fallback logs one line saying why.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import types

import torch

log = logging.getLogger("medst_fast")

# The oldest torch this package is tested with (README "Tested versions"; setup.py declares the same floor).
# torch 2.3 has no torch.library.custom_op, which every fused op is registered with.
TORCH_FLOOR = (2, 4)


def torch_version_tuple(v: str) -> tuple:
    """(major, minor) of a torch version string such as '2.4.1+cu121' or '2.6.0a0+git1234'."""
    major, minor = v.split("+")[0].split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def check_torch_floor(version: str = torch.__version__) -> None:
    """ImportError with one line naming the installed and the required torch, below TORCH_FLOOR."""
    if torch_version_tuple(version) < TORCH_FLOOR:
        need = ".".join(map(str, TORCH_FLOOR))
        raise ImportError(f"medst_fast needs torch>={need} (torch.library.custom_op); torch {version} is installed: "
                          f"pip install 'torch>={need}'")


check_torch_floor()

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


def _constant_for_compile(fn):
    # What torch.compiler.assume_constant_result does, without importing torch._dynamo (which imports Triton
    # and costs seconds) when medst_fast is imported.
    fn._dynamo_marked_constant = True
    return fn


@_constant_for_compile
def _triton_enabled() -> bool:
    # A plain constant for torch.compile: dynamo cannot trace the lru_cache/os.environ reads below, and the
    # answer does not change while a compiled graph lives (set_backend after compiling needs a recompile).
    return _backend == "triton" and has_triton()


@functools.lru_cache(None)
def interpreter_ready() -> bool:
    """True when Triton itself was imported under TRITON_INTERPRET=1.

    Triton wraps its own ``triton.language`` helpers (``tl.zeros``, ``tl.sum``, ...) at import time, so the
    interpreter only works when the variable was set before the first ``import triton`` in the process.
    """
    if not has_triton():
        return False
    import triton.language.standard as std
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(std.zeros, InterpretedFunction)


@_constant_for_compile
def _interpret_enabled() -> bool:
    if not interpreting():
        return False
    if not interpreter_ready():
        if "interp" not in _warned:
            _warned.add("interp")
            log.info("medst_fast: TRITON_INTERPRET=1 was set after Triton was imported; using the PyTorch reference")
        return False
    return True


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton path should run for these tensors."""
    if not _triton_enabled():
        return False
    ok = all(t.is_cuda for t in tensors) or (_interpret_enabled() and all(t.device.type == "cpu" for t in tensors))
    if not ok and not torch.compiler.is_compiling() and "device" not in _warned:
        _warned.add("device")
        log.info("medst_fast: tensors are not on a CUDA device; the fused ops use the PyTorch reference")
    return ok


_kernel_cache = {}
_globals_cache = {}


def triton_helper(fn):
    """Mark a plain function as a Triton device helper that kernels of its module may call.

    :func:`jit_kernel` jits it in the same mode as the calling kernel (compiled or interpreted), so that
    helpers, like kernels, cost no Triton import until the first launch.
    """
    fn._triton_helper = True
    return fn


def _mode_globals(module_globals: dict, mode: bool) -> dict:
    # One copy of a module's globals per mode, with ``tl`` bound and every helper jitted for that mode; the
    # kernels of the module are rebuilt over it, so the module itself is never rebound (a process may hold
    # compiled and interpreted kernels side by side).
    key = (module_globals["__name__"], mode)
    g = _globals_cache.get(key)
    if g is None:
        import triton
        import triton.language as tl

        g = dict(module_globals)
        g["tl"] = tl
        # the module's own helpers, and the shared ones below under their own names
        helpers = {n: v for n, v in globals().items() if getattr(v, "_triton_helper", False)}
        helpers.update((n, v) for n, v in module_globals.items() if getattr(v, "_triton_helper", False))
        for name, v in helpers.items():
            g[name] = triton.jit(_rebind(v, g))
        _globals_cache[key] = g
    return g


def _rebind(fn, g: dict):
    f = types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, fn.__closure__)
    f.__qualname__, f.__module__, f.__doc__ = fn.__qualname__, fn.__module__, fn.__doc__
    f.__kwdefaults__ = fn.__kwdefaults__
    # Triton reads the tl.constexpr annotations from here. They are strings in the op modules (postponed
    # annotations); the interpreter of Triton 3.0 (torch 2.4/2.5) only recognises the tl.constexpr object itself.
    tl_ = g.get("tl")
    f.__annotations__ = {k: (tl_.constexpr if tl_ is not None and v == "tl.constexpr" else v)
                         for k, v in fn.__annotations__.items()}
    return f


def jit_kernel(fn):
    """``triton.jit(fn)`` for the current mode (compiled, or the CPU interpreter under TRITON_INTERPRET=1).

    Kernels are plain functions in the op modules (string annotations via ``from __future__ import
    annotations``) so that importing an op never imports Triton, and so that a process can run both the
    compiled kernels on CUDA tensors and the interpreter on CPU tensors: Triton picks the mode when
    ``triton.jit`` is applied, so it is applied here, lazily, once per mode.
    """
    key = (fn, interpreting())
    k = _kernel_cache.get(key)
    if k is None:
        import triton

        k = _kernel_cache[key] = triton.jit(_rebind(fn, _mode_globals(fn.__globals__, key[1])))
    return k


tl = None  # bound per mode in the copied globals (see _mode_globals); the helpers below read it from there


@triton_helper
def round_to(x, DT: tl.constexpr, INTERP: tl.constexpr):
    """fp32 ``x`` rounded to nearest-even in dtype DT, returned as fp32 (a later store into DT is exact).

    Triton's CPU interpreter truncates on bf16 casts and stores, so there the rounding is done on the bits.
    """
    if INTERP and DT == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        return ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    else:
        return x.to(DT).to(tl.float32)


@triton_helper
def as_operand(x, CT: tl.constexpr, INTERP: tl.constexpr):
    """A matmul operand tile in the compute dtype CT. The interpreter has no bf16 matmul (numpy holds bf16 as
    raw uint16), so there it stays fp32 holding CT-rounded values: the same products, exactly, as CT x CT
    with fp32 accumulation (the caller then asks tl.dot for ieee fp32)."""
    if INTERP:
        return round_to(x.to(tl.float32), CT, INTERP)
    else:
        return x.to(CT)


COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the operand dtypes every fused op takes


def check_compute_dtype(compute_dtype: torch.dtype, where: str, none_ok: bool = True) -> torch.dtype:
    """``compute_dtype`` when it is one of COMPUTE_DTYPES, else a ValueError naming ``where`` (the op's file)."""
    if compute_dtype not in COMPUTE_DTYPES:
        allowed = f"None or one of {COMPUTE_DTYPES}" if none_ok else f"one of {COMPUTE_DTYPES}"
        raise ValueError(f"{where}: compute_dtype must be {allowed}, got {compute_dtype}")
    return compute_dtype


def tl_dtype(dt: torch.dtype):
    """The triton.language dtype of a torch floating dtype (for a compute-dtype constexpr)."""
    import triton.language as tl_

    return {torch.float32: tl_.float32, torch.bfloat16: tl_.bfloat16, torch.float16: tl_.float16}[dt]


def fp32_dot_mode() -> str:
    """How fp32 operands are multiplied: "tf32" (tensor cores, 10-bit mantissa products, fp32 accumulation)
    when torch.get_float32_matmul_precision() is 'high' or 'medium', as torch's own fp32 matmuls then do;
    "ieee" (exact fp32 FMA products, the parity path) under 'highest', torch's default. Logged once per mode."""
    mode = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    if ("fp32", mode) not in _warned:
        _warned.add(("fp32", mode))
        how = ("TF32 tensor-core products (torch.get_float32_matmul_precision() is not 'highest')" if mode == "tf32"
               else "exact fp32 products, no tensor cores (torch.set_float32_matmul_precision('high') takes TF32)")
        log.info("medst_fast: fp32 fused ops use %s", how)
    return mode


def dot_precision(compute_dtype: torch.dtype) -> str:
    """input_precision for tl.dot. fp32 compute: :func:`fp32_dot_mode` (the interpreter ignores it and
    multiplies exactly). bf16/fp16 compute: operands are already low precision and ignore it, except in the
    interpreter, where they are fp32 holding rounded values (see as_operand) whose products must stay exact."""
    if compute_dtype == torch.float32:
        return fp32_dot_mode()
    return "ieee" if interpreting() else "tf32"


def fp32_kind(compute_dtype: torch.dtype) -> str:
    """The tile family of a launch: "mma" (bf16/fp16), "tf32" (fp32 on the tensor cores) or "fp32" (exact)."""
    if compute_dtype != torch.float32:
        return "mma"
    return "tf32" if fp32_dot_mode() == "tf32" else "fp32"


def launch_device(args) -> torch.device:
    """The device of a launch: that of its first tensor argument (all of a launch's tensors share it)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    raise ValueError("kernels/_utils.py: a kernel launch without a tensor argument")


def device_guard(device: torch.device):
    """``torch.cuda.device(device)`` for a CUDA device, else nothing: Triton launches on the *current* CUDA
    device, so a model on cuda:1 in a process whose current device is cuda:0 would hand device-1 pointers to a
    device-0 launch. Entering the guard when the device is already current costs a device-index query."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch(fn, grid, *args, **meta):
    """Launch kernel ``fn`` (a plain function, see :func:`jit_kernel`) on ``grid``, on its tensors' device.

    Every launcher goes through here, so tests can count launches and the sm_90 compile test can record
    exactly which specialisations the launchers ask for without a GPU.
    """
    with device_guard(launch_device(args)):
        jit_kernel(fn)[grid](*args, **meta)


_autotuners = {}


def autotuner(fn, configs: tuple, key: tuple, tag):
    """``triton.autotune(configs, key)`` over the compiled kernel ``fn``, one per (fn, configs, key, tag).

    configs: ((constexpr items...), num_warps, num_stages) tuples. ``tag`` separates autotuners whose keys
    would collide, e.g. the token-count bucket: the kernel has no bucket argument, so each bucket gets its
    own autotuner (and its own cache of timings) instead. Compiled mode only: the interpreter has nothing to
    time, and callers never autotune CPU tensors.
    """
    ck = (fn, configs, key, tag)
    at = _autotuners.get(ck)
    if at is None:
        import triton

        if interpreting():
            raise RuntimeError("kernels/_utils.py: autotuning under TRITON_INTERPRET=1 (nothing to time)")
        tconfigs = [triton.Config(dict(meta), num_warps=w, num_stages=s) for meta, w, s in configs]
        at = _autotuners[ck] = triton.autotune(configs=tconfigs, key=list(key))(jit_kernel(fn))
    return at


def autotune_launch(fn, grid, configs: tuple, key: tuple, tag, *args, **meta):
    """Launch ``fn`` through :func:`autotuner`; ``grid`` is a function of the chosen constexprs. The first
    launch per key benchmarks every config (the kernels' outputs must not feed their inputs: they run
    several times)."""
    with device_guard(launch_device(args)):
        autotuner(fn, configs, key, tag)[grid](*args, **meta)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
