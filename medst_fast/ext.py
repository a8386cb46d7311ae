"""Loader for the optional compiled extension ``medst_fast._C`` (csrc/).

Importing ``medst_fast._C`` registers the ``medst_fast::*`` ops with the PyTorch dispatcher. When it is not
built (no compiler, ``MEDST_FAST_NO_EXT=1`` at build time) or fails to load (ABI mismatch after a torch
upgrade), every caller falls back to its PyTorch path; this module logs that once, with the reason.
Set ``MEDST_FAST_NO_EXT=1`` at run time to ignore a built extension. An op whose CUDA kernel was not compiled
for the GPU at hand (the build's architecture list does not cover it) falls back the same way, through
``call``, with one log line per device.

The second half of the module runs at build time (setup.py and CMakeLists.txt load this file by path, without
importing the package): which CUDA architectures to compile for, chosen from what the installed nvcc and
torch accept.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
from typing import Callable, Collection, Iterable, Optional, Sequence, Set, Tuple

import torch

log = logging.getLogger("medst_fast")

_state = {"loaded": None, "error": "", "no_kernel": set()}


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


# -- run time: a GPU the build has no kernel for --------------------------------------------------------------
# What the CUDA runtime says when a kernel has no image for the device: the first for a missing
# architecture, the second from older toolkits and from cudaFuncSetAttribute on such a kernel.
NO_KERNEL_ERRORS = ("no kernel image is available", "invalid device function")


def call(op: Callable, args: Sequence, fallback: Callable[[], torch.Tensor], device: torch.device):
    """``op(*args)``, or ``fallback()`` when the extension has no kernel for ``device``'s GPU (e.g. a T4 with a
    build for sm_80+). Logged once per device; later calls on that device go straight to the fallback.
    Any other error is raised."""
    key = str(device)
    if key in _state["no_kernel"]:
        return fallback()
    try:
        return op(*args)
    except RuntimeError as e:
        if not any(m in str(e) for m in NO_KERNEL_ERRORS):
            raise
        _state["no_kernel"].add(key)
        log.warning("medst_fast._C has no CUDA kernel for %s%s (%s); using the PyTorch path there. Rebuild the "
                    "extension with TORCH_CUDA_ARCH_LIST naming this GPU to use it", device, _arch_of(device),
                    str(e).strip().splitlines()[0])
        return fallback()


def _arch_of(device: torch.device) -> str:
    try:
        major, minor = torch.cuda.get_device_capability(device)
        return f" (sm_{major}{minor})"
    except Exception:  # no CUDA here (the CPU tests) or the device is unusable: the name alone
        return ""


# -- build time: which CUDA architectures to compile for -------------------------------------------------------
# Without a visible GPU: A100, H100/H200 and B200 natively, PTX of the newest for anything newer.
DEFAULT_ARCHS = ("8.0", "9.0", "10.0")
# The first nvcc (major, minor) that compiles each architecture; nvcc 12 dropped everything below 5.0 and
# nvcc 13 everything below 7.5. Used when ``nvcc --list-gpu-arch`` does not answer.
NVCC_FIRST = {"3.5": (7, 0), "3.7": (7, 0), "5.0": (7, 0), "5.2": (7, 0), "5.3": (7, 0), "6.0": (8, 0),
              "6.1": (8, 0), "6.2": (8, 0), "7.0": (9, 0), "7.2": (9, 2), "7.5": (10, 0), "8.0": (11, 0),
              "8.6": (11, 1), "8.7": (11, 4), "8.9": (11, 8), "9.0": (11, 8), "10.0": (12, 8), "10.3": (12, 9),
              "11.0": (13, 0), "12.0": (12, 8), "12.1": (12, 9)}
# torch.utils.cpp_extension rejects architectures it does not list; the list grew with Blackwell in 2.7.
# Used when its check cannot be called (a private function that may move).
TORCH_BLACKWELL = (2, 7)


def _key(arch: str) -> Tuple[int, int]:
    major, minor = arch.split(".")
    return int(major), int(re.match(r"\d+", minor).group())


def nvcc_accepts(arch: str, nvcc_version: Optional[Tuple[int, int]], nvcc_archs: Optional[Collection[str]]) -> bool:
    """Whether nvcc compiles ``arch`` ("9.0"): its own ``--list-gpu-arch`` when known, else the version table."""
    arch = re.sub(r"[af]$", "", arch)  # "9.0a": the arch-specific variant of 9.0, compiled by the same nvcc
    if nvcc_archs is not None:
        return arch in nvcc_archs
    if nvcc_version is None or arch not in NVCC_FIRST:
        return False
    if nvcc_version >= (13, 0) and _key(arch) < (7, 5) or nvcc_version >= (12, 0) and _key(arch) < (5, 0):
        return False
    return nvcc_version >= NVCC_FIRST[arch]


def torch_accepts(arch: str, torch_archs: Optional[Collection[str]], torch_version: Tuple[int, int]) -> bool:
    """Whether torch's extension builder takes ``arch``: its own list when known, else by torch's version."""
    if torch_archs is not None:
        return arch in torch_archs
    return _key(arch) < (10, 0) or torch_version >= TORCH_BLACKWELL


def choose_cuda_archs(nvcc_version: Optional[Tuple[int, int]], nvcc_archs: Optional[Collection[str]],
                      torch_archs: Optional[Collection[str]], torch_version: Tuple[int, int],
                      visible: Sequence[Tuple[int, int]] = (), env: Optional[str] = None) -> Tuple[Optional[str], str]:
    """(TORCH_CUDA_ARCH_LIST to build with, a sentence saying why); None: no architecture can be built.

    ``env``: the user's TORCH_CUDA_ARCH_LIST, taken as it is (with a note naming what the toolchain rejects).
    Else the visible GPUs' architectures, or ``DEFAULT_ARCHS`` when none is visible, keeping those both nvcc
    and torch accept; a GPU newer than the toolchain gets the newest accepted one with PTX (the driver
    compiles PTX for newer GPUs). The newest chosen architecture always carries +PTX.
    """
    nv = ".".join(map(str, nvcc_version)) if nvcc_version else "(version unknown)"

    def refused_by(a):
        """Who rejects architecture ``a``: "" (nobody), "nvcc 12.4" or "torch 2.6"."""
        if not nvcc_accepts(a, nvcc_version, nvcc_archs):
            return f"nvcc {nv}"
        return "" if torch_accepts(a, torch_archs, torch_version) else f"torch {'.'.join(map(str, torch_version))}"

    def rejected_note(archs):
        return "; ".join(f"{refused_by(a)} rejects {a}" for a in archs)

    if env:
        plain = [a.replace("+PTX", "") for a in re.split(r"[;\s]+", env.strip()) if a]
        rejected = [a for a in plain if re.fullmatch(r"\d+\.\d+a?", a) and refused_by(a)]
        note = f" ({rejected_note(rejected)}: the build will fail)" if rejected else ""
        return env, f"from TORCH_CUDA_ARCH_LIST{note}"
    wanted = sorted({f"{M}.{m}" for M, m in visible}, key=_key) or list(DEFAULT_ARCHS)
    where = "for the visible GPUs" if visible else "no GPU visible: A100, H100/H200, B200"
    chosen = [a for a in wanted if not refused_by(a)]
    if not chosen or any(refused_by(a) and _key(a) > _key(chosen[-1]) for a in wanted):
        # a GPU newer than the toolchain (or none it takes): the newest architecture it does take, with PTX
        older = [a for a in NVCC_FIRST if not refused_by(a) and _key(a) <= _key(wanted[-1])]
        if older:
            chosen = sorted(set(chosen) | {max(older, key=_key)}, key=_key)
    skipped = [a for a in wanted if a not in chosen]
    if not chosen:
        return None, f"{where}; {rejected_note(skipped)}"
    value = ";".join(chosen[:-1] + [chosen[-1] + "+PTX"])
    return value, where + (f" ({rejected_note(skipped)})" if skipped else "")


def nvcc_version(nvcc: str) -> Optional[Tuple[int, int]]:
    """(major, minor) from ``nvcc --version``; None when it does not run."""
    out = _run([nvcc, "--version"])
    m = re.search(r"release (\d+)\.(\d+)", out or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def nvcc_arch_list(nvcc: str) -> Optional[Set[str]]:
    """The architectures ``nvcc --list-gpu-arch`` names ("9.0", "10.0", ...); None when it cannot say."""
    found = set()
    for num in re.findall(r"compute_(\d+)\b", _run([nvcc, "--list-gpu-arch"]) or ""):
        found.add(f"{num[:-1]}.{num[-1]}")
    return found or None


def torch_arch_list(candidates: Iterable[str]) -> Optional[Set[str]]:
    """Which of ``candidates`` torch's extension builder accepts (it raises ValueError for the others); None
    when that check is not there to ask."""
    from torch.utils import cpp_extension

    check = getattr(cpp_extension, "_get_cuda_arch_flags", None)
    if check is None:
        return None
    saved, accepted = os.environ.get("TORCH_CUDA_ARCH_LIST"), set()
    try:
        for arch in candidates:
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch
            try:
                check()
                accepted.add(arch)
            except ValueError:
                pass
    finally:
        if saved is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved
    return accepted


def build_arch_list(nvcc: str) -> Tuple[Optional[str], str]:
    """``choose_cuda_archs`` for this machine: its nvcc, torch and visible GPUs, and TORCH_CUDA_ARCH_LIST."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST") or None
    visible = []
    if not env and torch.cuda.is_available():
        visible = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    names = set(NVCC_FIRST) | {f"{M}.{m}" for M, m in visible}
    version = tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2])
    return choose_cuda_archs(nvcc_version(nvcc), nvcc_arch_list(nvcc), torch_arch_list(names), version, visible, env)


def cmake_architectures(arch_list: str) -> str:
    """CMAKE_CUDA_ARCHITECTURES for a TORCH_CUDA_ARCH_LIST of numbers: "8.0;9.0+PTX" -> "80-real;90"."""
    out = []
    for a in arch_list.split(";"):
        num = a.replace("+PTX", "").replace(".", "")
        out.append(num if a.endswith("+PTX") else f"{num}-real")
    return ";".join(out)


def _run(cmd) -> Optional[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
