"""The image transform of docs/method.md §4.6, defined once (docs/interfaces.md "Transforms").

Every path that turns a decoded grey image into model input follows this module: the trainer's PIL dataset
(``ImageTransform``), the evaluation (``eval_transform``, a centre crop of the same pipeline), the batched
op ``medst_fast.ops_image.resize_pad_crop_normalize`` (its C++/CUDA kernels and its PyTorch reference) and
the DALI / nvJPEG loaders, which feed that op.

1. Resize so the longer side is R = ``resize_side(S)`` = round(S*256/224) (256 for S=224, 110 for S=96).
   Geometry as the official ``resize_img``: if H >= W the height becomes R and the width int(W * (R/H)),
   else the width becomes R and the height int(H * (R/W)) (truncated, the same float64 product).
   Resampling: exact area averaging (cv2 INTER_AREA when shrinking), ``area_weights_np``.
2. Zero-pad centred to R x R: floor(pad/2) before, ceil(pad/2) after (``resize_geometry``).
3. Crop S x S at ``crop_offsets``: uniform (torchvision RandomCrop) when training, round((R-S)/2)
   (torchvision CenterCrop) otherwise. Frontal and lateral are cropped independently.
4. Normalise (x/255 - 0.5)/0.5, one channel.

This module imports only numpy and torch (PIL lazily), because ``medst_fast.ops_image`` and
``medst_fast.data.images`` build on it and must not import each other in a circle.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch


# -- geometry -------------------------------------------------------------------------------------------------
def resize_side(img_size: int) -> int:
    """R for crop size S: 256 for 224 (the official 256/224 ratio), 110 for 96."""
    return int(round(int(img_size) * 256 / 224))


def resize_geometry(h: int, w: int, side: int) -> Tuple[int, int, int, int]:
    """(h', w', top, left): the resized image's size and its place in the zero ``side`` x ``side`` canvas."""
    if h <= 0 or w <= 0:
        raise ValueError(f"image has an empty side: height={h}, width={w}")
    if h >= w:
        nh, nw = side, max(1, int(w * (side / h)))
    else:
        nh, nw = max(1, int(h * (side / w))), side
    return nh, nw, (side - nh) // 2, (side - nw) // 2


def center_offset(side: int, size: int) -> int:
    """torchvision CenterCrop's origin (Python round: half to even)."""
    return int(round((side - size) / 2.0))


def crop_offsets(side: int, size: int, train: bool, generator: Optional[torch.Generator] = None) -> Tuple[int, int]:
    """(top, left) of the S x S crop in the R x R canvas.

    Training draws top, then left, each with ``torch.randint(0, R-S+1, (1,))`` from ``generator`` (the
    global torch RNG when None, which the trainer seeds per series). Every loader draws in this order, so
    the same seed gives the same crops whichever back-end decodes the image.
    """
    if side < size:
        raise ValueError(f"padded side {side} is smaller than the crop size {size}")
    if not train:
        off = center_offset(side, size)
        return off, off
    top = int(torch.randint(0, side - size + 1, (1,), generator=generator))
    left = int(torch.randint(0, side - size + 1, (1,), generator=generator))
    return top, left


# -- resampling ------------------------------------------------------------------------------------------------
def area_overlap_np(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) integer overlaps of [o*in, (o+1)*in) and [k*out, (k+1)*out); each row sums to ``in_size``."""
    o = np.arange(out_size, dtype=np.int64)[:, None]
    k = np.arange(in_size, dtype=np.int64)[None, :]
    lo = np.maximum(o * in_size, k * out_size)
    hi = np.minimum((o + 1) * in_size, (k + 1) * out_size)
    return np.clip(hi - lo, 0, None)


def area_weights_np(in_size: int, out_size: int, dtype=np.float64) -> np.ndarray:
    """(out, in) exact area-averaging matrix: the overlaps divided by ``in_size``.

    numpy, so it is safe inside forked DataLoader workers (torch's inherited intra-op pool can deadlock).
    """
    return (area_overlap_np(in_size, out_size) / in_size).astype(dtype)


def area_resize_u8(a: np.ndarray, nh: int, nw: int) -> np.ndarray:
    """uint8 (H, W) -> uint8 (nh, nw) by exact area averaging, rounded half to even.

    Integer overlaps in float64: every partial sum is an integer below 2**53 (<= 255*H*W), so the products
    are exact whatever the BLAS thread count or summation order and the rounding is reproducible across
    processes. Same arithmetic as ``medst_fast.data.images.resize_longer`` (the prepared cache)."""
    h, w = a.shape
    if (h, w) == (nh, nw):
        return a
    t = area_overlap_np(h, nh).astype(np.float64) @ a.astype(np.float64) @ area_overlap_np(w, nw).astype(np.float64).T
    return np.clip(np.rint(t / float(h * w)), 0, 255).astype(np.uint8)


def as_gray_u8(img) -> np.ndarray:
    """A PIL grey image or a 2-D uint8 array -> C-contiguous uint8 (H, W)."""
    a = np.asarray(img)
    if a.dtype != np.uint8 or a.ndim != 2:
        raise ValueError(f"expected an 8-bit grey image (H, W), got dtype {a.dtype} and shape {a.shape} "
                         "(decode with medst_fast.data.images.load_gray first)")
    return np.ascontiguousarray(a)


def resize_pad(img, side: int) -> np.ndarray:
    """Steps 1-2: longer side -> ``side`` (area), zero-pad centred. PIL 'L' image or uint8 (H, W) -> uint8 (side, side)."""
    a = as_gray_u8(img)
    nh, nw, top, left = resize_geometry(a.shape[0], a.shape[1], side)
    out = np.zeros((side, side), np.uint8)
    out[top:top + nh, left:left + nw] = area_resize_u8(a, nh, nw)
    return out


# -- normalisation -----------------------------------------------------------------------------------------------
def normalize_pixels(x: torch.Tensor) -> torch.Tensor:
    """Step 4 on float pixel values in [0, 255] (any shape): (x/255 - 0.5)/0.5."""
    return (x / 255.0 - 0.5) / 0.5


def normalize(a: np.ndarray) -> torch.Tensor:
    """uint8 (H, W) -> float32 (1, H, W) in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(a)).to(torch.float32)
    return normalize_pixels(t).unsqueeze(0)


