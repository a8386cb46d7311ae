"""Named model configs (JSON in model_configs/) and ``create_model``, open_clip style."""
from __future__ import annotations

import glob
import logging
import os
from typing import Dict, List, Optional, Union

import torch

from .config import MedSTConfig
from .models import MedST

log = logging.getLogger("medst_fast")

_CONFIG_DIR = os.path.join(os.path.dirname(__file__), "model_configs")
_MODEL_CONFIGS: Dict[str, str] = {}


def _rescan():
    for p in sorted(glob.glob(os.path.join(_CONFIG_DIR, "*.json"))):
        _MODEL_CONFIGS.setdefault(os.path.splitext(os.path.basename(p))[0], p)


_rescan()


def list_models() -> List[str]:
    return sorted(_MODEL_CONFIGS)


def add_model_config(path: Union[str, os.PathLike]) -> None:
    """Register a JSON model config (a file, or every *.json in a folder) under its file name."""
    path = os.fspath(path)
    files = sorted(glob.glob(os.path.join(path, "*.json"))) if os.path.isdir(path) else [path]
    for f in files:
        MedSTConfig.from_json(f)  # validate now, with the file name in the error
        _MODEL_CONFIGS[os.path.splitext(os.path.basename(f))[0]] = f


def get_model_config(name: str) -> MedSTConfig:
    if name not in _MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; known: {list_models()}")
    return MedSTConfig.from_json(_MODEL_CONFIGS[name])


def create_model(
    name: Union[str, MedSTConfig],
    pretrained: Optional[Union[str, os.PathLike]] = None,
    device: Optional[Union[str, torch.device]] = None,
    **overrides,
) -> MedST:
    """Build a MedST model.

    Args:
        name: a registered name (``list_models()``) or a ``MedSTConfig``.
        pretrained: None (random init), a ``save_pretrained`` folder, a ``.safetensors`` file of this
            model, or an official Med-ST / MGCA Lightning checkpoint (converted on load).
        overrides: config fields, e.g. ``faithful=True`` or ``vision={"depth": 2}``; None values are ignored.
    """
    cfg = name if isinstance(name, MedSTConfig) else get_model_config(name)
    cfg = cfg.replace(**overrides)
    if pretrained is not None and os.path.isdir(pretrained):
        from .hub import from_pretrained

        model = from_pretrained(pretrained, **overrides)
    else:
        model = MedST(cfg)
        if pretrained is not None:
            from .convert import load_checkpoint

            load_checkpoint(model, pretrained)
    if device is not None:
        model = model.to(device)
    return model
