"""Shared evaluation plumbing: model loading, eval image transform, DICOM/JPEG reading, batched embedding.

The eval transform is the training transform with the centre crop (``medst_fast.data.transforms``,
the official transform): longer side to R = round(S*256/224) by exact area averaging, zero-pad centred to R x R,
centre crop S, normalise (x/255 - 0.5)/0.5, one channel (the model folds its RGB patch weights, exactly
equal to 3 grey channels).
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..data import transforms as _T
from ..data.transforms import resize_side
from ..factory import create_model, default_vocab, run_folder  # noqa: F401  (run_folder: eval's callers use it)
from ..hub import from_pretrained
from ..text.tokenizer import MedSTTokenizer, check_vocab_fits

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
    ``medst_fast.convert.load_checkpoint``) or ``random_init`` (a registered model name; the random-weights
    baseline, seeded) must be given. A file that carries its config (a trainer ``ckpt-*.pt``) is rebuilt with
    it, vocabulary size included; any other file needs ``model_name`` for its config.
    """
    if (checkpoint is None) == (random_init is None):
        raise ValueError("give exactly one of --checkpoint or --random-init")
    if random_init is not None:
        torch.manual_seed(seed)
        model = create_model(random_init)
    elif os.path.isdir(checkpoint):
        model = from_pretrained(checkpoint)
    else:
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"--checkpoint {checkpoint}: no such file or folder")
        try:
            model = create_model(model_name, pretrained=os.fspath(checkpoint))
        except ValueError as e:
            if "another architecture than" in str(e):  # the API's advice (name=None) as the flag it is here
                raise ValueError(f"--model {model_name}: {str(e).split(': pass name=None')[0]}; drop --model "
                                 "(the checkpoint carries its own config)") from None
            if "carries no model config" not in str(e):
                raise
            raise ValueError(f"--checkpoint {checkpoint} is a file without a model config: give --model NAME "
                             "for its config (a save_pretrained folder or a trainer checkpoint carries its own)"
                             ) from None
    model = model.to(resolve_device(device) if not isinstance(device, torch.device) else device)
    return model.eval()


def random_baseline(model, seed: int = 0):
    """A model of ``model``'s config with random weights (seeded), on its device, in eval mode: what its
    scores would be if training had taught it nothing, from the same architecture and vocabulary."""
    torch.manual_seed(seed)
    base = create_model(model.cfg)
    return base.to(next(model.parameters()).device).eval()


def default_out(checkpoint: Optional[PathLike]) -> str:
    """Where evaluation writes by default: ``RUN/eval`` for a checkpoint of a training run, ``eval`` beside
    any other checkpoint (``DIR/eval-NAME``), and ``eval_results`` in the current folder for a random init."""
    if checkpoint is None:
        return "eval_results"
    run = run_folder(checkpoint)
    if run is not None:
        return os.path.join(run, "eval")
    p = os.path.abspath(os.fspath(checkpoint)).rstrip(os.sep)
    return os.path.join(os.path.dirname(p), f"eval-{os.path.basename(p)}")


def load_tokenizer(vocab: Optional[PathLike], model, checkpoint: Optional[PathLike] = None):
    """The tokenizer for a text task: ``vocab``, else the checkpoint's own (``default_vocab``)."""
    if vocab is None:
        vocab = default_vocab(checkpoint)
        if vocab is None:
            where = f" ({checkpoint} holds no vocab.txt)" if checkpoint is not None else ""
            raise ValueError(f"this task needs a tokenizer: give --vocab PATH/vocab.txt{where}")
        log.info("tokenizer: %s", vocab)
    tok = MedSTTokenizer(vocab, max_length=model.cfg.text.max_length)
    check_vocab_fits(tok.vocab_size, model.cfg.text.vocab_size, tok.vocab_path,
                     f"the model{f' of {checkpoint}' if checkpoint is not None else ''}")
    return tok


# -- images ----------------------------------------------------------------------------------------
# The evaluation transform is the training pipeline with the centre crop (medst_fast.data.transforms), and
# images are decoded by the loaders' decoders (medst_fast.data.images), so an image reaches the model with
# the same pixels in training and in evaluation.
resize_size = resize_side  # R for crop S (the historical name in this module)
resize_pad = _T.resize_pad


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """Centre ``size`` x ``size`` crop of a 2-D array, at torchvision CenterCrop's origin."""
    h, w = img.shape
    if h < size or w < size:
        raise ValueError(f"image {h}x{w} is smaller than the crop {size}")
    top, left = _T.center_offset(h, size), _T.center_offset(w, size)
    return img[top:top + size, left:left + size]


def eval_transform(img: np.ndarray, size: int) -> torch.Tensor:
    """uint8 grey (H, W) -> float32 (1, S, S) normalised to [-1, 1]."""
    return _T.eval_transform(img, size)


