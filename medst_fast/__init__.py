"""medst_fast: a fast, faithful implementation of Med-ST (ICML 2024).

``import medst_fast`` needs only the core dependencies (torch, numpy, tokenizers, safetensors). Triton, DALI
and the C++ extension are optional and each falls back to the PyTorch path with one log line; every other
optional package (Pillow, pandas, matplotlib, ...) is imported where it is used, and its absence is an error
naming the pip extra that brings it.
"""
from .version import __version__
from .config import HeadCfg, LossCfg, MedSTConfig, TextCfg, VisionCfg
from .models import MedST, MedSTOutput
from .losses import LossOutput, MedSTLoss
from .kernels import get_backend, set_backend
from .factory import (add_model_config, create_model, create_model_and_transforms, get_model_config, list_models)
from .text.tokenizer import get_tokenizer
from .hub import from_pretrained, save_pretrained
from .zero_shot import build_zero_shot_classifier, zero_shot_logits

__all__ = [
    "__version__", "MedST", "MedSTConfig", "MedSTOutput", "MedSTLoss", "LossOutput", "VisionCfg", "TextCfg",
    "HeadCfg", "LossCfg", "create_model", "create_model_and_transforms", "list_models", "add_model_config",
    "get_model_config",
    "from_pretrained", "save_pretrained", "set_backend", "get_backend", "get_tokenizer",
    "build_zero_shot_classifier", "zero_shot_logits",
]

