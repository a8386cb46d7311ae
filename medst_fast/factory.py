"""Named model configs (JSON in model_configs/), ``create_model`` and ``create_model_and_transforms``, open_clip
style, plus the image preprocessing a user calls on files, PIL images or arrays.
"""
from __future__ import annotations

import glob
import importlib
import json
import logging
import os
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from .config import MedSTConfig
from .convert import load_checkpoint, read_checkpoint
from .data.transforms import PREPROCESS, ImageTransform, check_preprocess_config
from .files import read_json_object
from .hub import from_pretrained, is_save_pretrained_folder, verify_folder_files
from .models import MedST
from .text.tokenizer import _DEFAULT_MAX, VOCAB_FILE, MedSTTokenizer, check_vocab_fits
from .weights import HASH_SUFFIX

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
    name: Union[str, MedSTConfig, None],
    pretrained: Optional[Union[str, os.PathLike]] = None,
    device: Optional[Union[str, torch.device]] = None,
    **overrides,
) -> MedST:
    """Build a MedST model.

    Args:
        name: a registered name (``list_models()``) or a ``MedSTConfig``. May be None when ``pretrained``
            carries its config (a save_pretrained folder, a trainer checkpoint); a checkpoint's own config
            wins over ``name`` (a run may have changed e.g. the vocabulary size), with a log line saying so;
            a registered name whose architecture (width, depth, ...) differs is refused.
        pretrained: None (random init), a ``save_pretrained`` folder, a ``.safetensors`` file of this
            model, a trainer checkpoint (``ckpt-*.pt``), an official Med-ST / MGCA Lightning checkpoint,
            timm/DeiT ViT-B or Hugging Face BERT weights (converted on load).
        overrides: config fields, e.g. ``faithful=True`` or ``vision={"depth": 2}``; None values are ignored.
    """
    if pretrained is not None and os.path.isdir(pretrained):
        model = from_pretrained(pretrained, **overrides)
        check_name_matches(name, model.cfg, pretrained)
    else:
        sd, ckpt_cfg = read_checkpoint(pretrained) if pretrained is not None else (None, None)
        cfg = _config_for(name, ckpt_cfg, pretrained).replace(**overrides)
        model = MedST(cfg)
        if sd is not None:
            load_checkpoint(model, sd)
    if device is not None:
        model = model.to(device)
    return model


# The fields that make one model another: a run may change its vocabulary size, dropout or loss weights and
# still be "medst_tiny", but not its width or depth. open_clip users expect the name they pass to matter, so a
# name whose architecture disagrees with the weights' own config is refused rather than silently ignored.
ARCH_FIELDS = {"vision": ("img_size", "patch_size", "width", "depth", "heads", "mlp_ratio", "lateral_expert"),
               "text": ("hidden", "layers", "heads", "intermediate"),
               "head": ("embed_dim", "hidden")}


def architecture_diff(a: MedSTConfig, b: MedSTConfig) -> List[str]:
    """``section.field a_value != b_value`` for each architecture field in which the configs differ."""
    da, db = a.to_dict(), b.to_dict()
    return [f"{s}.{k} {da[s].get(k)!r} != {db[s].get(k)!r}" for s, keys in ARCH_FIELDS.items() for k in keys
            if da[s].get(k) != db[s].get(k)]


def check_name_matches(name, cfg: MedSTConfig, source) -> None:
    """Refuse a registered ``name`` whose architecture differs from the config ``source`` carries."""
    if not isinstance(name, str):
        return
    diff = architecture_diff(get_model_config(name), cfg)
    if diff:
        raise ValueError(f"{source} holds another architecture than {name!r} ({', '.join(diff[:3])}"
                         f"{', ...' if len(diff) > 3 else ''}): pass name=None to use its own config")


def _config_for(name, ckpt_cfg: Optional[dict], source) -> MedSTConfig:
    named = name if isinstance(name, MedSTConfig) else (get_model_config(name) if name is not None else None)
    if ckpt_cfg is None:
        if named is None:
            raise ValueError(f"{source}: this checkpoint carries no model config; give a model name "
                             f"(one of {list_models()})")
        return named
    try:
        cfg = MedSTConfig.from_dict(ckpt_cfg)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: field 'config': {e}") from None
    check_name_matches(name, cfg, source)
    if named is not None and named.to_dict() != cfg.to_dict():
        a, b = named.to_dict(), cfg.to_dict()
        diff = [f"{s}.{k}" for s in a if isinstance(a[s], dict) for k in a[s] if a[s][k] != b[s].get(k)]
        diff += [s for s in a if not isinstance(a[s], dict) and a[s] != b[s]]
        log.info("%s carries its own model config; using it (differs from %s in %s)", source,
                 name if isinstance(name, str) else "the given config", ", ".join(diff))
    return cfg


