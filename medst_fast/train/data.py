"""Data plumbing of the trainer: its loaders, vocab, synthetic cache, the in-memory random set.

The sampler and per-item seeding that make resume exact live in ``medst_fast.data.sampling`` (shared by
every loader back-end) and are re-exported here. ``build_train_loader`` gives the trainer one loader
interface for every ``--dataset-type``: ``medst_fast.data.loaders.build_series_loader`` for prepared
indexes (``--loader`` picks the back-end), a DataLoader over ``RandomSeriesDataset`` for ``random``.
"""
from __future__ import annotations

import csv
import functools
import logging
import os
import random
import shutil
from collections import Counter
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from ..data.index import DEFAULT_SERIES_LEN as SERIES_LEN, SeriesIndex
from ..data.sampling import (BAD_BATCH, SeededItems, SeriesBatchSampler, item_seed, iterate_and_stop_workers,  # noqa: F401 (re-exports)
                             make_loader)
from ..files import atomic_write, lock_process
from ..text.tokenizer import read_vocab
from .args import UsageError
from ..data.index import INDEX_FILES

log = logging.getLogger("medst_fast")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".dcm", ".tif", ".tiff", ".bmp")
# Reports shorter than this many tokens are no reports: [CLS], at least one word, [SEP].
MIN_TEXT_TOKENS = 3

SYNTHETIC_VERSION = 3  # 2: findings drawn on the side the report names (data/synth.py); 3: deterministic vocab
_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # [PAD] first: id 0 = TextCfg.pad_token_id


class SkipBadBatches:
    """Picklable collate wrapper: a batch that cannot be collated becomes ``{BAD_BATCH: reason, "n_series": k}``.

    Raising in a loader worker would end the run (and every resume, at the same step); the trainer skips
    and counts such a batch instead. Only the data's own "nothing usable" error is caught; a bug still raises.
    """

    def __init__(self, collate: Callable):
        self.collate = collate

    def __call__(self, items):
        from ..data.dataset import EmptyBatchError

        try:
            return self.collate(items)
        except EmptyBatchError as e:
            return {BAD_BATCH: str(e), "n_series": len(items)}


# -- vocab ---------------------------------------------------------------------------------------------------
def build_wordpiece_vocab(texts: Sequence[str], out_dir: str, vocab_size: int = 2000) -> str:
    """A small lower-cased WordPiece vocab.txt for ``texts``; returns its path.

    The specials, every character of the texts alone and as a ``##`` continuation (so any word spelled with
    those characters tokenises, never to [UNK]), then whole words by frequency, ties by spelling, up to ``vocab_size``. Deterministic: the
    tokenizers library's WordPiece trainer breaks ties between equally frequent merges differently from
    process to process (four trainings on the same reports gave four vocabularies), which made every fresh
    synthetic cache a different run of the same seed.
    """
    try:
        from tokenizers.normalizers import BertNormalizer
        from tokenizers.pre_tokenizers import BertPreTokenizer
    except ImportError as e:  # pragma: no cover
        raise ImportError("building a vocab needs the 'tokenizers' package: pip install tokenizers") from e
    norm, pre = BertNormalizer(lowercase=True), BertPreTokenizer()  # what MedSTTokenizer applies before WordPiece
    counts: Counter = Counter()
    for text in texts:
        counts.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text)))
    chars = sorted({c for w in counts for c in w})
    vocab = _SPECIALS + chars + ["##" + c for c in chars]
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1]
    vocab += words[: max(0, vocab_size - len(vocab))]
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "vocab.txt")
    atomic_write(path, "".join(t + "\n" for t in vocab))
    return path


# -- built-in synthetic set ---------------------------------------------------------------------------------
def synthetic_root(cache_dir: str, patients: int, seed: int) -> str:
    return os.path.join(cache_dir, f"synthetic-v{SYNTHETIC_VERSION}-p{patients}-s{seed}")


