"""Shared evaluation plumbing: model loading, eval image transform, DICOM/JPEG reading, batched embedding.

The eval transform is the spec's (medst-spec.md §3.6, interfaces.md): resize so the longer side is
R = round(S*256/224) with area-like downscaling, zero-pad centred to R x R, centre crop S, normalise
(x/255 - 0.5)/0.5, one channel (the model folds its RGB patch weights, exactly equal to 3 grey channels).
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

log = logging.getLogger("medst_fast")

PathLike = Union[str, os.PathLike]


# -- device and model ------------------------------------------------------------------------------
def resolve_device(name: Optional[str] = None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(checkpoint: Optional[PathLike] = None, model_name: Optional[str] = None,
               random_init: Optional[str] = None, device=None, seed: int = 0):
    """Build the model to evaluate, in eval mode.

    Exactly one of ``checkpoint`` (a save_pretrained folder, or a checkpoint file readable by
    ``medst_fast.convert.load_checkpoint``, then ``model_name`` names its config) or ``random_init``
    (a registered model name; the random-weights baseline, seeded) must be given.
    """
    from ..factory import create_model

    if (checkpoint is None) == (random_init is None):
        raise ValueError("give exactly one of --checkpoint or --random-init")
    if random_init is not None:
        torch.manual_seed(seed)
        model = create_model(random_init)
    elif os.path.isdir(checkpoint):
        from ..hub import from_pretrained

        model = from_pretrained(checkpoint)
    else:
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"--checkpoint {checkpoint}: no such file or folder")
        if model_name is None:
            raise ValueError(f"--checkpoint {checkpoint} is a file: give --model NAME for its config "
                             "(a save_pretrained folder carries its own config)")
        model = create_model(model_name, pretrained=os.fspath(checkpoint))
    model = model.to(resolve_device(device) if not isinstance(device, torch.device) else device)
    return model.eval()


def load_tokenizer(vocab: Optional[PathLike], model):
    if vocab is None:
        raise ValueError("this task needs a tokenizer: give --vocab PATH/vocab.txt")
    from ..text.tokenizer import MedSTTokenizer

    tok = MedSTTokenizer(vocab, max_length=model.cfg.text.max_length)
    if tok.vocab_size > model.cfg.text.vocab_size:
        raise ValueError(f"{tok.vocab_path}: {tok.vocab_size} tokens but the model's text.vocab_size is "
                         f"{model.cfg.text.vocab_size}; wrong vocab for this checkpoint")
    return tok


# -- images ----------------------------------------------------------------------------------------
def resize_size(size: int) -> int:
    """R for crop S: 256 for 224 (the official resize-then-crop ratio)."""
    return int(round(size * 256 / 224))


def resize_pad(img: np.ndarray, scale: int) -> np.ndarray:
    """Longer side -> ``scale`` (area-like BOX filter), zero-pad centred to scale x scale. uint8 (H, W)."""
    from PIL import Image

    h, w = img.shape
    # The short side is truncated, not rounded, as the official resize computes it.
    if h >= w:
        nh, nw = scale, max(1, int(w * scale / h))
    else:
        nh, nw = max(1, int(h * scale / w)), scale
    out = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BOX))
    top, left = (scale - nh) // 2, (scale - nw) // 2
    canvas = np.zeros((scale, scale), dtype=np.uint8)
    canvas[top:top + nh, left:left + nw] = out
    return canvas


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape
    if h < size or w < size:
        raise ValueError(f"image {h}x{w} is smaller than the crop {size}")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img[top:top + size, left:left + size]


def eval_transform(img: np.ndarray, size: int) -> torch.Tensor:
    """uint8 grey (H, W) -> float32 (1, S, S) normalised to [-1, 1]."""
    x = center_crop(resize_pad(img, resize_size(size)), size)
    t = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32)
    return ((t / 255.0 - 0.5) / 0.5).unsqueeze(0)


def read_dicom(path: PathLike) -> np.ndarray:
    """DICOM -> uint8 grey: pixels scaled by 255/max (rounded, saturated), MONOCHROME1 inverted.

    This is the official RSNA reading (a scale to 8 bits, then bitwise-not for MONOCHROME1).
    """
    try:
        import pydicom
    except ImportError as e:  # pragma: no cover - pydicom is an optional dependency
        raise ImportError("reading DICOM needs 'pydicom': pip install pydicom") from e
    ds = pydicom.dcmread(os.fspath(path))
    x = ds.pixel_array.astype(np.float64)
    if x.ndim != 2:
        raise ValueError(f"{path}: expected a single-frame grey DICOM, pixel_array has shape {x.shape}")
    m = x.max()
    x = np.clip(np.rint(np.abs(x * (255.0 / m))), 0, 255) if m > 0 else np.zeros_like(x)
    x = x.astype(np.uint8)
    if str(getattr(ds, "PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        x = 255 - x
    return x


def read_image(path: PathLike) -> np.ndarray:
    """Any image file (JPEG/PNG/... or .dcm) -> uint8 grey (H, W). Errors name the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: image not found")
    try:
        if path.lower().endswith((".dcm", ".dicom")):
            return read_dicom(path)
        from PIL import Image

        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I", "F"):
                # 16-bit PNGs: scale to 8 bits by the maximum, as for DICOM, instead of clipping.
                a = np.asarray(im, dtype=np.float64)
                m = a.max()
                return (np.rint(a * (255.0 / m)) if m > 0 else np.zeros_like(a)).astype(np.uint8)
            return np.asarray(im.convert("L"))
    except (FileNotFoundError, ImportError):
        raise
    except Exception as e:
        raise ValueError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


