"""medst_fast: a fast, faithful implementation of Med-ST (ICML 2024).

``import medst_fast`` needs only the core dependencies (torch, numpy, tokenizers, safetensors). Triton, DALI
and the C++ extension are optional and each falls back to the PyTorch path with one log line; every other
optional package (Pillow, pandas, matplotlib, ...) is imported where it is used, and its absence is an error
naming the pip extra that brings it.
"""
import importlib.machinery
import importlib.util
import os
import sys


def _bind_kernels() -> None:
    """Make ``medst_fast.kernels`` importable wherever the package is.

    The fused ops live in the top-level ``kernels/`` folder. It has no ``__init__.py`` on purpose: a folder
    without one is only a namespace portion, so when the repository root is on ``sys.path`` (``python -m``
    from the root) an installed regular package named ``kernels`` (Hugging Face's, which transformers
    imports) still wins over it. A wheel carries the folder as ``medst_fast/kernels/`` and the import system
    finds it there. setuptools' editable finder, and a bare ``PYTHONPATH=<repo root>``, do not resolve a
    nested folder without ``__init__.py``; there the folder beside this package is bound here, once.
    """
    name = __name__ + ".kernels"
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    if not os.path.isfile(os.path.join(folder, "_utils.py")):
        raise ImportError(f"medst_fast.kernels not found: neither installed with the package nor at {folder}; "
                          "reinstall medst_fast (pip install -e . in a source checkout)")
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [folder]
    sys.modules[name] = importlib.util.module_from_spec(spec)


_bind_kernels()

from .version import __version__  # noqa: E402  (after the kernels binding: the models import the kernels)
from .config import HeadCfg, LossCfg, MedSTConfig, TextCfg, VisionCfg
from .models import MedST, MedSTOutput
from .losses import LossOutput, MedSTLoss
from .kernels._utils import get_backend, set_backend
from .factory import (add_model_config, create_model, create_model_and_transforms, get_model_config, get_tokenizer,
                      list_models)
from .hub import from_pretrained, save_pretrained
from .zero_shot import build_zero_shot_classifier, zero_shot_logits

__all__ = [
    "__version__", "MedST", "MedSTConfig", "MedSTOutput", "MedSTLoss", "LossOutput", "VisionCfg", "TextCfg",
    "HeadCfg", "LossCfg", "create_model", "create_model_and_transforms", "list_models", "add_model_config",
    "get_model_config",
    "from_pretrained", "save_pretrained", "set_backend", "get_backend", "get_tokenizer",
    "build_zero_shot_classifier", "zero_shot_logits",
]

