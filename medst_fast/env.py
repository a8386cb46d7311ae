"""``python -m medst_fast.env``: what this installation can use, and what will run here (paste it into bug reports).

The first lines are versions and devices. The "runs here" lines say which implementation each fast path
takes on this machine with the current switches (``MEDST_FAST_KERNELS``, ``TRITON_INTERPRET``,
``MEDST_FAST_NO_EXT``), with the reason when it is a fallback, using the same tests the code paths use.
"""
from __future__ import annotations

import importlib
import platform
import sys
from typing import Dict, Optional


def _version(mod: str) -> str:
    try:
        m = importlib.import_module(mod)
    except Exception as e:  # a broken optional install must not break the report
        return f"not available ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return getattr(m, "__version__", "installed")


def _importable(mod: str) -> Optional[str]:
    """None when ``mod`` imports, else the reason it does not."""
    try:
        importlib.import_module(mod)
        return None
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def triton_ops_path(cuda: bool) -> str:
    """Where the fused ops (MoVE FFN, local alignment) run: the checks ``kernels.use_triton`` makes."""
    from .kernels._utils import get_backend, has_triton
    from .kernels._utils import interpreter_ready, interpreting

    if get_backend() != "triton":
        return "PyTorch reference (backend 'torch': MEDST_FAST_KERNELS=0 or set_backend('torch'))"
    if not has_triton():
        return "PyTorch reference (Triton not installed)"
    if cuda:
        return "Triton (CUDA)" + ("; CPU tensors: Triton interpreter" if interpreting() and interpreter_ready() else "")
    if interpreting() and interpreter_ready():
        return "Triton interpreter on CPU tensors (TRITON_INTERPRET=1; slow, for tests)"
    return "PyTorch reference (no CUDA)"


def packed_attention_path(cuda: bool) -> str:
    """The attention of packed two-view sequences (default semantics on CUDA; the CPU pads instead)."""
    if not cuda:
        return "not used: no CUDA (two-view batches run padded with a key mask)"
    if _importable("torch.nn.attention.varlen") is None:
        return "varlen_attn (CUDA; default mode, faithful mode pads)"
    return "masked SDPA (this torch has no torch.nn.attention.varlen; default mode, faithful mode pads)"


def resize_op_path(cuda: bool) -> str:
    """The batched resize/pad/crop/normalise op of the GPU loaders (``ops_image``)."""
    from . import ext

    if not ext.load():
        return f"PyTorch per-image path (medst_fast._C not loaded: {ext.load_error()})"
    if cuda:
        return "medst_fast._C CUDA kernel" if ext.has_cuda() else \
            "PyTorch path on the GPU (medst_fast._C built without CUDA); medst_fast._C on CPU tensors"
    return "medst_fast._C (CPU)"


def loader_path(cuda: bool) -> str:
    """What ``--loader auto`` (``data.loaders.build_series_loader``) picks here, from the loaders' own choice."""
    import torch

    try:
        from .data.loaders import choose_backend
    except ImportError as e:  # e.g. PIL missing: the report must still print
        return f"unknown: medst_fast.data.loaders does not import ({type(e).__name__}: {e})"
    name, why = choose_backend("auto", torch.device("cuda" if cuda else "cpu"))
    return f"{name} ({why})"


def collect() -> Dict[str, str]:
    import torch

    from . import __version__, ext
    from .kernels._utils import get_backend, has_triton

    cuda = torch.cuda.is_available()
    info = {
        "medst_fast": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch CUDA build": str(torch.version.cuda),
        "CUDA available": str(cuda),
    }
    if cuda:
        info["GPU"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        info["cuDNN"] = str(torch.backends.cudnn.version())
    be = torch.backends.cuda
    info["SDPA backends enabled"] = ", ".join(
        name for name, on in [
            ("flash", be.flash_sdp_enabled()), ("mem_efficient", be.mem_efficient_sdp_enabled()),
            ("cudnn", getattr(be, "cudnn_sdp_enabled", lambda: False)()), ("math", be.math_sdp_enabled()),
        ] if on) + ("" if cuda else " (switches only: no CUDA, SDPA runs its CPU kernels)")
    info["triton"] = _version("triton") if has_triton() else "not available"
    info["kernel backend"] = f"{get_backend()} (switch: MEDST_FAST_KERNELS / set_backend)"
    info["DALI"] = _version("nvidia.dali")
    info["C++ extension"] = ext.status()
    for mod in ("tokenizers", "safetensors", "PIL", "sklearn", "pydicom", "torchvision"):
        info[mod] = _version(mod)
    # what will actually run on this machine
    info["fused MoVE FFN"] = triton_ops_path(cuda)
    info["local alignment loss"] = triton_ops_path(cuda)
    info["packed attention"] = packed_attention_path(cuda)
    info["batched resize op"] = resize_op_path(cuda)
    info["input pipeline (auto)"] = loader_path(cuda)
    return info


def main() -> None:
    info = collect()
    w = max(len(k) for k in info)
    for k, v in info.items():
        print(f"{k:<{w}}  {v}")


if __name__ == "__main__":
    main()