class ImageListDataset(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[PathLike], size: int):
        self.paths = [os.fspath(p) for p in paths]
        self.size = size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return eval_transform(read_image(self.paths[i]), self.size)


class StudyListDataset(torch.utils.data.Dataset):
    """(frontal, lateral or None) path pairs -> (frontal, lateral, has_lateral); an absent lateral is zeros."""

    def __init__(self, pairs: Sequence[Tuple[PathLike, Optional[PathLike]]], size: int):
        self.pairs = [(os.fspath(f), None if l is None else os.fspath(l)) for f, l in pairs]
        self.size = size

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        f, l = self.pairs[i]
        xf = eval_transform(read_image(f), self.size)
        if l is None:
            return xf, torch.zeros_like(xf), False
        return xf, eval_transform(read_image(l), self.size), True


def _progress(it, desc: str, total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return it
    # disable=None: a bar on a terminal, nothing in logs and CI.
    return tqdm(it, desc=desc, total=total, disable=None, leave=False)


@torch.inference_mode()
def embed_images(model, paths: Sequence[PathLike], fn: Optional[Callable] = None, batch_size: int = 64,
                 workers: int = 0, desc: str = "images") -> torch.Tensor:
    """Run ``fn(model, frontal)`` (default: normalised global embedding) over image files in batches.

    Returns a float32 CPU tensor (N, E) in the order of ``paths``. The images are decoded in
    ``workers`` DataLoader processes while the device computes.
    """
    if fn is None:
        fn = lambda m, x: m.encode_image(x)  # noqa: E731
    if len(paths) == 0:
        raise ValueError("no images to embed")
    device = next(model.parameters()).device
    ds = ImageListDataset(paths, model.cfg.vision.img_size)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    out = []
    for x in _progress(loader, desc, len(loader)):
        out.append(fn(model, x.to(device, non_blocking=True)).float().cpu())
    return torch.cat(out)


@torch.inference_mode()
def embed_studies(model, pairs: Sequence[Tuple[PathLike, Optional[PathLike]]], batch_size: int = 64,
                  workers: int = 0, desc: str = "studies") -> torch.Tensor:
    """Normalised global embeddings of (frontal, lateral) studies; a None lateral gives the single-view
    embedding (the MoVE model masks the absent view). Needs a model with a lateral expert."""
    if not model.cfg.vision.lateral_expert:
        raise ValueError("this model has no lateral expert (vision.lateral_expert = false): embed frontals only")
    if len(pairs) == 0:
        raise ValueError("no studies to embed")
    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(StudyListDataset(pairs, model.cfg.vision.img_size), batch_size=batch_size,
                                         shuffle=False, num_workers=workers, pin_memory=device.type == "cuda")
    out = []
    for xf, xl, has in _progress(loader, desc, len(loader)):
        out.append(model.encode_image(xf.to(device), xl.to(device), has.to(device)).float().cpu())
    return torch.cat(out)


@torch.inference_mode()
def embed_texts(model, tokenizer, texts: Sequence[str], batch_size: int = 256, normalize: bool = True,
                desc: str = "texts") -> torch.Tensor:
    """Global text embeddings (N, E) as float32 on the CPU, in batches."""
    device = next(model.parameters()).device
    out = []
    starts = range(0, len(texts), batch_size)
    for s in _progress(starts, desc, len(starts)):
        enc = tokenizer(list(texts[s:s + batch_size]))
        e = model.encode_text(enc["input_ids"].to(device), enc["attention_mask"].to(device), normalize=normalize)
        out.append(e.float().cpu())
    if not out:
        raise ValueError("no texts to embed")
    return torch.cat(out)


def unique_embeddings(model, paths: Sequence[str], **kw) -> Dict[str, np.ndarray]:
    """Embed each distinct path once; returns path -> vector."""
    uniq = list(dict.fromkeys(paths))
    emb = embed_images(model, uniq, **kw).numpy()
    return {p: emb[i] for i, p in enumerate(uniq)}


def read_csv_checked(path: PathLike, required: Sequence[str], **kw):
    """pandas.read_csv with a clear error naming the file and the missing columns."""
    import pandas as pd

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found")
    try:
        df = pd.read_csv(path, **kw)
    except Exception as e:
        raise ValueError(f"{path}: cannot parse as CSV ({e})") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {list(df.columns)}")
    return df


def find_file(data: PathLike, names: Sequence[str], what: str) -> str:
    """``data`` is the file itself or a folder holding one of ``names``."""
    data = os.fspath(data)
    if os.path.isfile(data):
        return data
    for n in names:
        p = os.path.join(data, n)
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"{data}: no {what} found (looked for {list(names)})")


def stack_rows(vectors: Dict[str, np.ndarray], keys: List[str]) -> np.ndarray:
    return np.stack([vectors[k] for k in keys]) if keys else np.zeros((0, 0), dtype=np.float32)
