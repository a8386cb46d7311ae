"""The Med-ST image transform as one batched op: resize the longer side to R, zero-pad to R x R, crop S x S,
normalise.

The transform is defined in ``medst_fast.data.transforms`` (geometry, crop origins, area weights,
normalisation); this module is its batched form for decoded images, and re-exports those pieces. What
is specific to the op:

* resampling is separable, in float32, without rounding to uint8 in between (the PIL path rounds once
  after resizing, so the two agree within half a grey level):
    - ``"area"`` (default): exact area averaging (cv2 INTER_AREA, as the official code), the weights of
      ``area_weights_np``;
    - ``"bilinear"``: antialiased triangle filter, exactly ``F.interpolate(mode="bilinear", antialias=True,
      align_corners=False)`` (= PIL BILINEAR, = DALI INTERP_LINEAR with antialias). The DALI graph can do
      only this one; ``medst_fast.data.dali_pipeline`` uses it when asked for it.
* crop origins come in as a (B, 2) tensor (or list) of ``crop_offsets`` results, one per image.

``resize_pad_crop_normalize`` runs the C++/CUDA op ``medst_fast::resize_pad_crop_normalize`` (one kernel
launch per batch on CUDA) when ``medst_fast._C`` is built, else ``resize_pad_crop_normalize_ref``, a per
image PyTorch path that is the reference the op is tested against.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

# The transform's definition (geometry, crop origins, area weights, normalisation) lives in one module;
# it is re-exported here because this op is its batched form.
from . import ext
from .data.transforms import (area_overlap_np, area_weights_np, center_offset, crop_offsets,  # noqa: F401
                              normalize_pixels, resize_geometry, resize_side)

log = logging.getLogger("medst_fast")

FILTERS = {"area": 0, "bilinear": 1}


def area_weights(in_size: int, out_size: int, dtype=torch.float64) -> torch.Tensor:
    """Torch view of :func:`medst_fast.data.transforms.area_weights_np` (one definition for every backend)."""
    return torch.from_numpy(area_weights_np(in_size, out_size)).to(dtype)


def _as_2d_uint8(img: torch.Tensor, i: int) -> torch.Tensor:
    if img.dtype != torch.uint8:
        raise TypeError(f"images[{i}]: dtype {img.dtype}, expected torch.uint8 (a decoded grey image)")
    if img.dim() == 3 and img.shape[0] == 1:
        img = img[0]
    if img.dim() != 2:
        raise ValueError(f"images[{i}]: shape {tuple(img.shape)}, expected (H, W) or (1, H, W)")
    return img


def resize_pad_crop_normalize_ref(images: Sequence[torch.Tensor], out_size: int, resize_to: int,
                                  offsets: torch.Tensor, filter: str = "area") -> torch.Tensor:
    """Per-image PyTorch reference. images: list of uint8 (H_i, W_i) or (1, H_i, W_i). -> float32 (B, 1, S, S)."""
    if filter not in FILTERS:
        raise ValueError(f"filter={filter!r}, expected one of {sorted(FILTERS)}")
    offsets = _check_offsets(offsets, len(images), resize_to, out_size)
    device = images[0].device if len(images) else torch.device("cpu")
    out = torch.empty(len(images), 1, out_size, out_size, dtype=torch.float32, device=device)
    for i, img in enumerate(images):
        img = _as_2d_uint8(img, i)
        h, w = img.shape
        nh, nw, top, left = resize_geometry(h, w, resize_to)
        x = img.to(torch.float32)
        if filter == "area":
            wy = area_weights(h, nh).to(device=device, dtype=torch.float32)
            wx = area_weights(w, nw).to(device=device, dtype=torch.float32)
            r = wy @ x @ wx.t()
        else:
            r = F.interpolate(x[None, None], size=(nh, nw), mode="bilinear", align_corners=False,
                              antialias=True)[0, 0]
        canvas = torch.zeros(resize_to, resize_to, dtype=torch.float32, device=device)
        canvas[top:top + nh, left:left + nw] = r
        y0, x0 = int(offsets[i, 0]), int(offsets[i, 1])
        out[i, 0] = normalize_pixels(canvas[y0:y0 + out_size, x0:x0 + out_size])
    return out


def _check_offsets(offsets, n: int, resize_to: int, out_size: int) -> torch.Tensor:
    offsets = torch.as_tensor(offsets, dtype=torch.long).cpu()
    if offsets.numel() == 0:
        offsets = offsets.reshape(0, 2)
    if offsets.shape != (n, 2):
        raise ValueError(f"offsets: shape {tuple(offsets.shape)}, expected ({n}, 2) (y0, x0) per image")
    if n and (offsets.min() < 0 or offsets.max() > resize_to - out_size):
        raise ValueError(f"offsets: crop origins must lie in [0, {resize_to - out_size}] "
                         f"(R={resize_to}, S={out_size})")
    return offsets


_warned = set()


def _log_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        log.info(msg)


def resize_pad_crop_normalize(images: Sequence[torch.Tensor], out_size: int, resize_to: int,
                              offsets: torch.Tensor, filter: str = "area",
                              use_ext: Optional[bool] = None) -> torch.Tensor:
    """Batched Med-ST transform of decoded grey images (see module docstring).

    Args:
        images: list of uint8 tensors (H_i, W_i) or (1, H_i, W_i), all on one device (torchvision's
            ``decode_jpeg`` output can be passed as is).
        out_size: S. resize_to: R (>= S). offsets: (B, 2) crop origins (y0, x0), one ``crop_offsets``
            result per image.
        filter: "area" (default, cv2 INTER_AREA) or "bilinear" (antialiased, = F.interpolate).
        use_ext: force (True) or forbid (False) the compiled op; None uses it when it is built.
    Returns:
        float32 (B, 1, S, S) on the images' device.
    """
    if filter not in FILTERS:
        raise ValueError(f"filter={filter!r}, expected one of {sorted(FILTERS)}")
    images = [_as_2d_uint8(im, i).contiguous() for i, im in enumerate(images)]
    if len(images) == 0:
        return torch.empty(0, 1, out_size, out_size)
    devices = {im.device for im in images}
    if len(devices) != 1:
        raise ValueError(f"images: all images must be on one device, got {sorted(map(str, devices))}")
    offsets = _check_offsets(offsets, len(images), resize_to, out_size)
    op = ext.op("resize_pad_crop_normalize") if use_ext is not False else None
    if op is None:
        if use_ext:
            raise RuntimeError("use_ext=True but medst_fast._C is not built: " + ext.load_error())
        _log_once("resize_pad_crop_normalize: using the per-image PyTorch path (medst_fast._C not loaded)")
        return resize_pad_crop_normalize_ref(images, out_size, resize_to, offsets, filter)
    dev = images[0].device
    if dev.type == "cuda" and not ext.has_cuda():
        if use_ext:
            raise RuntimeError("use_ext=True but medst_fast._C was built without CUDA")
        _log_once("resize_pad_crop_normalize: medst_fast._C has no CUDA kernel; using the PyTorch path on GPU")
        return resize_pad_crop_normalize_ref(images, out_size, resize_to, offsets, filter)
    if use_ext:  # forced (the op's own tests): its errors are the answer
        return op(images, offsets, resize_to, out_size, FILTERS[filter])
    # ext.call: a GPU the extension has no kernel for (built for other architectures) takes the PyTorch path
    return ext.call(op, (images, offsets, resize_to, out_size, FILTERS[filter]),
                    lambda: resize_pad_crop_normalize_ref(images, out_size, resize_to, offsets, filter), dev)

