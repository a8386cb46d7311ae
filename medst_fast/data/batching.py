"""What the batched loaders (DALI, nvJPEG) share: read and validate files, plan a batch, assemble the Batch.

Both back-ends follow the trainer's ``SeriesDataset`` + ``SeriesBatchSampler`` study by study, so that for
the same (seed, epoch, start batch) they give the same batches as the PIL workers:

* the batches of series ids per rank come from ``medst_fast.data.sampling.SeriesBatchSampler`` itself;
* an image is unreadable exactly when ``medst_fast.data.images.load_gray`` fails on it: a file that is not
  a JPEG (PNG 8/16-bit, RGBA, DICOM, ...) or whose header check fails is decoded on the CPU by that
  decoder, and so is a JPEG the batched decoder rejects; the counts in ``bad`` use the dataset's names
  (``missing_image``, ``unreadable_image``, ``dropped_study``);
* crop origins are drawn per series from a generator seeded like the trainer's ``SeededItems`` (seed,
  epoch, series index), frontal then lateral per study, only for images that were read, in the dataset's
  order. (A JPEG that passes the header check and then fails to decode anywhere has had its draw made; in
  the PIL path it would not, so the later crops of that one series differ. It is counted the same.)

The module has no back-end code: ``gpu_loader`` (nvJPEG) and ``dali_pipeline`` (DALI) subclass
``BatchedSeriesLoader`` and implement ``_decode`` (and DALI optionally ``_transform``).
"""
from __future__ import annotations

import logging
import os
import queue
import struct
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .sampling import BAD_BATCH, SeriesBatchSampler, item_seed
from .images import ImageReadError, load_gray
from .index import SPLITS, SeriesIndex
from .transforms import absent_view, crop_offsets, resize_side
from ..ops_image import resize_pad_crop_normalize

log = logging.getLogger("medst_fast")


# -- JPEG pre-validation ------------------------------------------------------------------------------------
class CorruptImage(ValueError):
    """A file that is not a complete baseline/progressive JPEG. The message names the file."""


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_size(data: bytes, path: str = "<bytes>") -> Tuple[int, int]:
    """(height, width) from the SOF segment; raises CorruptImage when the file cannot be a whole JPEG.

    Checks the SOI marker, walks the segments up to the frame header, and requires the EOI marker near the
    end (a truncated download or an interrupted write loses it). GPU decoders may abort a whole batch on such
    a file, so such files go to the CPU decoder instead.
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


# 8-bit baseline/progressive frames with one (grey) or three (YCbCr) components: what nvJPEG and DALI
# decode to grey like libjpeg does. Anything else (12-bit, lossless, CMYK) goes to the CPU decoder.
_GPU_SOF = {0xC0, 0xC1, 0xC2}


def gpu_decodable(data: bytes) -> bool:
    """True for an 8-bit baseline/progressive JPEG with 1 or 3 components (after ``jpeg_size`` passed)."""
    i, n = 2, len(data)
    while i + 4 <= n and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        if marker in _SOF:
            return marker in _GPU_SOF and i + 10 <= n and data[i + 4] == 8 and data[i + 9] in (1, 3)
        i += 2 + length
    return False


# -- what a planned batch holds ---------------------------------------------------------------------------------
@dataclass
class ImageItem:
    """One image of a batch: encoded JPEG bytes for the batched decoder, or pixels decoded on the CPU."""

    path: str
    encoded: Optional[bytes] = None      # a JPEG the batched decoder takes
    pixels: Optional[np.ndarray] = None  # uint8 (H, W), decoded by images.load_gray
    offset: Tuple[int, int] = (0, 0)     # crop origin (top, left) in the R x R canvas
    cpu_reason: str = ""                 # why the CPU decoded it: "not_jpeg", "jpeg_format", "jpeg_header"
    out: Optional[torch.Tensor] = None   # (1, S, S) after the transform; None while pending or if it failed


@dataclass
class PlannedStudy:
    row: int
    frontal: ImageItem
    lateral: Optional[ImageItem]         # None when the study has none or it could not be read


@dataclass
class PlannedBatch:
    """The readable studies of a batch, series in sampler order (no empty series; none at all when nothing
    could be read), and what reading counted. The reader thread fills the counters; the loader merges them
    into its own in the consuming thread, so no Counter is shared between threads."""

    series: List[List[PlannedStudy]]
    bad: Counter = field(default_factory=Counter)
    cpu_decoded: Counter = field(default_factory=Counter)
    items: List[ImageItem] = field(default_factory=list)  # every image, frontal then lateral per study


def note_bad(bad: Counter, err: BaseException) -> None:
    """Count and log an image that cannot be used, with the dataset's reason names."""
    bad["missing_image" if "not found" in str(err) else "unreadable_image"] += 1
    log.warning("skipping image: %s", err)


