"""Image reading helpers: grayscale decode with JPEG draft mode, area resize, atomic JPEG writes, DICOM.

Full-size MIMIC-CXR JPEGs are ~2500x3000 and decode at ~100 img/s per core. libjpeg can decode directly at
1/2, 1/4 or 1/8 scale (DCT scaling, PIL's ``Image.draft``), which skips most of the IDCT work when the
target is 256 px. Draft only picks a scale >= the requested size, so the final area resize still produces
exactly the requested size.
"""
from __future__ import annotations

import logging
import os
from typing import Optional, Tuple

import numpy as np
from PIL import Image

from ..files import atomic_writer
from .transforms import area_resize_u8

log = logging.getLogger("medst_fast")


class ImageReadError(RuntimeError):
    """An image file is missing, truncated or not decodable. The message names the file."""


def open_gray(path: str, draft_longer: Optional[int] = None) -> Image.Image:
    """Decode ``path`` to an 8-bit grayscale PIL image, fully loaded (truncation errors surface here).

    Args:
        draft_longer: if set and the file is a JPEG, let libjpeg decode at the smallest DCT scale whose
            longer side is still >= this many pixels.
    """
    try:
        img = Image.open(path)
        if draft_longer is not None and img.format == "JPEG":
            w, h = img.size
            # draft() keeps each side >= the requested box; ask for the box that keeps the longer side >= target
            scale = draft_longer / max(w, h)
            img.draft("L", (max(1, int(np.ceil(w * scale))), max(1, int(np.ceil(h * scale)))))
        img.load()
    except FileNotFoundError:
        raise ImageReadError(f"{path}: image file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"{path}: unreadable or corrupt image ({e})") from None
    return to_gray8(img, path)


def to_gray8(img: Image.Image, path: str = "<image>") -> Image.Image:
    if img.mode == "L":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit PNGs (some datasets ship them): scale the full range to 8 bits, as cv2 IMREAD_GRAYSCALE would not;
        # dividing by the maximum keeps the image visible whatever its bit depth.
        a = np.asarray(img, dtype=np.float32)
        mx = float(a.max()) or 1.0
        return Image.fromarray(np.clip(a * (255.0 / mx), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "P", "PA"):
        img = img.convert("RGBA").convert("RGB")
    try:
        return img.convert("L")
    except (OSError, ValueError) as e:
        raise ImageReadError(f"{path}: cannot convert mode {img.mode} to grayscale ({e})") from None


def resize_longer(img: Image.Image, longer: int) -> Image.Image:
    """Resize so the longer side is ``longer`` by exact area averaging (cv2 INTER_AREA when shrinking).

    The resampling is ``transforms.area_resize_u8``, the one definition the PIL loader, the cache written
    by prepare and the batched GPU/extension op share. The shorter side is truncated, int(side * scale), as
    the official ``resize_img`` does; resizing an image that already has the target longer side is then a
    no-op (a cached image is not resampled twice)."""
    w, h = img.size
    s = longer / max(w, h)
    nw, nh = (longer, max(1, int(h * s))) if w >= h else (max(1, int(w * s)), longer)
    if (nw, nh) == (w, h):
        return img
    return Image.fromarray(area_resize_u8(np.asarray(img, dtype=np.uint8), nh, nw), mode="L")


def read_resized(path: str, longer: int, draft: bool = True) -> Image.Image:
    """Decode (draft-mode when ``draft``; DICOM too) and resize so the longer side is exactly ``longer``."""
    return resize_longer(load_gray(path, draft_longer=longer if draft else None), longer)


def save_jpeg_atomic(img: Image.Image, path: str, quality: int = 95) -> None:
    """Write a JPEG through a temp file + rename: a killed writer never leaves a truncated file at ``path``."""
    # clean=False: a cache folder holds thousands of files; open_cache removes stale temps once per run
    with atomic_writer(path, "wb", clean=False) as f:
        img.save(f, format="JPEG", quality=quality)


DICOM_EXTS = (".dcm", ".dicom")


def has_dicm_marker(path: str) -> bool:
    """True when the file carries the DICOM Part 10 marker: the bytes 'DICM' after the 128-byte preamble."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False  # a missing or unreadable file: the decoder that opens it names the problem


def is_dicom(path: str) -> bool:
    """The one DICOM rule: the extension (.dcm / .dicom) or the 'DICM' marker at byte 128. Both, because RSNA-
    style exports may carry no extension, and a named .dcm that is something else deserves a DICOM error."""
    return path.lower().endswith(DICOM_EXTS) or has_dicm_marker(path)


def read_dicom_gray(path: str) -> Image.Image:
    """DICOM -> 8-bit grayscale the way the RSNA preprocessing does (docs/method.md §4.6): scale by 255/max, invert
    MONOCHROME1 so that bone is always bright."""
    try:
        import pydicom
    except ImportError as e:
        raise ImportError("reading DICOM needs the optional 'pydicom' package: pip install pydicom") from e
    if not os.path.isfile(path):
        raise ImageReadError(f"{path}: DICOM file not found")
    if not has_dicm_marker(path):  # pydicom's own error here suggests force=True, which would only read garbage
        raise ImageReadError(f"{path}: not a DICOM file (no 'DICM' marker at byte 128)")
    try:
        ds = pydicom.dcmread(path)
        a = ds.pixel_array.astype(np.float32)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: DICOM file not found") from None
    except Exception as e:  # pydicom raises many types for broken files
        raise ImageReadError(f"{path}: unreadable DICOM ({type(e).__name__}: {e})") from None
    mx = float(a.max()) or 1.0
    a = a * (255.0 / mx)
    if str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        a = 255.0 - a
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def load_gray(path: str, draft_longer: Optional[int] = None) -> Image.Image:
    """THE image reader: any path (JPEG, PNG 8/16-bit, RGBA, ..., DICOM) -> 8-bit grayscale PIL image.

    Every reader of the project (training loaders, cache, evaluation, embedding, the drop-in ``Preprocess``)
    decodes through here, so a file reads the same everywhere. DICOM by ``is_dicom``; anything else by PIL
    (``draft_longer``: JPEG draft-mode decoding, see ``open_gray``). Raises ImageReadError naming the file.
    """
    if is_dicom(path):
        return read_dicom_gray(path)
    return open_gray(path, draft_longer=draft_longer)


def image_size(path: str) -> Tuple[int, int]:
    """(width, height) from the header only."""
    with Image.open(path) as im:
        return im.size
