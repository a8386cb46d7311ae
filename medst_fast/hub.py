"""``save_pretrained`` / ``from_pretrained``: a self-contained model folder, written atomically and verified.

A folder holds model.safetensors, config.json (the model config, plus ``components`` for a partial export),
preprocessor_config.json (image size, resize side, normalisation) and vocab.txt when the vocabulary is known.

The weights file carries, in its safetensors metadata, a sha256 of its tensors and a sha256 of every other
file the folder holds (config.json, preprocessor_config.json, vocab.txt); ``from_pretrained`` recomputes them,
so a flipped byte anywhere is an error naming the file instead of a silently different model (one changed
LayerNorm epsilon in config.json would load without complaint and move every embedding). The digests and
the safetensors reading live in ``medst_fast.weights``; the temp folder and its cleanup in ``medst_fast.files``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from typing import Dict, Optional, Union

import torch
import torch.nn as nn

from .config import MedSTConfig
from .data.transforms import PREPROCESS, check_preprocess_config, preprocess_config
from .files import file_digest, held_temp_dir, move_into_place, read_json_object, remove_stale_temps
from .models import MedST
from .text.tokenizer import check_vocab_fits, read_vocab
from .weights import (CONFIG, FILES_KEY, FOLDER_FILES, HASH_KEY, VOCAB, WEIGHTS, _safetensors,  # noqa: F401
                      read_verified_safetensors, recorded_file_digests, safetensors_metadata, tensor_digest,
                      verify_folder_files)

log = logging.getLogger("medst_fast")


def _unwrap(model):
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def _vocab_source(model, vocab, tokenizer, components) -> Optional[str]:
    """The vocab.txt to copy into the folder: given, the tokenizer's, or the one the model was loaded with."""
    if components and "text" not in components:
        return None  # no text tower in the folder, so no tokenizer belongs with it
    src = vocab or getattr(tokenizer, "vocab_path", None) or getattr(model, "vocab_file", None)
    if src is None:
        return None
    src = os.fspath(src)
    if os.path.isdir(src):
        src = os.path.join(src, VOCAB)
    if not os.path.isfile(src):
        raise FileNotFoundError(f"{src}: vocabulary file not found")
    return src


def save_pretrained(model: MedST, path: Union[str, os.PathLike], components=None, vocab=None,
                    tokenizer=None) -> str:
    """Write a self-contained model folder: ``config.json``, ``model.safetensors``, ``preprocessor_config.json``
    and, when known, ``vocab.txt``.

    The files are written into a temporary folder beside ``path`` and moved in by rename, so an
    interrupted save never leaves a half-written model where a good one was.

    Args:
        components: optional list of top-level module names to keep (e.g. an image-encoder export); a model
            loaded from such a folder keeps its components by default.
        vocab, tokenizer: the vocabulary to store (a vocab.txt path, or a tokenizer with ``vocab_path``);
            default: the vocabulary the model was loaded with (``from_pretrained`` records it). Not written
            when ``components`` leave out the text tower.
    """
    st = _safetensors()
    model = _unwrap(model)
    components = components or getattr(model, "components", None)
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if components:
        sd = {k: v for k, v in sd.items() if k.split(".", 1)[0] in components}
    vocab_src = _vocab_source(model, vocab, tokenizer, components)
    if vocab_src is not None:
        _check_vocab(vocab_src, model.cfg, "the model")
    # A killed save leaves its temp folder behind; remove such leftovers of ours (unheld, our files only).
    for p in remove_stale_temps(parent, only_holding=FOLDER_FILES):
        log.info("removed %s, left by an interrupted save_pretrained", p)
    with held_temp_dir(parent, os.path.basename(os.path.abspath(path))) as tmp:
        cfg = model.cfg.to_dict()
        if components:
            cfg["components"] = list(components)
        files = {CONFIG: cfg, PREPROCESS: preprocess_config(model.cfg.vision.img_size)}
        for name, d in files.items():
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(d, f, indent=2, sort_keys=True)
        names = list(files)
        if vocab_src is not None:
            shutil.copyfile(vocab_src, os.path.join(tmp, VOCAB))
            names.append(VOCAB)
        # The side files are written first so the weights' metadata can record their digests.
        digests = {name: file_digest(os.path.join(tmp, name)) for name in names}
        st.save_file(sd, os.path.join(tmp, WEIGHTS), metadata={"format": "pt", HASH_KEY: tensor_digest(sd),
                                                               FILES_KEY: json.dumps(digests, sort_keys=True)})
        os.makedirs(path, exist_ok=True)
        for name in sorted(FOLDER_FILES - set(names) - {WEIGHTS}):  # e.g. the vocab.txt of an earlier full save
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(path, name))
        # The weights go in last: a folder whose weights are new has every other file new as well.
        for name in names + [WEIGHTS]:
            move_into_place(os.path.join(tmp, name), os.path.join(path, name))
    return path


class MissingTower(nn.Module):
    """Stands in for a module that a partial export (``components``) does not hold.

    Calling it raises an error naming the folder and what it holds, so an image-encoder export can never
    produce text embeddings from randomly initialised weights.
    """

    def __init__(self, name: str, folder: str, components):
        super().__init__()
        self.name, self.folder, self.components = name, folder, list(components)

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"{self.folder} holds only {self.components} (a partial export, e.g. the trainer's "
                           f"final_encoder/): its model has no '{self.name}', so this call cannot run. Load the "
                           f"full model folder (the trainer's final/) for text embeddings and grounding.")

    def extra_repr(self) -> str:
        return f"absent: {self.name!r} (not in {self.folder})"