def ensure_synthetic(cache_dir: str, patients: int, seed: int = 0, workers: int = 0) -> Tuple[str, str]:
    """Generate (or reuse) a small synthetic MIMIC-CXR tree, prepare its index and train a vocab on it.

    Returns (index folder, vocab.txt). A ``COMPLETE`` marker written last tells a finished cache from one
    a killed run left half-built (which is rebuilt). The build runs under an flock on ``.<root name>.lock``, so
    two trainers sharing a cache build it once: the second waits, then finds it complete. (Within one
    torchrun job rank 0 builds and the other ranks wait at a barrier.)
    """
    root = synthetic_root(cache_dir, patients, seed)
    index_dir, vocab_dir, marker = os.path.join(root, "index"), root, os.path.join(root, "COMPLETE")
    if os.path.isfile(marker):  # written last, never removed: a complete cache needs no lock
        return index_dir, os.path.join(vocab_dir, "vocab.txt")
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    fd = os.open(os.path.join(parent, f".{os.path.basename(root)}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        # a POSIX lock: prepare's worker processes must not keep it if this process is killed
        if not lock_process(fd, block=False):
            log.info("another process is building the synthetic cache %s; waiting for it", root)
            lock_process(fd)
        if not os.path.isfile(marker):
            _build_synthetic(root, patients, seed, workers)
    finally:
        os.close(fd)  # releases the lock
    return index_dir, os.path.join(vocab_dir, "vocab.txt")


def _build_synthetic(root: str, patients: int, seed: int, workers: int) -> None:
    from ..data import synth, prepare  # the data package's public API (docs/interfaces.md)
    index_dir, vocab_dir, marker = os.path.join(root, "index"), root, os.path.join(root, "COMPLETE")
    if os.path.isdir(root):
        log.info("synthetic cache %s is incomplete (an interrupted build); rebuilding", root)
        shutil.rmtree(root)
    os.makedirs(root)
    log.info("generating a synthetic MIMIC-CXR set (%d patients) in %s", patients, root)
    raw = os.path.join(root, "raw")
    # The tree has MIMIC-CXR-JPG's layout with the reports as a files/ .txt tree beside the images.
    synth.generate(raw, patients=patients, seed=seed, extras=False, zip_reports=False)
    prepare.prepare_mimic(raw, raw, index_dir, cache_size=256, workers=workers, mode="study", progress=False)
    idx = SeriesIndex.load(index_dir)
    texts = [s.text for s in idx.studies if s.split == "train"]
    build_wordpiece_vocab(texts, vocab_dir)
    with open(marker, "w") as f:
        f.write("ok\n")


# -- the trainer's inputs, checked before it claims a run folder ------------------------------------------------
def check_inputs(a, cfg):
    """Raise UsageError (one line naming the flag, file or field) for an input the run could not use; returns the
    loaded index for ``--data <index folder>`` (None otherwise), so it is read once."""
    vocab = a.vocab or os.environ.get("MEDST_FAST_VOCAB") or None
    if vocab is not None and not os.path.isfile(vocab):
        src = "--vocab" if a.vocab else "$MEDST_FAST_VOCAB"
        raise UsageError(f"{src} {vocab}: no such file (a WordPiece vocab.txt, e.g. Bio_ClinicalBERT's)")
    if vocab is not None:
        try:
            read_vocab(vocab)  # not UTF-8 text, no special tokens, duplicates: one line naming the file
        except ValueError as e:
            raise UsageError(f"{'--vocab' if a.vocab else '$MEDST_FAST_VOCAB'}: {e}") from None
    if vocab is None and a.dataset_type in ("index", "manifest"):
        raise UsageError("--vocab is required with --data (e.g. Bio_ClinicalBERT's vocab.txt), or set MEDST_FAST_VOCAB")
    for flag, path in (("--init", a.init), ("--text-init", a.text_init)):
        if path and not os.path.exists(path):
            raise UsageError(f"{flag} {path}: no such file or folder")
    if cfg.text.max_length < MIN_TEXT_TOKENS:
        raise UsageError(f"--model-override text.max_length={cfg.text.max_length}: a report needs at least "
                         f"{MIN_TEXT_TOKENS} tokens ([CLS], one word, [SEP]); the default is 112")
    if a.dataset_type == "manifest" and not os.path.isfile(a.data):
        raise UsageError(f"--data {a.data}: no such file (a manifest CSV)")
    return load_train_index(a.data) if a.dataset_type == "index" else None


def _holds_images(folder: str, limit: int = 10000) -> bool:
    """Whether an image file lies in ``folder`` or below (stops after ``limit`` names)."""
    seen = 0
    for _, _, files in os.walk(folder):
        for name in files:
            if name.lower().endswith(IMAGE_SUFFIXES):
                return True
            seen += 1
        if seen >= limit:
            break
    return False


def load_train_index(data: str):
    """The prepared index ``--data`` names, with errors that say what to do: a folder of raw images needs
    ``prepare``; ``image_root`` is required (without it relative image paths would resolve against whatever the
    current folder is, and every image would be missing)."""
    if not os.path.isdir(data):
        raise UsageError(f"--data {data}: no such folder")
    missing = [n for n in INDEX_FILES if not os.path.isfile(os.path.join(data, n))]
    if missing:
        what = "holds images, not a prepared index" if _holds_images(data) else "is not a prepared index folder"
        raise UsageError(
            f"--data {data} {what} ({', '.join(missing)} missing). Prepare it first: python -m medst_fast.data.prepare "
            f"manifest --csv <CSV of patient, time, view, image path, report> --out <index folder> (or prepare mimic "
            f"--jpg-root ... --reports ... --out ... for MIMIC-CXR-JPG), then train with --data <index folder>")
    try:
        index = SeriesIndex.load(data)
    except (OSError, ValueError, csv.Error) as e:  # ValueError includes a UnicodeDecodeError
        raise UsageError(f"--data {data}: {e}") from None
    if not index.meta.get("image_root"):
        raise UsageError(f"{os.path.join(data, 'meta.json')}: field 'image_root' is missing or empty: the index must "
                         f"say where its images are (prepare writes it; add \"image_root\": \"<image folder>\")")
    return index


# -- in-memory random series (no I/O): throughput checks and tests ---------------------------------------------
_WORDS = ("no acute cardiopulmonary process heart size normal lungs clear pleural effusion pneumothorax "
          "mild moderate severe left right lower lobe opacity atelectasis consolidation edema stable "
          "unchanged interval improvement worsening cardiomegaly mediastinal contours bibasilar small "
          "trace pulmonary vascular congestion tube line catheter tip projects over").split()


def random_report(rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 60)))


