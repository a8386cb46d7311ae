"""Batched series loaders: DALI, torchvision nvJPEG + the extension op, or the PIL DataLoader.

``make_loader(index, split, tokenizer, img_size, batch_series, train, backend="auto")`` returns an iterable
of Batch dicts (docs/interfaces.md) with the same row layout as ``dataset.collate_series``: complete
4-study series first, each series' studies consecutive in time order, then the studies of shorter series;
laterals zero (mid-grey) where absent. Backends, in the order "auto" tries them:

* ``"dali"``: ``dali_pipeline.DaliSeriesLoader`` (decode "mixed" on the GPU, or "cpu" without one).
* ``"nvjpeg"``: ``torchvision.io.decode_jpeg`` on a list of files in one call (nvJPEG batched on CUDA,
  libjpeg-turbo on CPU) and the ``medst_fast::resize_pad_crop_normalize`` op: one kernel for the batch.
* ``"pil"``: ``SeriesDataset`` + ``collate_series`` in DataLoader worker processes.

A backend whose dependency is missing degrades to the next with one log line. Every backend skips corrupt
images and counts them (``loader.bad``): an unreadable frontal drops its study (the series gets shorter),
an unreadable lateral becomes an absent view, as ``SeriesDataset`` does. The two batched backends shard
whole series per rank (``shard_id``/``num_shards``, default: the torch.distributed rank/world size), draw
crop offsets on the CPU from a generator seeded by (seed, epoch, shard), and read files in a background
thread so file I/O overlaps decoding.
"""
from __future__ import annotations

import logging
import os
import queue
import struct
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..ops_image import crop_offsets, resize_geometry, resize_target
from .index import SPLITS, SeriesIndex

log = logging.getLogger("medst_fast")
SERIES_LEN = 4
BACKENDS = ("auto", "dali", "nvjpeg", "pil")