# -- optional dependencies ----------------------------------------------------------------------------------
# The pip extra that brings each optional import (setup.py extras_require), named in the error a user gets.
EXTRA_OF = {"PIL": "eval", "pandas": "eval", "sklearn": "eval", "pydicom": "eval", "tqdm": "train",
            "matplotlib": "plot", "tensorboard": "tensorboard", "wandb": "wandb", "pyarrow": "parquet"}
# Import names whose pip package is called otherwise.
_PACKAGE_OF = {"PIL": "pillow", "sklearn": "scikit-learn"}
# What `python -m medst_fast.pretrain` imports beyond the core (torch, numpy, tokenizers, safetensors).
TRAIN_MODULES = ("PIL", "pandas", "tqdm")


def optional_import(module: str, purpose: str, extra: Optional[str] = None):
    """Import an optional dependency, or raise an ImportError that names the pip extra bringing it.

    ``purpose`` says what needs it ("reading image files"); the extra defaults to ``EXTRA_OF``'s.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        extra = extra or EXTRA_OF.get(top, "train")
        pkg = _PACKAGE_OF.get(top, top)
        raise ImportError(f"{purpose} needs the optional package '{pkg}', which is not installed: "
                          f"pip install 'medst_fast[{extra}]' (or pip install {pkg})") from e


def check_extra(extra: str = "train", modules: Tuple[str, ...] = TRAIN_MODULES, purpose: str = "") -> None:
    """Raise one ImportError naming ``pip install 'medst_fast[extra]'`` when any of ``modules`` is missing."""
    missing = []
    for m in modules:
        try:
            importlib.import_module(m)
        except ImportError:
            missing.append(_PACKAGE_OF.get(m, m))
    if missing:
        what = purpose or f"medst_fast[{extra}]"
        raise ImportError(f"{what} needs {', '.join(missing)}, not installed: pip install 'medst_fast[{extra}]'")




def to_gray_u8(img) -> np.ndarray:
    """A path (JPEG, PNG, ..., DICOM), PIL image, numpy array or uint8 tensor -> uint8 grey (H, W).

    Decoding follows the loaders (medst_fast.data.images): 16-bit images are scaled by their maximum, colour
    is converted by PIL's luma rule, DICOM MONOCHROME1 is inverted. Float arrays are refused: their pixel
    scale (0..1, 0..255, already normalised) cannot be told apart, and a guess would be silently wrong.
    """
    if isinstance(img, (str, os.PathLike)):
        path = os.fspath(img)
        optional_import("PIL", "reading image files")
        from .data import images

        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: image not found")
        return np.asarray(images.load_gray(path), dtype=np.uint8)
    if isinstance(img, torch.Tensor):
        if img.dtype != torch.uint8:
            raise TypeError(f"an image tensor must be uint8 pixels (H, W), got {img.dtype}; a float tensor that "
                            "is already normalised goes straight to the model")
        img = img.detach().cpu().numpy()
    if isinstance(img, np.ndarray):
        if img.dtype == np.uint8 and img.ndim == 2:
            return np.ascontiguousarray(img)
        if img.ndim == 3 and img.shape[-1] == 1:
            return to_gray_u8(img[..., 0])
        ok = (img.dtype == np.uint8 and img.ndim == 3 and img.shape[-1] in (3, 4)) or \
             (img.dtype == np.uint16 and img.ndim == 2)
        if not ok:
            raise TypeError(f"unsupported image array: dtype {img.dtype}, shape {img.shape}; give uint8 (H, W), "
                            "(H, W, 3|4) or uint16 (H, W) pixels")
        Image = optional_import("PIL.Image", "converting colour or 16-bit arrays")
        img = Image.fromarray(np.ascontiguousarray(img))  # RGB(A) or I;16, which to_gray8 converts
    if type(img).__module__.startswith("PIL."):
        from .data.images import to_gray8

        return np.asarray(to_gray8(img), dtype=np.uint8)
    raise TypeError(f"unsupported image type {type(img).__name__}: give a file path, a PIL image or a numpy array")


class Preprocess:
    """The model's image transform for user inputs: path / PIL / array -> float32 (1, S, S).

    A thin front over ``medst_fast.data.transforms.ImageTransform`` (the trainer's transform): ``train``
    draws the random crop the trainer draws, otherwise the centre crop of evaluation.
    """

    def __init__(self, img_size: int, train: bool):
        self.transform = ImageTransform(img_size, train=train)
        self.img_size, self.train = self.transform.img_size, self.transform.train

    def __call__(self, img, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return self.transform(to_gray_u8(img), generator)

    def __repr__(self) -> str:
        return f"Preprocess({self.transform!r})"


def image_transforms(img_size: int) -> Tuple[Preprocess, Preprocess]:
    """(train transform, eval transform) for input size ``img_size``."""
    return Preprocess(img_size, train=True), Preprocess(img_size, train=False)


def _recorded_img_size(pretrained) -> Optional[int]:
    if pretrained is None or not os.path.isdir(pretrained):
        return None
    p = os.path.join(os.fspath(pretrained), PREPROCESS)
    if not os.path.isfile(p):
        return None  # written by an older version: the model config's img_size is the whole story
    return check_preprocess_config(read_json_object(p), p)


def create_model_and_transforms(
    name: Union[str, MedSTConfig, None] = None,
    pretrained: Optional[Union[str, os.PathLike]] = None,
    device: Optional[Union[str, torch.device]] = None,
    **overrides,
) -> Tuple[MedST, Preprocess, Preprocess]:
    """``(model, train_transform, eval_transform)``, open_clip's shape.

    Args:
        name: a registered model name or a ``MedSTConfig``; may be None when ``pretrained`` carries its
            config (a save_pretrained folder or a trainer checkpoint). A registered name whose architecture
            differs from that config is refused (ValueError saying to pass name=None).
        pretrained, device, overrides: as ``create_model``.
    Returns:
        The model (in eval mode) and two callables taking a file path (JPEG/PNG/DICOM), a PIL image or a
        numpy array and returning the float32 (1, S, S) input: the training transform (random crop) and the
        evaluation transform (centre crop of the same pipeline).
    """
    if name is None and pretrained is None:
        raise ValueError("give a model name, or pretrained= a save_pretrained folder or a trainer checkpoint")
    model = create_model(name, pretrained=pretrained, device=device, **overrides)
    size = model.cfg.vision.img_size
    recorded = _recorded_img_size(pretrained)
    if recorded is not None and recorded != size:
        raise ValueError(f"{pretrained}: {PREPROCESS} records image_size {recorded} but the model's "
                         f"vision.img_size is {size}")
    train_tf, eval_tf = image_transforms(size)
    return model.eval(), train_tf, eval_tf


# -- the tokenizer of a model folder, a trainer checkpoint or a run --------------------------------------------
# Here and not in text/tokenizer.py: finding a checkpoint's vocabulary means knowing the run-folder layout,
# model folders and checkpoints, which sit above the tokenizer.
def run_folder(checkpoint: Optional[Union[str, os.PathLike]]) -> Optional[str]:
    """The trainer's run folder a checkpoint belongs to (``RUN/final``, ``RUN/checkpoints/ckpt-*.pt``), if any."""
    if checkpoint is None:
        return None
    p = os.path.abspath(os.fspath(checkpoint))
    for cand in (os.path.dirname(p), os.path.dirname(os.path.dirname(p))):
        if os.path.isfile(os.path.join(cand, "args.json")):
            return cand
    return None


def default_vocab(checkpoint: Optional[Union[str, os.PathLike]]) -> Optional[str]:
    """The vocabulary that belongs with ``checkpoint``: vocab.txt in its folder (a saved model), beside the
    file, or the one its training run used (the run's final/vocab.txt, else args.json's ``vocab``)."""
    if checkpoint is None:
        return None
    p = os.fspath(checkpoint)
    cands = [os.path.join(p, "vocab.txt")] if os.path.isdir(p) else [os.path.join(os.path.dirname(p), "vocab.txt")]
    run = run_folder(p)
    if run:
        cands.append(os.path.join(run, "final", "vocab.txt"))
        try:
            with open(os.path.join(run, "args.json")) as f:
                v = json.load(f).get("vocab")
            if isinstance(v, str):
                cands.append(v)
        except (OSError, ValueError):
            pass
    return next((c for c in cands if os.path.isfile(c)), None)


def _folder_text_config(folder: str) -> dict:
    """The ``text`` section of a save_pretrained folder's config.json ({} when the folder has none of ours)."""
    p = os.path.join(folder, "config.json")
    if not os.path.isfile(p):
        return {}
    try:
        with open(p, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{p}: cannot read ({e})") from None
    text = d.get("text") if isinstance(d, dict) else None  # a Hugging Face config.json has no "text" section
    return text if isinstance(text, dict) else {}


def _int_field(d: dict, key: str) -> Optional[int]:
    v = d.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


# Files that hold weights, not a vocabulary: read as vocab.txt they would fail as "not UTF-8 text".
_WEIGHT_EXTS = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")


def get_tokenizer(name_or_path: Union[str, os.PathLike], max_length: Optional[int] = None) -> MedSTTokenizer:
    """The WordPiece tokenizer of a model folder, a trainer checkpoint or a vocab.txt.

    Args:
        name_or_path: a folder with vocab.txt (a model saved with its vocabulary, the trainer's ``final/``,
            a Hugging Face BERT folder); a trainer checkpoint (``RUN/checkpoints/ckpt-*.pt``: its run's
            vocabulary); or a vocab.txt file. A registered config name (``medst_tiny``) is refused with a
            line saying what to pass: no vocabulary is bundled with the package.
        max_length: tokens per text; default: the saved model's ``text.max_length``, else 112.
    """
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        return _folder_tokenizer(path, max_length)
    if not os.path.exists(path):
        _refuse_name(path)
    if path.endswith(_WEIGHT_EXTS):
        return _checkpoint_tokenizer(path, max_length)
    return MedSTTokenizer(path, max_length=_DEFAULT_MAX if max_length is None else max_length)


def _refuse_name(name: str) -> None:
    if name in list_models():
        raise ValueError(f"get_tokenizer({name!r}): {name} is a model config name and no vocabulary is bundled "
                         "with medst_fast; pass a model folder (e.g. a run's final/), a trainer checkpoint or a "
                         "vocab.txt (the paper's models use Bio_ClinicalBERT's)")
    raise FileNotFoundError(f"tokenizer vocabulary not found: {name} (give a model folder, a trainer checkpoint, "
                            "or a vocab.txt)")


def _checkpoint_tokenizer(path: str, max_length: Optional[int]) -> MedSTTokenizer:
    """A weights file's vocabulary: vocab.txt beside it, or the one its training run used."""
    vocab = default_vocab(path)
    if vocab is None:
        raise FileNotFoundError(f"{path}: a weights file, and no vocab.txt beside it or in its training run "
                                "folder; pass the vocab.txt the model was trained with")
    if max_length is None:  # the run's saved model records it; a checkpoint's own config needs unpickling
        run = run_folder(path)
        if run is not None and os.path.isfile(os.path.join(run, "final", "config.json")):
            max_length = _int_field(_folder_text_config(os.path.join(run, "final")), "max_length")
        if max_length is None and os.path.isfile(path + HASH_SUFFIX):
            max_length = _int_field((read_checkpoint(path)[1] or {}).get("text", {}), "max_length")
    return MedSTTokenizer(vocab, max_length=_DEFAULT_MAX if max_length is None else max_length)


def _folder_tokenizer(path: str, max_length: Optional[int]) -> MedSTTokenizer:
    vocab = os.path.join(path, VOCAB_FILE)
    if not os.path.isfile(vocab):
        has_model = os.path.isfile(os.path.join(path, "model.safetensors"))
        hint = (" (a model folder saved without its vocabulary, e.g. an image-encoder export: use the full "
                "model folder, or pass the vocab.txt it was trained with)") if has_model else ""
        raise FileNotFoundError(f"{path}: no {VOCAB_FILE} in this folder{hint}")
    if is_save_pretrained_folder(path):  # its vocab and config must be the exported ones (not a HF folder)
        verify_folder_files(path, names=[VOCAB_FILE, "config.json"])
    text = _folder_text_config(path)
    if max_length is None:
        max_length = _int_field(text, "max_length")
    tok = MedSTTokenizer(vocab, max_length=_DEFAULT_MAX if max_length is None else max_length)
    table = _int_field(text, "vocab_size")
    if table is not None:
        check_vocab_fits(tok.vocab_size, table, vocab, os.path.join(path, "config.json"))
    return tok