class RandomSeriesDataset(Dataset):
    """Series of random images and random reports, a deterministic function of (seed, index).

    Items are pre-tokenised series (see :func:`collate_pretokenized`); about 60 % of the series have the
    full length ``series_len`` (the rest 1..series_len-1 studies) and about half of the studies have a lateral.
    """

    def __init__(self, n_series: int, tokenizer, img_size: int, seed: int = 0, series_len: int = SERIES_LEN):
        if series_len < 2:  # the shorter series draw 1..series_len-1 studies
            raise ValueError(f"RandomSeriesDataset: series_len must be >= 2, got {series_len}")
        self.n, self.tok, self.S, self.seed, self.T = n_series, tokenizer, img_size, seed, series_len

    def __len__(self) -> int:
        return self.n

    def texts(self) -> List[str]:
        return [random_report(random.Random(self.seed * 7919 + i)) for i in range(self.n * self.T)]

    def __getitem__(self, i: int) -> Dict[str, Any]:
        rng = random.Random(self.seed * 1_000_003 + i)
        T = self.T if rng.random() < 0.6 else rng.randint(1, self.T - 1)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        frontal = torch.rand(T, 1, self.S, self.S, generator=g) * 2 - 1
        has_lat = torch.tensor([rng.random() < 0.5 for _ in range(T)], dtype=torch.bool)
        lateral = (torch.rand(T, 1, self.S, self.S, generator=g) * 2 - 1) * has_lat[:, None, None, None]
        # Light training-time randomness through the global RNG, as a real augmentation would draw it.
        frontal = frontal + 0.01 * torch.randn(frontal.shape)
        texts = [random_report(random.Random(self.seed * 7919 + i * self.T + t)) for t in range(T)]
        enc = self.tok(texts)
        return {"frontal": frontal, "lateral": lateral, "has_lateral": has_lat, **enc,
                "study_id": [f"r{i}-{t}" for t in range(T)]}