def cpu_decode(path: str) -> np.ndarray:
    """The project's decoder (images.load_gray) as a writable uint8 (H, W) array; raises ImageReadError."""
    return np.array(load_gray(path), dtype=np.uint8)


def series_generator(seed: int, epoch: int, series: int) -> torch.Generator:
    """The RNG the trainer's ``SeededItems`` seeds for this series (same stream as its global torch RNG)."""
    return torch.Generator().manual_seed(item_seed(seed, epoch, series))


# -- reading ---------------------------------------------------------------------------------------------------
class SeriesReader:
    """Reads the files of a batch (in a thread pool), validates JPEGs, decodes the rest on the CPU and draws
    the crop origins, with the trainer dataset's skip rules (see the module docstring)."""

    def __init__(self, index: SeriesIndex, split: str, img_size: int, train: bool, seed: int, threads: int = 1,
                 gpu_formats=gpu_decodable):
        self.index, self.split, self.train, self.seed = index, split, train, seed
        self.img_size, self.side = int(img_size), resize_side(img_size)
        self.threads = max(1, int(threads))
        self.gpu_formats = gpu_formats
        # Set (to the reason counted in ``cpu_decoded``) when the batched decoder is unusable for the run: every
        # image is then decoded on the CPU here, in the reading pool.
        self.cpu_only = ""

    def read_image(self, path: str) -> Union[ImageItem, BaseException]:
        """An ImageItem, or the error that makes the image unusable (counted later, in dataset order)."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return ImageReadError(f"{path}: image file not found")
        except OSError as e:
            return ImageReadError(f"{path}: unreadable image file ({e})")
        if data[:2] == b"\xff\xd8":
            try:
                jpeg_size(data, path)
                if not self.gpu_formats(data):
                    reason = "jpeg_format"
                elif self.cpu_only:
                    reason = self.cpu_only
                else:
                    return ImageItem(path, encoded=data)
            except CorruptImage:
                reason = "jpeg_header"  # the CPU decoder has the last word (it may still decode it)
        else:
            reason = "not_jpeg"
        try:
            return ImageItem(path, pixels=cpu_decode(path), cpu_reason=reason)
        except ImageReadError as e:
            return e

    def read(self, keys: Sequence[Tuple[int, int]], pool: Optional[ThreadPoolExecutor] = None) -> PlannedBatch:
        """``keys``: the sampler's [(epoch, series index), ...] for one batch."""
        studies = [[self.index.studies[r] for r in self.index.series[self.split][i]] for _, i in keys]
        paths = list(dict.fromkeys(self.index.path(p) for ss in studies for s in ss
                                   for p in (s.frontal_path, s.lateral_path) if p))
        results = dict(zip(paths, (pool.map if pool else map)(self.read_image, paths)))
        plan = PlannedBatch([])
        plan.cpu_decoded.update(r.cpu_reason for r in results.values() if isinstance(r, ImageItem) and r.cpu_reason)
        for (epoch, i), ss in zip(keys, studies):
            gen = series_generator(self.seed, epoch, i) if self.train else None
            planned = []
            for s in ss:  # the order SeriesDataset.__getitem__ loads and draws in
                fr = results[self.index.path(s.frontal_path)]
                if isinstance(fr, BaseException):
                    note_bad(plan.bad, fr)
                    plan.bad["dropped_study"] += 1
                    continue
                fr = self._placed(fr, gen)
                la = None
                if s.lateral_path:
                    la = results[self.index.path(s.lateral_path)]
                    if isinstance(la, BaseException):
                        note_bad(plan.bad, la)
                        la = None
                    else:
                        la = self._placed(la, gen)
                planned.append(PlannedStudy(s.row, fr, la))
            if planned:
                plan.series.append(planned)
        plan.items = [im for s in plan.series for st in s for im in (st.frontal, st.lateral) if im is not None]
        return plan

    def _placed(self, item: ImageItem, gen: Optional[torch.Generator]) -> ImageItem:
        # A fresh item per use: the same file may appear twice in a batch with different crops.
        return ImageItem(item.path, item.encoded, item.pixels, crop_offsets(self.side, self.img_size, self.train, gen),
                         item.cpu_reason)