# -- JPEG pre-validation ------------------------------------------------------------------------------------
class CorruptImage(ValueError):
    """A file that is not a complete baseline/progressive JPEG. The message names the file."""


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_size(data: bytes, path: str = "<bytes>") -> Tuple[int, int]:
    """(height, width) from the SOF segment; raises CorruptImage when the file cannot be a whole JPEG.

    Checks the SOI marker, walks the segments up to the frame header, and requires the EOI marker near the
    end (a truncated download or an interrupted write loses it). GPU decoders may abort a whole batch on such
    a file, so they are caught here, before decoding.
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        raise CorruptImage(f"{path}: not a JPEG (no SOI marker)")
    if data.rfind(b"\xff\xd9", max(0, n - 64)) < 0:
        raise CorruptImage(f"{path}: truncated JPEG (no EOI marker at the end)")
    i = 2
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise CorruptImage(f"{path}: corrupt JPEG segment at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        if marker in _SOF:
            if i + 9 > n:
                break
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            if h == 0 or w == 0:
                raise CorruptImage(f"{path}: JPEG frame header has an empty size ({w}x{h})")
            return h, w
        if marker == 0xDA or length < 2:
            break
        i += 2 + length
    raise CorruptImage(f"{path}: JPEG has no frame header")


# -- planning: which series go in which batch, per rank ---------------------------------------------------------
def dist_shard() -> Tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def plan_epoch(n_series: int, batch_series: int, train: bool, epoch: int, seed: int, shard_id: int,
               num_shards: int, drop_last: bool) -> List[List[int]]:
    """Series ids per batch for this rank. Training shuffles with one permutation shared by all ranks and
    trims to a multiple of num_shards so every rank runs the same number of steps (DDP)."""
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id {shard_id} not in [0, {num_shards})")
    order = np.arange(n_series)
    if train:
        order = np.random.default_rng([seed, epoch]).permutation(n_series)
        order = order[: (n_series // num_shards) * num_shards]
    mine = order[shard_id::num_shards].tolist()
    batches = [mine[i:i + batch_series] for i in range(0, len(mine), batch_series)]
    if drop_last and batches and len(batches[-1]) < batch_series:
        batches.pop()
    return batches


@dataclass
class PlannedBatch:
    """One batch after reading and validating the files, before decoding."""

    rows: List[int]                  # study rows in Batch order
    series_index: List[int]
    step: List[int]
    n_full_series: int
    frontal: List[bytes]             # encoded, one per row
    lateral: List[Optional[bytes]]   # None where absent or unreadable
    frontal_hw: List[Tuple[int, int]]
    lateral_hw: List[Optional[Tuple[int, int]]]
    frontal_off: torch.Tensor        # (B, 2) crop origins
    lateral_off: torch.Tensor        # (B, 2), also drawn for absent laterals so offsets do not shift


class SeriesBatchReader:
    """Reads and validates a planned batch of series (shared by the DALI and nvJPEG loaders)."""

    def __init__(self, index: SeriesIndex, split: str, img_size: int, train: bool, bad: Counter):
        self.index, self.split, self.train, self.bad = index, split, train, bad
        self.img_size, self.resize_to = int(img_size), resize_target(img_size)

    def _read(self, rel: str) -> Optional[Tuple[bytes, Tuple[int, int]]]:
        path = self.index.path(rel)
        try:
            with open(path, "rb") as f:
                data = f.read()
            return data, jpeg_size(data, path)
        except FileNotFoundError:
            self.bad["missing_image"] += 1
            log.warning("skipping image (%d bad so far): %s: image file not found", sum(self.bad.values()), path)
        except (CorruptImage, OSError) as e:
            self.bad["unreadable_image"] += 1
            log.warning("skipping image (%d bad so far): %s", sum(self.bad.values()), e)
        return None

    def read(self, series_ids: Sequence[int], gen: torch.Generator) -> Optional[PlannedBatch]:
        items = []
        for si in series_ids:
            studies = []
            for r in self.index.series[self.split][si]:
                s = self.index.studies[r]
                fr = self._read(s.frontal_path)
                if fr is None:
                    self.bad["dropped_study"] += 1
                    continue
                la = self._read(s.lateral_path) if s.lateral_path else None
                studies.append((r, fr, la))
            if studies:
                items.append(studies)
        if not items:
            return None
        ordered = [it for it in items if len(it) == SERIES_LEN] + [it for it in items if len(it) != SERIES_LEN]
        flat = [st for it in ordered for st in it]
        B, R, S = len(flat), self.resize_to, self.img_size
        return PlannedBatch(
            rows=[r for r, _, _ in flat],
            series_index=[i for i, it in enumerate(ordered) for _ in it],
            step=[k for it in ordered for k in range(len(it))],
            n_full_series=sum(len(it) == SERIES_LEN for it in items),
            frontal=[fr[0] for _, fr, _ in flat],
            lateral=[la[0] if la else None for _, _, la in flat],
            frontal_hw=[fr[1] for _, fr, _ in flat],
            lateral_hw=[la[1] if la else None for _, _, la in flat],
            frontal_off=crop_offsets(B, R, S, self.train, gen),
            lateral_off=crop_offsets(B, R, S, self.train, gen),
        )


def assemble_batch(index: SeriesIndex, plan: PlannedBatch, frontal: torch.Tensor, lateral_present: torch.Tensor,
                   tokenizer) -> Dict:
    """Batch dict from the transformed images: ``lateral_present`` holds the present laterals in row order."""
    B = len(plan.rows)
    has_lat = torch.tensor([x is not None for x in plan.lateral], dtype=torch.bool)
    lateral = torch.zeros_like(frontal)
    if len(lateral_present):
        lateral[has_lat.to(frontal.device)] = lateral_present
    studies = [index.studies[r] for r in plan.rows]
    batch = {
        "frontal": frontal,
        "lateral": lateral,
        "has_lateral": has_lat.to(frontal.device),
        "n_full_series": plan.n_full_series,
        "series_index": torch.tensor(plan.series_index, dtype=torch.long),
        "step": torch.tensor(plan.step, dtype=torch.long),
        "study_id": [s.study_id for s in studies],
        "text": [s.text for s in studies],
    }
    if tokenizer is not None:
        batch.update(tokenizer([s.text for s in studies]))
    assert batch["frontal"].shape[0] == B
    return batch


class _BatchedSeriesLoader:
    """Epoch iteration, sharding and a background reader thread; subclasses decode + transform."""

    name = "batched"

    def __init__(self, index, split: str, tokenizer, img_size: int, batch_series: int, train: bool,
                 shard_id: Optional[int] = None, num_shards: Optional[int] = None, seed: int = 0,
                 drop_last: Optional[bool] = None, filter: str = "area", prefetch: int = 2):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.index = SeriesIndex.load(index)
        self.split, self.tokenizer, self.train = split, tokenizer, bool(train)
        self.img_size, self.resize_to = int(img_size), resize_target(img_size)
        self.batch_series, self.seed, self.filter, self.prefetch = int(batch_series), int(seed), filter, prefetch
        rank, world = dist_shard()
        self.shard_id = rank if shard_id is None else int(shard_id)
        self.num_shards = world if num_shards is None else int(num_shards)
        self.drop_last = self.train if drop_last is None else bool(drop_last)
        self.epoch = 0
        self.bad: Counter = Counter()
        self.reader = SeriesBatchReader(self.index, split, img_size, self.train, self.bad)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _plans(self) -> List[List[int]]:
        return plan_epoch(len(self.index.series[self.split]), self.batch_series, self.train, self.epoch, self.seed,
                          self.shard_id, self.num_shards, self.drop_last)

    def __len__(self) -> int:
        return len(self._plans())

    def _generator(self) -> torch.Generator:
        # distinct, reproducible streams per (seed, epoch, rank)
        return torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch * 10_007 + self.shard_id) & 0x7FFFFFFFFFFF)

    def __iter__(self) -> Iterator[Dict]:
        plans, gen = self._plans(), self._generator()
        q: "queue.Queue" = queue.Queue(maxsize=max(1, self.prefetch))
        stop = threading.Event()

        def produce():
            try:
                for ids in plans:
                    if stop.is_set():
                        return
                    q.put(self.reader.read(ids, gen))
                q.put(StopIteration)
            except BaseException as e:  # surface reader errors in the consumer
                q.put(e)

        t = threading.Thread(target=produce, name=f"medst-{self.name}-reader", daemon=True)
        t.start()
        try:
            while True:
                plan = q.get()
                if plan is StopIteration:
                    break
                if isinstance(plan, BaseException):
                    raise plan
                if plan is None:  # every series of this batch was unreadable
                    continue
                batch = self._transform(plan)
                if batch is not None:
                    yield batch
        finally:
            stop.set()
            while t.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    t.join(0.05)
        self.epoch += 1

    def _transform(self, plan: PlannedBatch) -> Optional[Dict]:
        raise NotImplementedError


def drop_rows(plan: PlannedBatch, bad_frontal: Sequence[int], bad_lateral: Sequence[int], bad: Counter,
              index: SeriesIndex, split: str) -> Optional[PlannedBatch]:
    """Plan without studies whose frontal failed to decode and without laterals that failed (decode-time
    failures the header check did not catch). Series order and full-series-first layout are rebuilt."""
    for b in bad_lateral:
        bad["unreadable_image"] += 1
        plan.lateral[b], plan.lateral_hw[b] = None, None
    if not bad_frontal:
        return plan
    bad["unreadable_image"] += len(bad_frontal)
    bad["dropped_study"] += len(bad_frontal)
    keep = [b for b in range(len(plan.rows)) if b not in set(bad_frontal)]
    if not keep:
        return None
    groups: Dict[int, List[int]] = {}
    for b in keep:
        groups.setdefault(plan.series_index[b], []).append(b)
    series = list(groups.values())
    ordered = [g for g in series if len(g) == SERIES_LEN] + [g for g in series if len(g) != SERIES_LEN]
    flat = [b for g in ordered for b in g]
    take = torch.tensor(flat, dtype=torch.long)
    return PlannedBatch(
        rows=[plan.rows[b] for b in flat], series_index=[i for i, g in enumerate(ordered) for _ in g],
        step=[k for g in ordered for k in range(len(g))], n_full_series=sum(len(g) == SERIES_LEN for g in series),
        frontal=[plan.frontal[b] for b in flat], lateral=[plan.lateral[b] for b in flat],
        frontal_hw=[plan.frontal_hw[b] for b in flat], lateral_hw=[plan.lateral_hw[b] for b in flat],
        frontal_off=plan.frontal_off[take], lateral_off=plan.lateral_off[take])


# -- torchvision decode_jpeg (nvJPEG on CUDA) + the extension op ------------------------------------------------
class NvjpegSeriesLoader(_BatchedSeriesLoader):
    """``torchvision.io.decode_jpeg`` on the whole batch in one call, then one resize/pad/crop/normalise op."""

    name = "nvjpeg"

    def __init__(self, *args, device: Union[str, torch.device, None] = None, **kw):
        super().__init__(*args, **kw)
        import warnings

        with warnings.catch_warnings():  # torchvision >= 0.29 warns that its codecs move to torchcodec
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import ImageReadMode, decode_jpeg  # lazily: torchvision is optional

        self._decode, self._mode = decode_jpeg, ImageReadMode.GRAY
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))

    def _decode_all(self, datas: List[bytes]) -> Tuple[List[Optional[torch.Tensor]], List[int]]:
        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        if not tensors:
            return [], []
        try:
            return list(self._decode(tensors, mode=self._mode, device=self.device)), []
        except RuntimeError:
            # one bad file fails the batched call: decode one by one to find it (rare, slow path)
            out, bad = [], []
            for k, t in enumerate(tensors):
                try:
                    out.append(self._decode(t, mode=self._mode, device=self.device))
                except RuntimeError as e:
                    log.warning("skipping image that failed to decode: %s", e)
                    out.append(None)
                    bad.append(k)
            return out, bad

    def _transform(self, plan: PlannedBatch) -> Optional[Dict]:
        from ..ops_image import resize_pad_crop_normalize

        lat_rows = [b for b, x in enumerate(plan.lateral) if x is not None]
        imgs, bad = self._decode_all(plan.frontal + [plan.lateral[b] for b in lat_rows])
        if bad:
            nf = len(plan.frontal)
            plan = drop_rows(plan, [k for k in bad if k < nf], [lat_rows[k - nf] for k in bad if k >= nf],
                             self.bad, self.index, self.split)
            if plan is None:
                return None
            return self._transform(plan)
        B, S, R = len(plan.rows), self.img_size, self.resize_to
        offsets = torch.cat([plan.frontal_off, plan.lateral_off[lat_rows]])
        out = resize_pad_crop_normalize(imgs, S, R, offsets, self.filter)
        return assemble_batch(self.index, plan, out[:B], out[B:], self.tokenizer)


# -- the PIL DataLoader path ------------------------------------------------------------------------------------
def pil_loader(index, split, tokenizer, img_size, batch_series, train, num_workers: Optional[int] = None,
               seed: int = 0, **_):
    """SeriesDataset + collate_series in DataLoader worker processes (imported lazily)."""
    from torch.utils.data import DataLoader, DistributedSampler

    from .dataset import SeriesCollate, SeriesDataset

    ds = SeriesDataset(index, split, tokenizer, img_size=img_size, train=train)
    rank, world = dist_shard()
    sampler = DistributedSampler(ds, world, rank, shuffle=train, seed=seed, drop_last=train) if world > 1 else None
    workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
    return DataLoader(ds, batch_size=batch_series, shuffle=(train and sampler is None), sampler=sampler,
                      num_workers=workers, collate_fn=SeriesCollate(), drop_last=train,
                      pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)


def _dali_importable() -> Optional[str]:
    try:
        import nvidia.dali  # noqa: F401
        return None
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def _torchvision_importable() -> Optional[str]:
    try:
        import torchvision.io  # noqa: F401
        return None
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def make_loader(index, split: str, tokenizer, img_size: int, batch_series: int, train: bool,
                backend: str = "auto", **kw):
    """An iterable of Batch dicts over ``split`` of a prepared index (see the module docstring).

    Args:
        backend: "auto" (DALI if importable and CUDA is present, else nvJPEG + the extension op on CUDA, else
            PIL), or "dali" / "nvjpeg" / "pil" to start the chain from that backend (a missing dependency
            still degrades, with one log line). On a machine without CUDA "dali" runs DALI's CPU pipeline
            and "nvjpeg" torchvision's CPU decoder.
        **kw: shard_id, num_shards, seed, drop_last, filter ("area" | "bilinear"), num_threads (DALI),
            device (nvjpeg), num_workers (pil).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    cuda = torch.cuda.is_available()
    chain = {"auto": ["dali", "nvjpeg", "pil"], "dali": ["dali", "nvjpeg", "pil"],
             "nvjpeg": ["nvjpeg", "pil"], "pil": ["pil"]}[backend]
    pil_kw = {k: kw[k] for k in ("num_workers", "seed") if k in kw}
    for name in chain:
        if name == "dali":
            why = _dali_importable()
            if why is None and backend == "auto" and not cuda:
                why = "no CUDA device (pass backend='dali' for DALI's CPU pipeline)"
            if why is None:
                from .dali_pipeline import DaliSeriesLoader

                return DaliSeriesLoader(index, split, tokenizer, img_size, batch_series, train,
                                        **{k: v for k, v in kw.items() if k not in ("device", "num_workers")})
            log.info("loader: DALI backend unavailable (%s); trying nvJPEG + extension op", why)
        elif name == "nvjpeg":
            why = _torchvision_importable()
            if why is None and backend == "auto" and not cuda:
                why = "no CUDA device"
            if why is None:
                return NvjpegSeriesLoader(index, split, tokenizer, img_size, batch_series, train,
                                          **{k: v for k, v in kw.items() if k not in ("num_threads", "num_workers")})
            log.info("loader: nvJPEG backend unavailable (%s); using the PIL DataLoader", why)
        else:
            return pil_loader(index, split, tokenizer, img_size, batch_series, train, **pil_kw)
    raise AssertionError("unreachable")