def collate_pretokenized(items: List[Dict[str, Any]], series_len: int = SERIES_LEN) -> Dict[str, Any]:
    """Batch of pre-tokenised series in the Batch layout of docs/interfaces.md (series of exactly
    ``series_len`` studies first: the temporal loss takes those)."""
    full = [it for it in items if it["frontal"].shape[0] == series_len]
    rest = [it for it in items if it["frontal"].shape[0] != series_len]
    order = full + rest
    out: Dict[str, Any] = {}
    for k in ("frontal", "lateral", "has_lateral", "input_ids", "attention_mask", "word_slots"):
        out[k] = torch.cat([it[k] for it in order])
    out["series_index"] = torch.cat([torch.full((it["frontal"].shape[0],), j, dtype=torch.long) for j, it in enumerate(order)])
    out["step"] = torch.cat([torch.arange(it["frontal"].shape[0]) for it in order])
    out["n_full_series"] = len(full)
    out["study_id"] = [s for it in order for s in it["study_id"]]
    return out


# -- the trainer's loaders -------------------------------------------------------------------------------------
class RandomSeriesLoader:
    """``--dataset-type random`` behind the interface of ``build_series_loader``'s loaders: ``set_epoch``,
    ``__iter__``, ``__len__``, ``backend``, ``reason``, ``bad``, ``cpu_decoded`` (nothing is ever unreadable)."""

    backend = "random"
    reason = "--dataset-type random: in-memory random series, no image files (--loader does not apply)"

    def __init__(self, n_series: int, tokenizer, img_size: int, batch_series: int, rank: int, world_size: int,
                 seed: int, workers: int, pin_memory: bool, series_len: int = SERIES_LEN):
        self.dataset = RandomSeriesDataset(n_series, tokenizer, img_size, seed=seed, series_len=series_len)
        self.sampler = SeriesBatchSampler(len(self.dataset), batch_series, rank, world_size, seed)
        collate = functools.partial(collate_pretokenized, series_len=series_len)  # picklable for the workers
        self.loader = make_loader(self.dataset, self.sampler, SkipBadBatches(collate), workers, seed, pin_memory)
        self.bad: Counter = Counter()
        self.cpu_decoded: Counter = Counter()

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        return iterate_and_stop_workers(self.loader)


def split_size(data: str, split: str, series_len: Optional[int] = None) -> int:
    """Series in ``split`` of the index folder ``data`` (0 when the split is empty or absent), cut into series of
    ``series_len`` (None: as prepared)."""
    index = SeriesIndex.load(data)
    if series_len is not None:
        index = index.with_series_len(series_len)
    return len(index.series.get(split) or [])


def build_train_loader(kind: str, data: Optional[str], split: str, tokenizer, img_size: int, batch_series: int,
                       rank: int, world_size: int, seed: int, workers: int, device: torch.device,
                       backend: str = "auto", replicate_collate_bug: bool = False, n_random: int = 64,
                       train: bool = True, series_len: int = SERIES_LEN) -> Tuple[Any, int]:
    """(loader, series in the split) for ``--dataset-type`` kind; a manifest must already be an index folder.

    Prepared indexes go through ``build_series_loader(backend, ...)``: every back-end yields the same
    batches (the same series, order and crops) from ``SeriesBatchSampler``, and a batch it cannot deliver
    as the ``BAD_BATCH`` stand-in, which the trainer skips and counts. ``train=False``: centre crops, index
    order (validation). ``series_len`` (--series-len): the index is re-cut into series of that length
    (``SeriesIndex.with_series_len``), and the random set draws series of up to that length.
    """
    if kind == "random":
        loader = RandomSeriesLoader(n_random, tokenizer, img_size, batch_series, rank, world_size, seed, workers,
                                    pin_memory=device.type == "cuda", series_len=series_len)
        return loader, len(loader.dataset)
    if kind not in ("index", "manifest", "synthetic"):
        raise ValueError(f"unknown dataset type {kind!r}")
    from ..data.loaders import build_series_loader

    index = SeriesIndex.load(data).with_series_len(series_len)
    n = len(index.series.get(split) or [])
    if n == 0:
        raise ValueError(f"{data}: split {split!r} has no series")
    loader = build_series_loader(backend, index, split, tokenizer, img_size, batch_series, train, rank=rank,
                                 world_size=world_size, seed=seed, workers=workers, device=device,
                                 replicate_official_bug=replicate_collate_bug)
    return loader, n
