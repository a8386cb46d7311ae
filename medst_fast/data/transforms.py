"""Image transforms of medst-spec §3.6 (docs/interfaces.md "Transforms").

Resize so the longer side is R = round(S*256/224) with area-like filtering, zero-pad centred to R x R,
random crop S (train) or centre crop S (eval), normalise (x/255 - 0.5)/0.5, one channel. The official code
resizes with cv2 INTER_AREA and truncates the shorter side (int); padding puts floor(pad/2) before and
ceil(pad/2) after. The random crop draws from torch's RNG so DataLoader worker seeding applies.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from PIL import Image

from .images import resize_longer


def resize_side(img_size: int) -> int:
    """R for crop size S: 256 for 224 (the official 256/224 ratio), 110 for 96."""
    return int(round(img_size * 256 / 224))


def resize_pad(img: Image.Image, side: int) -> np.ndarray:
    """Longer side -> ``side`` (area resize), zero-pad centred to (side, side). Returns uint8 (side, side)."""
    img = resize_longer(img, side)
    a = np.asarray(img, dtype=np.uint8)
    h, w = a.shape
    out = np.zeros((side, side), np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    out[top:top + h, left:left + w] = a
    return out


def crop_offsets(side: int, size: int, train: bool, generator: Optional[torch.Generator] = None) -> Tuple[int, int]:
    if side < size:
        raise ValueError(f"padded side {side} is smaller than the crop size {size}")
    if not train:
        # torchvision CenterCrop rounds (side - size) / 2
        off = int(round((side - size) / 2.0))
        return off, off
    top = int(torch.randint(0, side - size + 1, (1,), generator=generator))
    left = int(torch.randint(0, side - size + 1, (1,), generator=generator))
    return top, left


def normalize(a: np.ndarray) -> torch.Tensor:
    """uint8 (H, W) -> float32 (1, H, W) in [-1, 1]: (x/255 - 0.5)/0.5."""
    t = torch.from_numpy(np.ascontiguousarray(a)).to(torch.float32)
    return (t / 255.0 - 0.5).div_(0.5).unsqueeze(0)


class ImageTransform:
    """PIL grayscale image -> float32 (1, S, S) tensor, per §3.6."""

    def __init__(self, img_size: int = 224, train: bool = True):
        self.img_size = int(img_size)
        self.side = resize_side(self.img_size)
        self.train = bool(train)

    def __call__(self, img: Image.Image, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        a = resize_pad(img, self.side)
        top, left = crop_offsets(self.side, self.img_size, self.train, generator)
        return normalize(a[top:top + self.img_size, left:left + self.img_size])

    def __repr__(self) -> str:
        return f"ImageTransform(img_size={self.img_size}, resize={self.side}, train={self.train})"


def absent_view(img_size: int) -> torch.Tensor:
    """The image used for a missing lateral: all zeros in normalised space (mid-grey), as the official."""
    return torch.zeros(1, img_size, img_size, dtype=torch.float32)
