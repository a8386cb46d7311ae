"""NVIDIA DALI back-end of the series loader (``build_series_loader(backend="dali", ...)``).

The shared Python side (``batching``) takes the batches from the trainer's sampler, reads and validates
the files in a background thread, decodes the non-JPEG ones on the CPU and draws the crop origins; DALI
decodes the JPEGs ("mixed": nvJPEG on the GPU; "cpu" with ``device_id=None``) and then:

* ``filter="area"`` (default, the official cv2 INTER_AREA): DALI has no area filter, so the graph only
  decodes and the ``medst_fast::resize_pad_crop_normalize`` op (one kernel launch) does the rest on the
  decoded images, zero-copy through DLPack on the GPU, together with the CPU-decoded ones.
* ``filter="bilinear"``: the JPEGs go through the whole DALI graph: resize to the exact Med-ST size
  (per-sample resize_x/y, so the shorter side is truncated as the official code does) with DALI's
  antialiased linear filter. That is ``F.interpolate(antialias=True)``'s filter, and the outputs agree to
  rounding except within one filter support (about the downscale factor, in pixels) of the image's
  edges, where DALI clamps to the edge pixel and torch/PIL renormalise the truncated filter
  (tests/test_data_dali_pipeline.py compares the interior); ``slice`` with out-of-bounds padding does the
  centred zero padding and the crop in one step (its window starts at the crop origin minus the
  padding); ``crop_mirror_normalize`` computes (x - 127.5)/127.5 = (x/255 - 0.5)/0.5 into (1, S, S).
  CPU-decoded images take the op with the same bilinear filter.

When DALI fails on a batch (a file that passed the header check but does not decode), the pipeline is
rebuilt and that batch is decoded on the CPU image by image, so nothing is dropped that the CPU decoder
can read.
"""
from __future__ import annotations

import logging
from typing import List, Optional, Tuple

import numpy as np
import torch

from .batching import BatchedSeriesLoader, ImageItem, jpeg_size
from .transforms import resize_geometry

log = logging.getLogger("medst_fast")


def build_pipeline(max_batch: int, img_size: int, device_id: Optional[int], num_threads: int, in_graph: bool):
    """DALI pipeline fed per batch through external sources "jpegs", "size" (h', w') and "start" (y, x)."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None

    @pipeline_def(batch_size=max_batch, num_threads=num_threads, device_id=device_id, exec_async=False,
                  exec_pipelined=False, prefetch_queue_depth=1)
    def pipe():
        jpegs = fn.external_source(name="jpegs", dtype=types.UINT8, ndim=1)
        img = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.GRAY)
        if not in_graph:
            return img
        size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)
        start = fn.external_source(name="start", dtype=types.INT32, ndim=1)
        img = fn.resize(img, resize_y=size[0], resize_x=size[1], interp_type=types.INTERP_LINEAR, antialias=True,
                        dtype=types.FLOAT)
        img = fn.slice(img, start=start, shape=[img_size, img_size], axis_names="HW",
                       out_of_bounds_policy="pad", fill_values=0.0)
        return fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW", mean=[127.5], std=[127.5])

    p = pipe()
    p.build()
    return p


def dali_device_id(device: torch.device) -> Optional[int]:
    """DALI's device_id for a torch device: None (CPU pipeline) for the CPU."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


class DaliSeriesLoader(BatchedSeriesLoader):
    """Arguments as ``BatchedSeriesLoader``; ``device`` picks the pipeline (CUDA: "mixed" decode on that
    GPU, CPU: DALI's CPU pipeline), ``threads`` is also DALI's CPU thread count."""

    backend = "dali"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        import nvidia.dali  # noqa: F401  (fail here, not at the first batch, when DALI is missing)

        self.device_id = dali_device_id(self.device)
        if self.device_id is not None:
            self.device = torch.device("cuda", self.device_id)
        self.in_graph = self.filter == "bilinear"
        self.max_batch = 2 * 4 * self.sampler.bs  # frontal + lateral of every study
        self._pipe = None

    def _pipeline(self):
        if self._pipe is None:
            self._pipe = build_pipeline(self.max_batch, self.img_size, self.device_id, self.reader.threads,
                                        self.in_graph)
        return self._pipe

    def _run(self, items: List[ImageItem]):
        p = self._pipeline()
        p.feed_input("jpegs", [np.frombuffer(it.encoded, dtype=np.uint8) for it in items])
        if self.in_graph:
            sizes, starts = [], []
            for it in items:
                nh, nw, top, left = resize_geometry(*_jpeg_hw(it), self.side)
                sizes.append(np.array([nh, nw], np.float32))
                starts.append(np.array([it.offset[0] - top, it.offset[1] - left], np.int32))
            p.feed_input("size", sizes)
            p.feed_input("start", starts)
        (out,) = p.run()
        return out

    def _failed(self, e: RuntimeError, n: int) -> None:
        log.warning("DALI failed on a batch of %d images (%s); decoding them on the CPU", n, str(e).splitlines()[0])
        self._pipe = None  # a failed DALI pipeline is not reused

    # DALI reuses its output buffers on the next run, so outputs are copied into torch-owned memory;
    # feed_ndarray orders the device copy on torch's current stream after DALI's work.
    def _decode(self, items: List[ImageItem]) -> List[Optional[torch.Tensor]]:
        try:
            out = self._run(items)
        except RuntimeError as e:
            self._failed(e, len(items))
            return [None] * len(items)
        if self.device_id is None:
            return [torch.from_numpy(np.array(out.at(i))[..., 0]) for i in range(len(out))]
        from nvidia.dali.plugin.pytorch import feed_ndarray

        res, stream = [], torch.cuda.current_stream(self.device)
        for i in range(len(out)):
            t = out[i]
            dst = torch.empty(t.shape(), dtype=torch.uint8, device=self.device)
            feed_ndarray(t, dst, cuda_stream=stream)
            res.append(dst[..., 0])
        return res

    def _transform(self, items: List[ImageItem]) -> Tuple[torch.Tensor, List[int]]:
        if not self.in_graph:
            return super()._transform(items)
        jpeg = [k for k, it in enumerate(items) if it.encoded is not None]
        rest = [k for k in range(len(items)) if items[k].encoded is None]
        try:
            dense = self._to_torch_dense(self._run([items[k] for k in jpeg])) if jpeg else None
        except RuntimeError as e:
            self._failed(e, len(jpeg))
            items = list(items)  # the plan keeps its own items; the indices returned refer to both
            for k in jpeg:  # decode them on the CPU; the op applies the same bilinear filter
                px = self._fallback(items[k])
                items[k] = ImageItem(items[k].path, None, px, items[k].offset)
            return super()._transform(items)
        outs, ok = [dense] if dense is not None else [], list(jpeg)
        if rest:
            o, ok_rest = super()._transform([items[k] for k in rest])
            outs.append(o)
            ok += [rest[j] for j in ok_rest]
        if not outs:
            return torch.empty(0, 1, self.img_size, self.img_size, device=self.device), []
        return torch.cat(outs), ok

    def _to_torch_dense(self, out) -> torch.Tensor:
        if self.device_id is None:
            return torch.from_numpy(np.array(out.as_tensor()))
        from nvidia.dali.plugin.pytorch import feed_ndarray

        t = out.as_tensor()
        dst = torch.empty(t.shape(), dtype=torch.float32, device=self.device)
        feed_ndarray(t, dst, cuda_stream=torch.cuda.current_stream(self.device))
        return dst


def _jpeg_hw(item: ImageItem) -> Tuple[int, int]:
    return jpeg_size(item.encoded, item.path)
