"""Data plumbing of the trainer: series sampler, per-item seeding, datasets and loaders, vocab, synthetic cache.

Resuming must skip exactly the consumed batches and reproduce every later one, so:
- the sampler's order is a function of (seed, epoch) only and it can start at any batch;
- each item is produced under RNG states seeded from (seed, epoch, series index), so random crops do
  not depend on the worker that loads the item or on what that worker loaded before;
- the DataLoader gets its own generator, so creating an iterator never draws from the global RNG that
  drives dropout.
"""
from __future__ import annotations

import logging
import os
import random
import shutil
import signal
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

log = logging.getLogger("medst_fast")

SYNTHETIC_VERSION = 1
BAD_BATCH = "bad_batch"  # key of the stand-in batch SkipBadBatches returns: its value says what was wrong
_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # [PAD] first: id 0 = TextCfg.pad_token_id


# -- sampling ---------------------------------------------------------------------------------------------
class SeriesBatchSampler(Sampler[List[Tuple[int, int]]]):
    """DistributedSampler-like batches of whole series for one rank, resumable mid-epoch.

    Every epoch shuffles all series with a generator seeded by (seed, epoch), drops the tail so every rank
    gets the same number of full batches (DDP needs equal step counts), deals series round-robin to ranks
    and cuts this rank's share into batches. A series never straddles ranks: the temporal loss needs all
    its studies together. Yields lists of (epoch, series index) so the dataset can seed per item.
    """

    def __init__(self, n_series: int, batch_series: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True):
        if n_series < batch_series * world_size:
            raise ValueError(f"{n_series} series cannot fill one batch of {batch_series} series on each of "
                             f"{world_size} rank(s); lower --batch-series or use more data")
        self.n, self.bs, self.rank, self.world, self.seed, self.shuffle = n_series, batch_series, rank, world_size, seed, shuffle
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch

    def __len__(self) -> int:  # batches per epoch on this rank (including skipped ones)
        return self.n // (self.bs * self.world)

    def epoch_order(self, epoch: int) -> List[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        return order[: len(self) * self.bs * self.world]

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        mine = self.epoch_order(self.epoch)[self.rank::self.world]
        for b in range(self.start, len(self)):
            yield [(self.epoch, i) for i in mine[b * self.bs:(b + 1) * self.bs]]


def item_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint32)[0])


class SeededItems(Dataset):
    """Wraps a dataset so that item (epoch, i) is drawn under RNG states seeded from (seed, epoch, i).

    The python, numpy and torch global RNG states are saved and restored around the call, so loading in
    the main process (workers=0) leaves the RNG that drives dropout untouched.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key
        s = item_seed(self.seed, epoch, i)
        py, npy, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            random.seed(s)
            np.random.seed(s)
            torch.manual_seed(s)
            return self.dataset[i]
        finally:
            random.setstate(py)
            np.random.set_state(npy)
            torch.set_rng_state(th)


def _ignore_sigint(_worker_id):  # Ctrl-C reaches the whole process group; the main process handles it
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(dataset: Dataset, sampler: SeriesBatchSampler, collate: Callable, workers: int, seed: int,
                pin_memory: bool) -> DataLoader:
    g = torch.Generator().manual_seed(seed)  # never touch the global RNG when an iterator is created
    return DataLoader(SeededItems(dataset, seed), batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                      pin_memory=pin_memory, generator=g, persistent_workers=False, worker_init_fn=_ignore_sigint,
                      prefetch_factor=4 if workers > 0 else None)


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
    """Train a small lower-cased WordPiece vocab on ``texts`` (tokenizers library); returns vocab.txt."""
    try:
        from tokenizers import BertWordPieceTokenizer
    except ImportError as e:  # pragma: no cover
        raise ImportError("building a vocab needs the 'tokenizers' package: pip install tokenizers") from e
    tok = BertWordPieceTokenizer(lowercase=True)
    tok.train_from_iterator(list(texts), vocab_size=vocab_size, min_frequency=1, special_tokens=_SPECIALS,
                            show_progress=False)
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f".tmp-vocab-{os.getpid()}")
    os.makedirs(tmp, exist_ok=True)
    tok.save_model(tmp)
    path = os.path.join(out_dir, "vocab.txt")
    os.replace(os.path.join(tmp, "vocab.txt"), path)
    shutil.rmtree(tmp, ignore_errors=True)
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
    from ..hub import lock_process

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
    from ..data.index import SeriesIndex

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
    full length 4 and about half of the studies have a lateral.
    """

    def __init__(self, n_series: int, tokenizer, img_size: int, seed: int = 0, series_len: int = 4):
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


def collate_pretokenized(items: List[Dict[str, Any]], series_len: int = 4) -> Dict[str, Any]:
    """Batch of pre-tokenised series in the Batch layout of docs/interfaces.md (full series first)."""
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


# -- dataset factory -----------------------------------------------------------------------------------------
def build_dataset(kind: str, data: Optional[str], split: str, tokenizer, img_size: int, seed: int,
                  replicate_collate_bug: bool, n_random: int = 64) -> Tuple[Dataset, Callable]:
    """(dataset of series, collate) for ``--dataset-type`` kind; a manifest must already be an index folder.

    The collate turns an uncollatable batch into a BAD_BATCH stand-in (see SkipBadBatches).
    """
    if kind == "random":
        return RandomSeriesDataset(n_random, tokenizer, img_size, seed=seed), SkipBadBatches(collate_pretokenized)
    from ..data import dataset as ds_mod

    if kind not in ("index", "manifest", "synthetic"):
        raise ValueError(f"unknown dataset type {kind!r}")
    ds = ds_mod.SeriesDataset(data, split, tokenizer, img_size, train=True)
    if len(ds) == 0:
        raise ValueError(f"{data}: split {split!r} has no series")
    return ds, SkipBadBatches(ds_mod.SeriesCollate(replicate_official_bug=replicate_collate_bug))
