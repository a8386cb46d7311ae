"""NVIDIA DALI backend of the series loader (``make_loader(..., backend="dali")``).

The Python side (shared with the nvJPEG loader, ``gpu_loader``) plans the batches per rank, reads and
validates the JPEG files in a background thread and draws the crop offsets; DALI decodes ("mixed": nvJPEG
on the GPU; "cpu" with ``device_id=None``) and transforms:

* ``filter="bilinear"``: all in the DALI graph: resize to the exact Med-ST size (per-sample resize_x/y, so
  the shorter side is truncated as the official code does) with DALI's antialiased linear filter. That is
  ``F.interpolate(antialias=True)``'s filter, and the outputs agree to rounding except within one filter
  support (about the downscale factor, in pixels) of the image's edges, where DALI clamps to the edge pixel
  and torch/PIL renormalise the truncated filter (tests/test_dali_pipeline.py compares the interior); ``slice`` with out-of-bounds padding does the centred
  zero padding and the crop in one step (its window starts at the crop origin minus the padding); then
  ``crop_mirror_normalize`` computes (x - 127.5)/127.5 = (x/255 - 0.5)/0.5 into (1, S, S) float.
* ``filter="area"`` (default, the official cv2 INTER_AREA): DALI has no area filter, so the graph only
  decodes and the ``medst_fast::resize_pad_crop_normalize`` op (one kernel launch) does the rest on the
  decoded images, zero-copy through DLPack on the GPU.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional

import numpy as np
import torch

from .gpu_loader import PlannedBatch, _BatchedSeriesLoader, assemble_batch, drop_rows

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


class DaliSeriesLoader(_BatchedSeriesLoader):
    """Args as ``gpu_loader.make_loader``, plus ``device_id`` (default: the current CUDA device, or None =
    CPU pipeline when there is no GPU) and ``num_threads`` (DALI CPU threads)."""

    name = "dali"

    def __init__(self, *args, device_id: Optional[int] = -1, num_threads: int = 4, **kw):
        super().__init__(*args, **kw)
        if device_id == -1:
            device_id = torch.cuda.current_device() if torch.cuda.is_available() else None
        self.device_id, self.num_threads = device_id, int(num_threads)
        self.device = torch.device("cuda", device_id) if device_id is not None else torch.device("cpu")
        self.in_graph = self.filter == "bilinear"
        self.max_batch = 2 * 4 * self.batch_series  # frontal + lateral of every study
        self._pipe = None

    def _pipeline(self):
        if self._pipe is None:
            self._pipe = build_pipeline(self.max_batch, self.img_size, self.device_id, self.num_threads,
                                        self.in_graph)
        return self._pipe

    def _run(self, datas: List[bytes], hws, offsets: torch.Tensor):
        p = self._pipeline()
        p.feed_input("jpegs", [np.frombuffer(d, dtype=np.uint8) for d in datas])
        if self.in_graph:
            from ..ops_image import resize_geometry

            sizes, starts = [], []
            for (h, w), (y0, x0) in zip(hws, offsets.tolist()):
                nh, nw, top, left = resize_geometry(h, w, self.resize_to)
                sizes.append(np.array([nh, nw], np.float32))
                starts.append(np.array([y0 - top, x0 - left], np.int32))
            p.feed_input("size", sizes)
            p.feed_input("start", starts)
        (out,) = p.run()
        return out

    # DALI reuses its output buffers on the next run, so outputs are copied into torch-owned memory;
    # feed_ndarray orders the device copy on torch's current stream after DALI's work.
    def _to_torch_dense(self, out) -> torch.Tensor:
        if self.device_id is None:
            return torch.from_numpy(np.array(out.as_tensor()))
        from nvidia.dali.plugin.pytorch import feed_ndarray

        t = out.as_tensor()
        dst = torch.empty(t.shape(), dtype=torch.float32, device=self.device)
        feed_ndarray(t, dst, cuda_stream=torch.cuda.current_stream(self.device))
        return dst

    def _to_torch_list(self, out) -> List[torch.Tensor]:
        n = len(out)
        if self.device_id is None:
            return [torch.from_numpy(np.array(out.at(i))[..., 0]) for i in range(n)]
        from nvidia.dali.plugin.pytorch import feed_ndarray

        res, stream = [], torch.cuda.current_stream(self.device)
        for i in range(n):
            t = out[i]
            dst = torch.empty(t.shape(), dtype=torch.uint8, device=self.device)
            feed_ndarray(t, dst, cuda_stream=stream)
            res.append(dst[..., 0])
        return res

    def _transform(self, plan: PlannedBatch) -> Optional[Dict]:
        lat_rows = [b for b, x in enumerate(plan.lateral) if x is not None]
        datas = plan.frontal + [plan.lateral[b] for b in lat_rows]
        hws = plan.frontal_hw + [plan.lateral_hw[b] for b in lat_rows]
        offsets = torch.cat([plan.frontal_off, plan.lateral_off[lat_rows]])
        try:
            out = self._run(datas, hws, offsets)
        except RuntimeError as e:
            # a file passed the header check but failed to decode: find it with PIL, rebuild the pipeline
            log.warning("DALI failed on a batch (%s); locating the unreadable image(s)", str(e).splitlines()[0])
            self._pipe = None
            bad = [k for k, d in enumerate(datas) if not _decodes(d)]
            if not bad:
                raise
            nf = len(plan.frontal)
            plan = drop_rows(plan, [k for k in bad if k < nf], [lat_rows[k - nf] for k in bad if k >= nf],
                             self.bad, self.index, self.split)
            return None if plan is None else self._transform(plan)
        B = len(plan.rows)
        if self.in_graph:
            imgs = self._to_torch_dense(out)
        else:
            from ..ops_image import resize_pad_crop_normalize

            imgs = resize_pad_crop_normalize(self._to_torch_list(out), self.img_size, self.resize_to, offsets,
                                             self.filter)
        return assemble_batch(self.index, plan, imgs[:B], imgs[B:], self.tokenizer)


def _decodes(data: bytes) -> bool:
    import io

    from PIL import Image

    try:
        Image.open(io.BytesIO(data)).load()
        return True
    except Exception:
        return False
