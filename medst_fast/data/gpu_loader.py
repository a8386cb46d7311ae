"""nvJPEG back-end of the series loader: ``torchvision.io.decode_jpeg`` + the batched transform op.

The JPEGs of a batch are decoded in one ``decode_jpeg`` call (nvJPEG's batched decoder on CUDA,
libjpeg-turbo on the CPU), then ``medst_fast::resize_pad_crop_normalize`` resizes, pads, crops and
normalises the whole batch in one kernel launch. Files that are not such JPEGs (PNG, DICOM, 12-bit or
CMYK JPEG, a failed header check) were decoded on the CPU by the reader (``batching.SeriesReader``) and
join the batch before the op; a JPEG the decoder rejects is decoded on the CPU too. Build it through
``medst_fast.data.loaders.build_series_loader(backend="nvjpeg", ...)``.

Threads and streams. Files are read in the reader thread; batches are decoded and transformed in a second
background thread (``prefetch`` batches ahead), on a CUDA stream of their own, so decoding overlaps the
training step instead of stalling the GPU between steps. A batch is handed to the training thread with an
event (its stream waits for that batch's work, no more) and ``record_stream`` on each of its CUDA tensors,
so the caching allocator does not give their memory to the decode stream again before the training work
that reads them has run. torchvision's CUDA ``decode_jpeg`` allocates its outputs on the calling thread's
current stream but writes them from nvJPEG's own stream without waiting on it; the decode stream is
therefore synchronised (in the decode thread, the training thread does not wait) before each call, so no
kernel still queued on it can be reading memory the decoder is about to write.

When the loader is built, the decoder is tried on a JPEG of the split (``probe_decoder``); if it fails on
files that the CPU decoder reads, every image of the run is decoded with PIL on the CPU (one log line; counted
as ``decoder_unavailable`` in ``cpu_decoded``) instead of one warning and one failed call per image.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional

import torch

from .batching import (BatchedSeriesLoader, CorruptImage, ImageItem, PlannedBatch, background, cpu_decode,
                       empty_batch_stand_in, gpu_decodable, jpeg_size)
from .images import ImageReadError

log = logging.getLogger("medst_fast")

# How many of the split's files the probe looks through for one JPEG the batched decoder would take.
PROBE_FILES = 64
PROBE_TRIES = 3  # failures on files the CPU decodes before the decoder is taken to be unusable
UNAVAILABLE = "decoder_unavailable"  # the cpu_decoded reason when the probe failed


def import_decode_jpeg():
    """torchvision's ``decode_jpeg`` and its grey mode (raises ImportError when torchvision is missing)."""
    with warnings.catch_warnings():  # torchvision >= 0.29 warns that its codecs move to torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg
    return decode_jpeg, ImageReadMode.GRAY


@dataclass
class PreparedBatch:
    """What the decode thread hands over: the batch (None: nothing readable), the counts to merge when the
    trainer takes it (a PlannedBatch without images), and the event after its GPU work (None on the CPU)."""

    batch: Optional[Dict]
    n_series: int
    plan: PlannedBatch
    ready: Optional["torch.cuda.Event"] = None