def _decoded(path: str, decode) -> np.ndarray:
    """``decode(path)`` as a uint8 (H, W) array; a missing file raises FileNotFoundError, a bad one
    ValueError, each naming the file."""
    from ..data.images import ImageReadError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: image not found")
    try:
        a = np.asarray(decode(path))
    except (ImageReadError, OSError, ValueError) as e:
        raise ValueError(str(e) if path in str(e) else f"{path}: cannot read image ({e})") from None
    if a.ndim != 2 or a.dtype != np.uint8:
        raise ValueError(f"{path}: expected a single-frame grey image, decoded {a.dtype} {a.shape}")
    return a


def read_image(path: PathLike) -> np.ndarray:
    """Any image file (JPEG, PNG 8/16-bit, RGBA, ..., DICOM by ``data.images.is_dicom``) -> uint8 grey (H, W),
    decoded by the project's one reader (``data.images.load_gray``). Errors name the file."""
    from ..data.images import load_gray

    return _decoded(os.fspath(path), load_gray)


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


# -- the embedding engine -------------------------------------------------------------------------
# One loop turns inputs into embeddings for the evaluation tasks and for ``python -m medst_fast.embed``: batched,
# under inference mode, on the model's device, autocast by ``precision``, a progress bar, and an unreadable
# image counted as a skip with its reason rather than the end of the run.
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # autocast dtype (None: plain fp32)

# What reading one input raises for a bad file (read_image's contract): FileNotFoundError when missing, a
# ValueError naming the file when truncated or undecodable. Anything else (a bug, a missing optional package)
# propagates rather than turning every input into a skip.
_READ_ERRORS = (OSError, ValueError)

Skipped = List[Tuple[int, str]]  # (input index, reason naming the file)


class _Skipping(torch.utils.data.Dataset):
    """``ds[i]`` as (i, item, "") or, for an unreadable file, (i, None, reason): one corrupt image is a counted
    skip, as in training, not the end of an evaluation."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        try:
            return i, self.ds[i], ""
        except _READ_ERRORS as e:  # the message names the file (read_image's contract)
            return i, None, str(e).replace("\n", " ")


def _collate_kept(items):
    kept = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, why) for i, x, why in items if x is None]
    batch = torch.utils.data.default_collate([x for _, x in kept]) if kept else None
    return [i for i, _ in kept], batch, bad


def _progress(it, desc: str, total: int, show: bool = True):
    if not show:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # no bar without tqdm (an optional package), same results
        return it
    # disable=None: a bar on a terminal, nothing in logs and CI.
    return tqdm(it, desc=desc, total=total, disable=None, leave=False)


def autocast(device: torch.device, precision: str):
    """The engine's autocast rule: ``precision`` "fp32" runs as is, "bf16" / "fp16" under torch.autocast on
    ``device`` (the outputs are returned as float32 either way)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")


def _cat(rows: List[torch.Tensor]) -> torch.Tensor:
    return torch.cat(rows) if rows else torch.zeros((0, 0), dtype=torch.float32)


@torch.inference_mode()
def embed_dataset(model, ds, step: Callable, batch_size: int = 64, workers: int = 0, desc: str = "images",
                  precision: str = "fp32", progress: bool = True) -> Tuple[List[int], torch.Tensor, Skipped]:
    """The engine for files: batches of ``ds`` (decoded in ``workers`` DataLoader processes while the device
    computes) through ``step(batch, device) -> (n, E)``, skipping unreadable items.

    Returns (kept input indices, float32 CPU (len(kept), E), [(index, reason)] skipped); with nothing readable
    the array is (0, 0) and the caller decides whether that is an error.
    """
    _check_batch_size(batch_size)
    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(_Skipping(ds), batch_size=batch_size, shuffle=False, num_workers=workers,
                                         collate_fn=_collate_kept, pin_memory=device.type == "cuda")
    kept, out, skipped = [], [], []
    for idx, batch, bad in _progress(loader, desc, len(loader), progress):
        skipped += bad
        if batch is not None:
            with autocast(device, precision):
                out.append(step(batch, device).float().cpu())
            kept += idx
    return kept, _cat(out), skipped


def _some_read(kept: List[int], skipped: Skipped, n: int, desc: str) -> None:
    """The evaluation tasks need at least one input: an error naming the first reason otherwise."""
    if not kept:
        raise ValueError(f"{desc}: none of the {n} inputs could be read (first: "
                         f"{skipped[0][1] if skipped else '-'})")


def image_step(model, fn: Optional[Callable] = None) -> Callable:
    """``step`` for ``embed_dataset`` over ``ImageListDataset``: ``fn(model, frontal)``, by default the
    normalised global embedding."""
    if fn is None:
        fn = lambda m, x: m.encode_image(x)  # noqa: E731
    return lambda x, dev: fn(model, x.to(dev, non_blocking=True))


