"""``python -m medst_fast.env``: what this installation can use (paste it into bug reports)."""
from __future__ import annotations

import importlib
import platform
import sys
from typing import Dict


def _version(mod: str) -> str:
    try:
        m = importlib.import_module(mod)
    except Exception as e:  # a broken optional install must not break the report
        return f"not available ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return getattr(m, "__version__", "installed")


def collect() -> Dict[str, str]:
    import torch

    from . import __version__
    from .kernels import get_backend, has_triton

    info = {
        "medst_fast": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch CUDA build": str(torch.version.cuda),
        "CUDA available": str(torch.cuda.is_available()),
    }
    if torch.cuda.is_available():
        info["GPU"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        info["cuDNN"] = str(torch.backends.cudnn.version())
    be = torch.backends.cuda
    info["SDPA backends enabled"] = ", ".join(
        name for name, on in [
            ("flash", be.flash_sdp_enabled()), ("mem_efficient", be.mem_efficient_sdp_enabled()),
            ("cudnn", getattr(be, "cudnn_sdp_enabled", lambda: False)()), ("math", be.math_sdp_enabled()),
        ] if on)
    try:
        from torch.nn.attention import varlen  # noqa: F401

        info["varlen_attn"] = "available"
    except ImportError:
        info["varlen_attn"] = "not in this torch (packed attention uses masked SDPA)"
    info["triton"] = _version("triton") if has_triton() else "not available (PyTorch reference ops)"
    info["kernel backend"] = get_backend()
    info["DALI"] = _version("nvidia.dali")
    try:
        from .ext import extension_status

        info["C++ extension"] = extension_status()
    except ImportError:
        info["C++ extension"] = "not built"
    for mod in ("tokenizers", "safetensors", "PIL", "sklearn", "pydicom", "torchvision"):
        info[mod] = _version(mod)
    return info


def main() -> None:
    info = collect()
    w = max(len(k) for k in info)
    for k, v in info.items():
        print(f"{k:<{w}}  {v}")


if __name__ == "__main__":
    main()
