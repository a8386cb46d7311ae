"""``save_pretrained`` / ``from_pretrained``: model.safetensors + config.json, written atomically."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Union

import torch

from .config import MedSTConfig
from .models import MedST

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:  # pragma: no cover
        raise ImportError("save_pretrained/from_pretrained need 'safetensors': pip install safetensors") from e
    return st


def save_pretrained(model: MedST, path: Union[str, os.PathLike], components=None) -> str:
    """Write ``config.json`` and ``model.safetensors`` into ``path``.

    The files are written into a temporary folder beside ``path`` and moved in by rename, so an
    interrupted save never leaves a half-written model where a good one was.
    ``components``: optional list of top-level module names to keep (e.g. an image-encoder export).
    """
    st = _safetensors()
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if components:
        sd = {k: v for k, v in sd.items() if k.split(".", 1)[0] in components}
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        st.save_file(sd, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
        cfg = model.cfg.to_dict()
        if components:
            cfg["components"] = list(components)
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
        os.makedirs(path, exist_ok=True)
        for name in (WEIGHTS, CONFIG):
            os.replace(os.path.join(tmp, name), os.path.join(path, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def from_pretrained(path: Union[str, os.PathLike], device=None, **overrides) -> MedST:
    """Load a ``save_pretrained`` folder. Raises a clear error for a missing or damaged file."""
    st = _safetensors()
    path = os.fspath(path)
    cfg_path, w_path = os.path.join(path, CONFIG), os.path.join(path, WEIGHTS)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: missing (expected a save_pretrained folder)")
    with open(cfg_path) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    components = d.pop("components", None)
    cfg = MedSTConfig.from_dict(d).replace(**overrides)
    model = MedST(cfg)
    try:
        sd = st.load_file(w_path)
    except Exception as e:
        raise ValueError(f"{w_path}: cannot read weights ({e}); the file is truncated or not safetensors") from None
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if components:
        missing = [k for k in missing if k.split(".", 1)[0] in components]
    if missing or unexpected:
        raise ValueError(f"{w_path}: state dict does not match the config: missing {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}")
    if device is not None:
        model = model.to(device)
    return model
