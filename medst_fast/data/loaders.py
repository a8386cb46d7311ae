"""The trainer's series loader, one factory for every back-end: ``build_series_loader``.

Back-ends (all give the Batch of docs/interfaces.md from the same batches of series):

* ``"dali"``: ``dali_pipeline.DaliSeriesLoader``, DALI decode ("mixed" on a GPU, its CPU pipeline
  otherwise) + the batched transform op;
* ``"nvjpeg"``: ``gpu_loader.NvjpegSeriesLoader``, torchvision ``decode_jpeg`` (nvJPEG on a GPU,
  libjpeg-turbo otherwise) + the batched transform op;
* ``"pil"``: the trainer's ``SeriesDataset`` + ``SeriesCollate`` in DataLoader worker processes;
* ``"auto"``: on a CUDA device DALI, else nvJPEG, else PIL (whichever is importable); without CUDA the
  PIL workers. One log line says which back-end runs and why (also in ``loader.backend``/``.reason``).

Every back-end takes its batches from ``medst_fast.data.sampling.SeriesBatchSampler`` (the same series, in
the same batches and order, per rank, for a given seed, epoch and start batch), skips and counts the same
unreadable images (``loader.bad``, the dataset's reason names), and draws the same random crops (the PIL
path from the RNG that ``SeededItems`` seeds per series, the batched ones from a generator seeded the same
way). A batch without one readable study is yielded as the trainer's stand-in ``{BAD_BATCH: reason,
"n_series": k}`` (``medst_fast.data.sampling.BAD_BATCH``; counted as ``empty_batch``), so every back-end
yields exactly one item per sampler batch.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Dict, Iterator, Optional, Tuple, Union

import torch

from .. import ext
from .batching import default_threads, empty_batch_stand_in
from .dali_pipeline import DaliSeriesLoader
from .dataset import SeriesDataset, collate_series
from .gpu_loader import NvjpegSeriesLoader, import_decode_jpeg
from .index import SeriesIndex
from .sampling import SeriesBatchSampler, iterate_and_stop_workers, make_loader as make_torch_loader

log = logging.getLogger("medst_fast")
BACKENDS = ("auto", "dali", "nvjpeg", "pil")


# -- back-end choice --------------------------------------------------------------------------------------------
def dali_missing() -> Optional[str]:
    """None when DALI imports, else why not."""
    try:
        import nvidia.dali  # noqa: F401
        return None
    except Exception as e:  # ImportError, or a broken install raising something else
        return f"nvidia.dali does not import ({type(e).__name__}: {e})"


def torchvision_missing() -> Optional[str]:
    try:
        import_decode_jpeg()
        return None
    except Exception as e:
        return f"torchvision.io.decode_jpeg does not import ({type(e).__name__}: {e})"


def _op_note() -> str:
    if ext.load():
        return "medst_fast._C resize op"
    return f"per-image PyTorch resize: medst_fast._C not loaded ({ext.load_error()})"


def choose_backend(backend: str, device: torch.device) -> Tuple[str, str]:
    """(back-end that runs, why). An explicitly requested back-end whose dependency is missing raises."""
    if backend not in BACKENDS:
        raise ValueError(f"loader back-end must be one of {BACKENDS}, got {backend!r}")
    cuda = device.type == "cuda"
    where = "on the GPU" if cuda else "on the CPU (no CUDA device)"
    missing = {"dali": dali_missing, "nvjpeg": torchvision_missing}
    if backend == "pil":
        return "pil", "requested: PIL decode in DataLoader worker processes"
    if backend in missing:
        why = missing[backend]()
        if why:
            raise RuntimeError(f"loader back-end {backend!r} was requested but {why}; use 'auto' or 'pil'")
        return backend, f"requested: {backend} decode {where} + {_op_note()}"
    if not cuda:
        return "pil", "auto: no CUDA device, so the PIL worker processes (--loader dali/nvjpeg decode on the CPU too)"
    skipped = []
    for name in ("dali", "nvjpeg"):
        why = missing[name]()
        if why is None:
            tail = f" ({'; '.join(skipped)})" if skipped else ""
            return name, f"auto: {name} decode on the GPU + {_op_note()}{tail}"
        skipped.append(f"{name} unavailable: {why}")
    return "pil", "auto: no GPU decoder available (" + "; ".join(skipped) + "), so the PIL worker processes"


# -- the PIL worker path -----------------------------------------------------------------------------------------
class _CountedItems(torch.utils.data.Dataset):
    """A SeriesDataset whose items carry the bad-image counts they caused (the workers' own counters are
    lost with the worker processes; this brings them to the main process with the batch)."""

    def __init__(self, dataset: SeriesDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        before = Counter(self.dataset.bad)
        item = self.dataset[i]
        return item, dict(self.dataset.bad - before)


class _CountedCollate:
    """collate_series on the items, the summed counts under "_bad"; an all-unreadable batch comes back
    without images (collate_series would raise), for the loader to count and replace by the stand-in."""

    def __init__(self, replicate_official_bug: bool, series_len: int):
        self.replicate_official_bug, self.series_len = replicate_official_bug, series_len

    def __call__(self, pairs):
        bad = Counter()
        for _, b in pairs:
            bad.update(b)
        items = [it for it, _ in pairs if it]
        if not items:
            return {"_bad": dict(bad), "n_series": len(pairs)}
        batch = collate_series(items, replicate_official_bug=self.replicate_official_bug, series_len=self.series_len)
        batch["_bad"] = dict(bad)
        return batch


class PilSeriesLoader:
    """The trainer's PIL pipeline (SeriesDataset, SeededItems, SeriesBatchSampler, DataLoader workers)."""

    backend = "pil"

    def __init__(self, index, split: str, tokenizer, img_size: int, batch_series: int, train: bool,
                 rank: int = 0, world_size: int = 1, seed: int = 0, workers: int = 0,
                 device: Union[str, torch.device, None] = None, replicate_official_bug: bool = False):
        self.dataset = SeriesDataset(index, split, tokenizer, img_size=img_size, train=train)
        self.sampler = SeriesBatchSampler(len(self.dataset), batch_series, rank, world_size, seed, shuffle=bool(train))
        pin = device is not None and torch.device(device).type == "cuda"
        self.loader = make_torch_loader(_CountedItems(self.dataset), self.sampler,
                                        _CountedCollate(replicate_official_bug, self.dataset.series_len), int(workers),
                                        seed, pin_memory=pin)
        self.bad: Counter = Counter()
        self.cpu_decoded: Counter = Counter()  # every image is CPU-decoded here; kept for a uniform interface

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(int(epoch), int(start_batch))

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Dict]:
        for batch in iterate_and_stop_workers(self.loader):
            self.bad.update(batch.pop("_bad"))
            yield batch if "frontal" in batch else empty_batch_stand_in(self.bad, batch["n_series"])