# -- assembling ----------------------------------------------------------------------------------------------------
def assemble_batch(index: SeriesIndex, plan: PlannedBatch, img_size: int, tokenizer, bad: Counter,
                   replicate_official_bug: bool = False) -> Optional[Dict]:
    """Batch dict (docs/interfaces.md) from a transformed plan; the layout of ``dataset.collate_series``.

    An image whose ``out`` is None failed to decode everywhere: a frontal drops its study, a lateral becomes
    the absent view, both counted as the dataset counts them. None when no study is left.
    """
    series = []
    for s in plan.series:
        kept = []
        for st in s:
            if st.frontal.out is None:
                note_bad(bad, ImageReadError(f"{st.frontal.path}: failed to decode"))
                bad["dropped_study"] += 1
                continue
            if st.lateral is not None and st.lateral.out is None:
                note_bad(bad, ImageReadError(f"{st.lateral.path}: failed to decode"))
                st = PlannedStudy(st.row, st.frontal, None)
            kept.append(st)
        if kept:
            series.append(kept)
    if not series:
        return None
    full = [s for s in series if len(s) == index.series_len]  # the loader's N (the index is cut to it)
    ordered = full + [s for s in series if len(s) != index.series_len]
    rows = [st for s in ordered for st in s]
    # The official collate keeps laterals and their flags in the sampler's order (docs/method.md §6.2.1), for
    # parity runs.
    lat_source = [st for s in series for st in s] if replicate_official_bug else rows
    frontal = torch.stack([st.frontal.out for st in rows])
    zero = absent_view(img_size).to(frontal.device)
    studies = [index.studies[st.row] for st in rows]
    batch = {
        "frontal": frontal,
        "lateral": torch.stack([zero if st.lateral is None else st.lateral.out for st in lat_source]),
        "has_lateral": torch.tensor([st.lateral is not None for st in lat_source], dtype=torch.bool),  # host
        "n_full_series": len(full),
        "series_index": torch.tensor([k for k, s in enumerate(ordered) for _ in s], dtype=torch.long),
        "step": torch.tensor([k for s in ordered for k in range(len(s))], dtype=torch.long),
        "study_id": [s.study_id for s in studies],
        "text": [s.text for s in studies],
    }
    if tokenizer is not None:
        batch.update(tokenizer([s.text for s in studies]))
    return batch