class NvjpegSeriesLoader(BatchedSeriesLoader):
    """Arguments as ``BatchedSeriesLoader``; ``device`` decides where decoding runs (CUDA: nvJPEG)."""

    backend = "nvjpeg"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._decode_jpeg, self._gray = import_decode_jpeg()
        self._stream = None
        if self.device.type == "cuda":
            if self.device.index is None:  # streams, events and the decoder need one definite device
                self.device = torch.device("cuda", torch.cuda.current_device())
            self._stream = torch.cuda.Stream(device=self.device)
        failure = probe_decoder(self._decode_one, self._probe_paths())
        if failure:
            self.reader.cpu_only = UNAVAILABLE
            log.warning("nvjpeg: decode_jpeg on %s failed on %s; every image of this run is decoded with PIL on "
                        "the CPU", self.device, failure)

    # -- the decode thread ----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Dict]:
        keys = list(self.sampler)

        def prepared():
            with contextlib.closing(self._plans(keys)) as plans:
                for k, plan in plans:
                    yield self._prepare(plan, len(k))

        for p in background(prepared, self.prefetch, "medst-nvjpeg-decode"):
            self._merge_counts(p.plan)
            yield empty_batch_stand_in(self.bad, p.n_series) if p.batch is None else self._hand_over(p)

    def _prepare(self, plan: PlannedBatch, n_series: int) -> PreparedBatch:
        """Decode thread: the plan's batch, its work queued on the decode stream, and the event after it."""
        with self._on_decode_stream():
            batch = self._batch(plan) if plan.series else None
            ready = None
            if self._stream is not None:
                ready = torch.cuda.Event()
                ready.record(self._stream)
        # only the counts travel on: the plan's decoded images are freed here, in the decode thread
        return PreparedBatch(batch, n_series, PlannedBatch([], plan.bad, plan.cpu_decoded), ready)

    def _hand_over(self, p: PreparedBatch) -> Dict:
        """Training thread: its stream waits for the batch's decode work; the allocator learns that the
        batch's memory is used there (it is freed by the trainer, on that stream, steps later)."""
        if p.ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(p.ready)
            for v in p.batch.values():
                if torch.is_tensor(v) and v.is_cuda:
                    v.record_stream(current)
        return p.batch

    def _on_decode_stream(self):
        # The device too: the decoder, the op and the allocator act on the calling thread's current device.
        if self._stream is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.cuda.device(self.device))
        stack.enter_context(torch.cuda.stream(self._stream))
        return stack

    # -- decoding -----------------------------------------------------------------------------------------------
    def _nvjpeg(self, data):
        if self._stream is not None:
            # decode_jpeg writes its outputs from nvJPEG's own stream without waiting on this one: nothing
            # queued here may still be reading memory the allocator is about to hand to those outputs.
            self._stream.synchronize()
        with warnings.catch_warnings():  # each call repeats torchvision's torchcodec deprecation notice
            warnings.simplefilter("ignore", DeprecationWarning)
            return self._decode_jpeg(data, mode=self._gray, device=self.device)

    def _decode(self, items: List[ImageItem]) -> List[Optional[torch.Tensor]]:
        tensors = [torch.frombuffer(bytearray(it.encoded), dtype=torch.uint8) for it in items]
        try:
            return list(self._nvjpeg(tensors))
        except RuntimeError:
            if self._stream is not None:
                # the failed call may have left writes queued on nvJPEG's stream into outputs it freed
                torch.cuda.synchronize(self.device)
            # one bad file fails the batched call: decode one by one to find it (rare, slow path)
            return [self._decode_single(it, t) for it, t in zip(items, tensors)]

    def _decode_single(self, item: ImageItem, data: torch.Tensor) -> Optional[torch.Tensor]:
        try:
            return self._nvjpeg([data])[0]
        except RuntimeError as e:
            log.warning("nvjpeg: %s did not decode (%s)", item.path, str(e).splitlines()[0])
            return None

    # -- the probe ------------------------------------------------------------------------------------------------
    def _probe_paths(self) -> Iterator[str]:
        seen = set()
        for series in self.index.series[self.split]:
            for row in series:
                s = self.index.studies[row]
                for rel in (s.frontal_path, s.lateral_path):
                    if rel and rel not in seen:
                        seen.add(rel)
                        yield self.index.path(rel)

    def _decode_one(self, data: bytes):
        """One decoded image, as the run decodes them (on the decode stream; waited for)."""
        with self._on_decode_stream():
            out = self._nvjpeg([torch.frombuffer(bytearray(data), dtype=torch.uint8)])[0]
            if self._stream is not None:
                self._stream.synchronize()
        return out


def probe_decoder(decode: Callable[[bytes], torch.Tensor], paths: Iterator[str], limit: int = PROBE_FILES,
                  cpu_ok: Optional[Callable[[str], bool]] = None, tries: int = PROBE_TRIES) -> Optional[str]:
    """None when ``decode`` works on a JPEG among the first ``limit`` files (or none of them is one to try),
    else the first failure: the file and the error. A file the CPU decoder cannot read either is a bad file,
    not a broken decoder, and is passed over; ``tries`` failures on good files (or all there are) settle it,
    so one file of an unusual kind does not send a whole run to the CPU."""
    cpu_ok = cpu_ok or _cpu_decodes
    failures = []
    for n, path in enumerate(paths):
        if n >= limit or len(failures) >= tries:
            break
        data = _gpu_jpeg(path)
        if data is None:
            continue
        try:
            h, w = jpeg_size(data, path)
            out = decode(data)
            if tuple(out.shape[-2:]) != (h, w):
                raise RuntimeError(f"decoded size {tuple(out.shape[-2:])}, the header says {(h, w)}")
            return None
        except Exception as e:  # any failure of the decoder (RuntimeError, a missing library, ...)
            if cpu_ok(path):
                failures.append(f"{path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    return failures[0] if failures else None


def _gpu_jpeg(path: str) -> Optional[bytes]:
    """The file's bytes when it is a JPEG the batched decoder would be given, else None."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        jpeg_size(data, path)
    except (OSError, CorruptImage):
        return None
    return data if gpu_decodable(data) else None


def _cpu_decodes(path: str) -> bool:
    try:
        cpu_decode(path)
        return True
    except ImageReadError:
        return False