# -- the factory ----------------------------------------------------------------------------------------------------
def build_series_loader(backend: str, index_or_dir: Union[str, SeriesIndex], split: str, tokenizer, img_size: int,
                        batch_series: int, train: bool, rank: int = 0, world_size: int = 1, seed: int = 0,
                        workers: Optional[int] = None, device: Union[str, torch.device, None] = None,
                        replicate_official_bug: bool = False, filter: str = "area",
                        series_len: Optional[int] = None):
    """The series loader of one rank.

    Args:
        backend: "auto" | "dali" | "nvjpeg" | "pil" (module docstring). An explicit GPU back-end whose
            library is missing raises; "auto" falls back.
        index_or_dir: a prepared index folder or a ``SeriesIndex``. split: "train" | "valid" | "test".
        tokenizer: a ``MedSTTokenizer``, or None for batches without token fields.
        img_size: crop size S. batch_series: series per batch on this rank.
        train: random crops and a shuffled order per epoch; centre crops and index order otherwise.
        rank, world_size: this rank's share of every epoch (whole series per rank; the tail that does not
            fill a batch on every rank is dropped, as ``SeriesBatchSampler`` does).
        seed: the sampler's and the crops' seed.
        workers: PIL worker processes (0: load in this process), or the reader threads of the batched
            back-ends (file reads and CPU decodes; also DALI's CPU threads, at least 1). Default: min(8, CPUs).
        device: where the batched back-ends decode and leave the images (default: CUDA when available).
            The PIL path leaves them on the CPU (pinned when the device is CUDA).
        replicate_official_bug: the official collate's lateral misalignment (parity runs only).
        filter: "area" (the definition) or "bilinear" (DALI's in-graph resize; the op's bilinear filter).
        series_len: studies per series; None keeps the index's own (4 as prepared), another length re-cuts
            every patient's studies (``SeriesIndex.with_series_len``) and makes the series of that length the
            complete ones of the batch (``n_full_series``).
    Returns:
        an object with ``set_epoch(epoch, start_batch=0)``, ``__iter__`` (Batch dicts; ``has_lateral`` on the
        CPU; the stand-in for an unreadable batch), ``__len__`` (batches per epoch on this rank, those before
        ``start_batch`` included, as ``SeriesBatchSampler``), ``backend``, ``reason``,
        ``bad`` (Counter of skipped images/studies/batches) and ``cpu_decoded`` (images the batched decoder
        did not take, by reason).
    """
    if series_len is not None:  # every back-end then reads the re-cut index (its series_len is the batch's N)
        index_or_dir = SeriesIndex.load(index_or_dir).with_series_len(series_len)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name, reason = choose_backend(backend, dev)
    log.info("loader: %s (%s)", name, reason)
    workers = default_threads() if workers is None else int(workers)
    if name == "pil":
        if filter != "area":
            raise ValueError(f"filter={filter!r}: the PIL path implements only the definition, 'area'")
        loader = PilSeriesLoader(index_or_dir, split, tokenizer, img_size, batch_series, train, rank, world_size,
                                 seed, workers, dev, replicate_official_bug)
    else:
        cls = DaliSeriesLoader if name == "dali" else NvjpegSeriesLoader
        loader = cls(index_or_dir, split, tokenizer, img_size, batch_series, train, rank=rank, world_size=world_size,
                     seed=seed, threads=max(1, workers), device=dev,
                     replicate_official_bug=replicate_official_bug, filter=filter)
    loader.reason = reason
    return loader