def embed_images_kept(model, paths: Sequence[PathLike], fn: Optional[Callable] = None, batch_size: int = 64,
                      workers: int = 0, desc: str = "images") -> Tuple[List[int], torch.Tensor, Skipped]:
    """``fn(model, frontal)`` (default: the normalised global embedding) over image files, skipping unreadable
    ones: returns (kept indices into ``paths``, float32 CPU (len(kept), E), [(index, reason)] skipped)."""
    if len(paths) == 0:
        raise ValueError("no images to embed")
    kept, emb, skipped = embed_dataset(model, ImageListDataset(paths, model.cfg.vision.img_size),
                                       image_step(model, fn), batch_size, workers, desc)
    _some_read(kept, skipped, len(paths), desc)
    return kept, emb, skipped


def embed_images(model, paths: Sequence[PathLike], fn: Optional[Callable] = None, batch_size: int = 64,
                 workers: int = 0, desc: str = "images") -> torch.Tensor:
    """Run ``fn(model, frontal)`` (default: normalised global embedding) over image files in batches.

    Returns a float32 CPU tensor (N, E) in the order of ``paths``; every image must be readable (the
    evaluation tasks use ``embed_images_kept``, which skips and counts). The images are decoded in
    ``workers`` DataLoader processes while the device computes.
    """
    kept, emb, skipped = embed_images_kept(model, paths, fn, batch_size, workers, desc)
    if skipped:
        raise ValueError(f"{len(skipped)} of {len(paths)} images unreadable; first: {skipped[0][1]}")
    return emb


def embed_studies_kept(model, pairs: Sequence[Tuple[PathLike, Optional[PathLike]]], batch_size: int = 64,
                       workers: int = 0, desc: str = "studies") -> Tuple[List[int], torch.Tensor, Skipped]:
    """Normalised global embeddings of (frontal, lateral) studies; a None lateral gives the single-view
    embedding (the MoVE model masks the absent view). A study with an unreadable image is skipped. Returns
    (kept indices into ``pairs``, float32 CPU (len(kept), E), [(index, reason)]). Needs a lateral expert."""
    if not model.cfg.vision.lateral_expert:
        raise ValueError("this model has no lateral expert (vision.lateral_expert = false): embed frontals only")
    if len(pairs) == 0:
        raise ValueError("no studies to embed")

    def step(batch, device):
        xf, xl, has = batch
        return model.encode_image(xf.to(device), xl.to(device), has.to(device))

    kept, emb, skipped = embed_dataset(model, StudyListDataset(pairs, model.cfg.vision.img_size), step, batch_size,
                                       workers, desc)
    _some_read(kept, skipped, len(pairs), desc)
    return kept, emb, skipped


def embed_studies(model, pairs: Sequence[Tuple[PathLike, Optional[PathLike]]], batch_size: int = 64,
                  workers: int = 0, desc: str = "studies") -> torch.Tensor:
    """``embed_studies_kept`` for inputs that must all be readable: (N, E) in the order of ``pairs``."""
    kept, emb, skipped = embed_studies_kept(model, pairs, batch_size, workers, desc)
    if skipped:
        raise ValueError(f"{len(skipped)} of {len(pairs)} studies unreadable; first: {skipped[0][1]}")
    return emb


@torch.inference_mode()
def embed_texts(model, tokenizer, texts: Sequence[str], batch_size: int = 256, normalize: bool = True,
                desc: str = "texts", precision: str = "fp32", progress: bool = True) -> torch.Tensor:
    """The engine for texts: global text embeddings (N, E) as float32 on the CPU, in batches, under the same
    autocast rule and progress bar as ``embed_dataset``. Every text is embedded (no skips: the caller drops
    the texts it does not want)."""
    _check_batch_size(batch_size)
    if len(texts) == 0:
        raise ValueError("no texts to embed")
    device = next(model.parameters()).device
    out = []
    starts = range(0, len(texts), batch_size)
    for s in _progress(starts, desc, len(starts), progress):
        enc = tokenizer(list(texts[s:s + batch_size]))
        with autocast(device, precision):
            e = model.encode_text(enc["input_ids"].to(device), enc["attention_mask"].to(device), normalize=normalize)
        out.append(e.float().cpu())
    return torch.cat(out)


def unique_embeddings(model, paths: Sequence[str], **kw) -> Tuple[Dict[str, np.ndarray], List[Tuple[str, str]]]:
    """Embed each distinct path once, skipping unreadable files; returns (path -> vector, [(path, reason)])."""
    uniq = list(dict.fromkeys(paths))
    kept, emb, skipped = embed_images_kept(model, uniq, **kw)
    emb = emb.numpy()
    return {uniq[i]: emb[j] for j, i in enumerate(kept)}, [(uniq[i], why) for i, why in skipped]


def report_skipped(res, skipped: Sequence[Tuple[str, str]], task: str, what: str = "images") -> None:
    """Record unreadable inputs in a task's result (``meta["skipped_images"]``, shown in its report) and log
    the first few reasons, so a score over fewer inputs never reads as a score over all of them."""
    if not skipped:
        return
    res.meta[f"skipped_{what}"] = len(skipped)
    log.warning("%s: skipped %d unreadable %s (left out of the scores); first: %s", task, len(skipped), what,
                "; ".join(why for _, why in list(skipped)[:3]))


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