# -- the whole pipeline --------------------------------------------------------------------------------------------
def transform_u8(img, img_size: int, offset: Tuple[int, int]) -> torch.Tensor:
    """Steps 1-4 with the crop origin given: grey image -> float32 (1, S, S)."""
    top, left = offset
    a = resize_pad(img, resize_side(img_size))
    return normalize(a[top:top + img_size, left:left + img_size])


def eval_transform(img, img_size: int) -> torch.Tensor:
    """Evaluation = the training pipeline with the centre crop."""
    side = resize_side(img_size)
    return transform_u8(img, img_size, crop_offsets(side, img_size, train=False))


class ImageTransform:
    """Grey image (PIL or uint8 array) -> float32 (1, S, S): random crop when ``train``, centre crop otherwise."""

    def __init__(self, img_size: int = 224, train: bool = True):
        self.img_size = int(img_size)
        self.side = resize_side(self.img_size)
        self.train = bool(train)

    def __call__(self, img, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        # the offsets are drawn after the decode, as every loader does (a failed decode draws nothing)
        a = resize_pad(img, self.side)
        top, left = crop_offsets(self.side, self.img_size, self.train, generator)
        return normalize(a[top:top + self.img_size, left:left + self.img_size])

    def __repr__(self) -> str:
        return f"ImageTransform(img_size={self.img_size}, resize={self.side}, train={self.train})"


def absent_view(img_size: int) -> torch.Tensor:
    """The image used for a missing lateral: all zeros in normalised space (mid-grey), as the official."""
    return torch.zeros(1, img_size, img_size, dtype=torch.float32)


# -- preprocessing --------------------------------------------------------------------------------------------
PREPROCESS = "preprocessor_config.json"


def preprocess_config(img_size: int) -> dict:
    """The image preprocessing of a model with input size ``img_size``, as ``save_pretrained`` records it.

    Every number follows this module's transform (the one transform definition): longer side to
    ``resize_side`` by exact area averaging, zero-pad centred to a square, crop (random when training, centre
    otherwise), then (x/255 - mean)/std on one grey channel.
    """
    return {"image_size": int(img_size), "resize_side": resize_side(img_size), "resize": "longer_side_area",
            "pad": "centre_zero", "train_crop": "random", "eval_crop": "centre", "channels": 1,
            "pixel_scale": 255.0, "mean": 0.5, "std": 0.5}


def check_preprocess_config(d: dict, source: str) -> int:
    """Validate a recorded preprocessing against what this version implements; returns the image size.

    A folder whose preprocessing differs (another resize side or normalisation) cannot be served by these
    transforms, and feeding it differently prepared pixels would give wrong embeddings without an error.
    """
    if not isinstance(d, dict) or not isinstance(d.get("image_size"), int) or isinstance(d.get("image_size"), bool):
        raise ValueError(f"{source}: field 'image_size' must be an integer")
    want = preprocess_config(d["image_size"])
    for k, v in d.items():
        if k not in want:
            raise ValueError(f"{source}: unknown field {k!r} (known: {sorted(want)})")
        if v != want[k]:
            raise ValueError(f"{source}: field {k!r} is {v!r}, but medst_fast's transform uses {want[k]!r} for "
                             f"image_size {d['image_size']}; this version cannot reproduce that preprocessing")
    return d["image_size"]
