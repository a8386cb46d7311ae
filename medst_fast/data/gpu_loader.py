"""nvJPEG back-end of the series loader: ``torchvision.io.decode_jpeg`` + the batched transform op.

The JPEGs of a batch are decoded in one ``decode_jpeg`` call (nvJPEG's batched decoder on CUDA,
libjpeg-turbo on the CPU), then ``medst_fast::resize_pad_crop_normalize`` resizes, pads, crops and
normalises the whole batch in one kernel launch. Files that are not such JPEGs (PNG, DICOM, 12-bit or
CMYK JPEG, a failed header check) were decoded on the CPU by the reader (``batching.SeriesReader``) and
join the batch before the op; a JPEG the decoder rejects is decoded on the CPU too. Build it through
``medst_fast.data.loaders.build_series_loader(backend="nvjpeg", ...)``.
"""
from __future__ import annotations

import logging
import warnings
from typing import List, Optional

import torch

from .batching import BatchedSeriesLoader, ImageItem

log = logging.getLogger("medst_fast")


def import_decode_jpeg():
    """torchvision's ``decode_jpeg`` and its grey mode (raises ImportError when torchvision is missing)."""
    with warnings.catch_warnings():  # torchvision >= 0.29 warns that its codecs move to torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg
    return decode_jpeg, ImageReadMode.GRAY


class NvjpegSeriesLoader(BatchedSeriesLoader):
    """Arguments as ``BatchedSeriesLoader``; ``device`` decides where decoding runs (CUDA: nvJPEG)."""

    backend = "nvjpeg"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._decode_jpeg, self._gray = import_decode_jpeg()

    def _decode(self, items: List[ImageItem]) -> List[Optional[torch.Tensor]]:
        with warnings.catch_warnings():  # each call repeats torchvision's torchcodec deprecation notice
            warnings.simplefilter("ignore", DeprecationWarning)
            return self._decode_batch(items)

    def _decode_batch(self, items: List[ImageItem]) -> List[Optional[torch.Tensor]]:
        tensors = [torch.frombuffer(bytearray(it.encoded), dtype=torch.uint8) for it in items]
        try:
            return list(self._decode_jpeg(tensors, mode=self._gray, device=self.device))
        except RuntimeError:
            # one bad file fails the batched call: decode one by one to find it (rare, slow path)
            out: List[Optional[torch.Tensor]] = []
            for it, t in zip(items, tensors):
                try:
                    out.append(self._decode_jpeg(t, mode=self._gray, device=self.device))
                except RuntimeError as e:
                    log.warning("nvjpeg: %s did not decode (%s)", it.path, str(e).splitlines()[0])
                    out.append(None)
            return out