# -- the loader ------------------------------------------------------------------------------------------------------
class BatchedSeriesLoader:
    """Batches from the trainer's sampler, files read in a background thread (a pool of ``threads``), decoded
    and transformed by the subclass; see ``medst_fast.data.loaders.build_series_loader`` for the arguments."""

    backend = "batched"

    def __init__(self, index, split: str, tokenizer, img_size: int, batch_series: int, train: bool,
                 rank: int = 0, world_size: int = 1, seed: int = 0, threads: int = 2,
                 device: Union[str, torch.device, None] = None, replicate_official_bug: bool = False,
                 filter: str = "area", prefetch: int = 2):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if filter not in ("area", "bilinear"):
            raise ValueError(f"filter={filter!r}, expected 'area' or 'bilinear'")
        self.index = SeriesIndex.load(index)
        self.split, self.tokenizer, self.train = split, tokenizer, bool(train)
        self.img_size, self.side = int(img_size), resize_side(img_size)
        self.filter, self.prefetch, self.replicate_official_bug = filter, max(1, int(prefetch)), replicate_official_bug
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.sampler = SeriesBatchSampler(len(self.index.series[split]), batch_series, rank, world_size, seed,
                                          shuffle=self.train)
        self.bad: Counter = Counter()          # skipped images, studies and batches (the dataset's names)
        self.cpu_decoded: Counter = Counter()  # images the batched decoder did not take, by reason
        self.reader = SeriesReader(self.index, split, img_size, self.train, seed, threads)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(int(epoch), int(start_batch))

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Dict]:
        keys = list(self.sampler)
        for k, plan in self._plans(keys):
            batch = self._batch(plan) if plan.series else None
            self._merge_counts(plan)
            yield empty_batch_stand_in(self.bad, len(k)) if batch is None else batch

    def _plans(self, keys) -> Iterator[Tuple[List, PlannedBatch]]:
        """(sampler batch, PlannedBatch) per batch, in order, read ``prefetch`` batches ahead in a thread."""
        def read():
            with ThreadPoolExecutor(self.reader.threads, thread_name_prefix=f"medst-{self.backend}-read") as pool:
                for k in keys:
                    yield k, self.reader.read(k, pool)

        return background(read, self.prefetch, f"medst-{self.backend}-reader")

    def _merge_counts(self, plan: PlannedBatch) -> None:
        # Only the thread that hands batches to the trainer touches the loader's Counters: what a checkpoint
        # saves then covers exactly the batches the trainer has taken, however far ahead the threads run.
        self.bad.update(plan.bad)
        self.cpu_decoded.update(plan.cpu_decoded)

    def _batch(self, plan: PlannedBatch) -> Optional[Dict]:
        """Decode, transform and assemble a plan; what fails is counted in the plan's own Counters."""
        out, ok = self._transform(plan.items)
        for j, k in enumerate(ok):
            plan.items[k].out = out[j]
        plan.cpu_decoded.update(it.cpu_reason for it in plan.items if it.encoded is not None and it.cpu_reason)
        return assemble_batch(self.index, plan, self.img_size, self.tokenizer, plan.bad, self.replicate_official_bug)

    # -- decode + transform -------------------------------------------------------------------------------------
    def _decode(self, items: List[ImageItem]) -> List[Optional[torch.Tensor]]:
        """uint8 (H, W) or (1, H, W) tensors on ``self.device`` for JPEG items; None where decoding failed."""
        raise NotImplementedError

    def _transform(self, items: List[ImageItem]) -> Tuple[torch.Tensor, List[int]]:
        """(n_ok, 1, S, S) outputs and the indices of the items they belong to (the others failed)."""
        decoded = self._decoded_pixels(items)
        ok = [k for k, d in enumerate(decoded) if d is not None]
        out = resize_pad_crop_normalize([decoded[k] for k in ok], self.img_size, self.side,
                                        [items[k].offset for k in ok], self.filter)
        return out.to(self.device), ok

    def _decoded_pixels(self, items: List[ImageItem]) -> List[Optional[torch.Tensor]]:
        """The batched decoder on the JPEGs, the CPU decoder for the rest and for the JPEGs it rejected."""
        decoded: List[Optional[torch.Tensor]] = [None] * len(items)
        jpeg = [k for k, it in enumerate(items) if it.encoded is not None]
        for k, t in zip(jpeg, self._decode([items[k] for k in jpeg]) if jpeg else []):
            decoded[k] = t
        for k, it in enumerate(items):
            if decoded[k] is None:
                px = it.pixels if it.pixels is not None else self._fallback(it) if it.encoded is not None else None
                if px is not None:
                    decoded[k] = torch.from_numpy(px).to(self.device)
        return decoded

    def _fallback(self, item: ImageItem) -> Optional[np.ndarray]:
        """A JPEG the batched decoder rejected: the CPU decoder's answer (None if it fails too). The item is
        marked ``decoder_failed``; ``_batch`` counts the marks (this may run outside the consuming thread)."""
        try:
            px = cpu_decode(item.path)
        except ImageReadError:
            return None  # counted when the batch is assembled
        item.cpu_reason = "decoder_failed"
        log.warning("%s decoder failed on %s; decoded it on the CPU", self.backend, item.path)
        return px


def empty_batch_stand_in(bad: Counter, n_series: int) -> Dict:
    """What a loader yields for a batch without one readable study: the trainer's stand-in (it skips and counts
    the step), so every back-end yields one item per sampler batch and the step count of a run holds."""
    bad["empty_batch"] += 1
    reason = f"all {n_series} series of the batch are unreadable"
    log.warning("%s (%d such batches so far)", reason, bad["empty_batch"])
    return {BAD_BATCH: reason, "n_series": n_series}


class _Raised:
    """An exception of the producer thread, carried to the consumer (re-raised there with its traceback)."""

    def __init__(self, error: BaseException):
        self.error = error


_END = object()


def background(source: Callable[[], Iterator], depth: int, name: str) -> Iterator:
    """Iterate ``source()`` in a daemon thread, at most ``depth`` items ahead of the consumer, in order.

    An exception in the thread is raised in the consumer at the point where its item would have come. When
    the consumer stops early (``close()``, or the generator is dropped), the thread finishes the item it is
    on, closes the source (in its own thread: a generator cannot be closed from another one) and ends;
    the queue is drained meanwhile so a thread blocked on a full queue wakes up.
    """
    q: "queue.Queue" = queue.Queue(maxsize=max(1, int(depth)))
    stop = threading.Event()

    def run():
        try:
            items = source()
            try:
                for item in items:
                    q.put(item)
                    if stop.is_set():
                        break
            finally:
                close = getattr(items, "close", None)
                if close is not None:
                    close()
            q.put(_END)
        except BaseException as e:  # surfaced in the consumer
            q.put(_Raised(e))

    t = threading.Thread(target=run, name=name, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        stop.set()
        while t.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(0.05)


def default_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))