def from_pretrained(path: Union[str, os.PathLike], device=None, **overrides) -> MedST:
    """Load a ``save_pretrained`` folder. Raises a clear error for a missing, damaged or changed file.

    Every file is checked twice: its fields (a config.json of ``{}``, a wrong field type) and its digest as
    recorded in model.safetensors when it was written (a valid but changed value, e.g. another LayerNorm
    epsilon). A folder written before the digests existed loads with one warning.

    A partial export (its config.json lists ``components``) gives a model whose absent modules are
    ``MissingTower`` stand-ins: ``encode_image`` works, ``encode_text`` raises an error saying why.
    The folder's ``vocab.txt`` (when present) is recorded as ``model.vocab_file``.
    """
    _safetensors()  # fail early with the install hint, before any file is read
    path = os.fspath(path)
    cfg_path, w_path = os.path.join(path, CONFIG), os.path.join(path, WEIGHTS)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: missing (expected a save_pretrained folder)")
    d = read_json_object(cfg_path)
    components = d.pop("components", None)
    cfg = _folder_config(d, cfg_path)
    _check_folder_preprocess(path, cfg)
    meta = safetensors_metadata(w_path)
    verify_folder_files(path, meta)
    cfg = cfg.replace(**overrides)
    model = MedST(cfg)
    if components:
        names = [n for n, _ in model.named_children()]
        bad = [c for c in components if c not in names]
        if not isinstance(components, list) or bad:
            raise ValueError(f"{cfg_path}: field 'components' must list modules of the model {names}, got "
                             f"{components!r}")
        for n in names:
            if n not in components:
                setattr(model, n, MissingTower(n, path, components))
        model.components = list(components)
    sd = read_verified_safetensors(w_path, warn_unhashed=HASH_KEY in meta or FILES_KEY in meta)
    check_state_dict_fits(model, sd, w_path, cfg_path)
    model.load_state_dict(sd, strict=False)
    vocab = os.path.join(path, VOCAB)
    if os.path.isfile(vocab):
        _check_vocab(vocab, cfg, cfg_path)
        model.vocab_file = vocab
    if device is not None:
        model = model.to(device)
    return model


def is_save_pretrained_folder(path: str) -> bool:
    """A folder written by save_pretrained (its weights carry our digests), as opposed to e.g. a Hugging Face one."""
    w = os.path.join(path, WEIGHTS)
    if not (os.path.isfile(w) and os.path.isfile(os.path.join(path, CONFIG))):
        return False
    try:
        meta = safetensors_metadata(w)
    except ValueError:
        return True  # damaged weights beside a config.json: from_pretrained names the problem
    return HASH_KEY in meta or FILES_KEY in meta


def _check_vocab(vocab: str, cfg: MedSTConfig, model_source: str) -> None:
    """The vocabulary must be one (no duplicates, the special tokens) and fit the text embedding table."""
    check_vocab_fits(len(read_vocab(vocab)), cfg.text.vocab_size, vocab, model_source)


# The sections that fix the weights' shapes. save_pretrained writes every field; a config.json without these
# (e.g. ``{}``) would otherwise build the default ViT-B model and fail on the first tensor with a wall of
# size mismatches. loss.* and faithful may be absent: they change no shape, and older versions had fewer.
_SHAPE_SECTIONS = ("vision", "text", "head")


def _folder_config(d: dict, cfg_path: str) -> MedSTConfig:
    missing = [k for k in _SHAPE_SECTIONS if k not in d]
    if missing:
        raise ValueError(f"{cfg_path}: missing field(s) {missing}; a save_pretrained config.json holds the "
                         f"model's whole config (this file is empty, truncated or not a medst_fast config)")
    try:
        return MedSTConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: {e}") from None


def _check_folder_preprocess(path: str, cfg: MedSTConfig) -> None:
    """preprocessor_config.json, when present, must be one these transforms reproduce, for this image size."""
    p = os.path.join(path, PREPROCESS)
    if not os.path.isfile(p):
        return  # written by an older version: the model config's img_size is the whole story
    size = check_preprocess_config(read_json_object(p), p)
    if size != cfg.vision.img_size:
        raise ValueError(f"{p}: field 'image_size' is {size} but {CONFIG}'s vision.img_size is "
                         f"{cfg.vision.img_size}")


def check_state_dict_fits(model: nn.Module, sd: Dict[str, torch.Tensor], w_path: str, cfg_path: str) -> None:
    """Every tensor must exist in the model with its shape; errors name the file and the first bad keys."""
    own = model.state_dict()
    shape_bad = [k for k in sorted(sd) if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    if shape_bad:
        k = shape_bad[0]
        more = f" (and {len(shape_bad) - 1} more: {shape_bad[1:4]}{' ...' if len(shape_bad) > 4 else ''})" \
            if len(shape_bad) > 1 else ""
        raise ValueError(f"{w_path}: tensor {k!r} has shape {tuple(sd[k].shape)} but {cfg_path} gives "
                         f"{tuple(own[k].shape)}{more}")
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise ValueError(f"{w_path}: state dict does not match {cfg_path}: missing {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}")


