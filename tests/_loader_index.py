"""Small prepared indexes (docs/interfaces.md format) for the loader tests.

``build_index``: over the real covid-cxr images. Studies are (patient, day) groups of the manifest with a
frontal view; the first lateral of the same group is the study's lateral. Series are per patient in day
order, cut into chunks of 4.

``mixed_format_index``: generated images in every format a prepared index can hold (JPEG grey/RGB/
progressive/CMYK, PNG 8-bit/16-bit/RGBA/palette, DICOM MONOCHROME1/2), plus a truncated JPEG and a
missing file, in full and short series with and without laterals.
"""
import csv
import os
from collections import defaultdict

import numpy as np

from medst_fast.data.index import SeriesIndex, Study


def build_index(covid_dir, out_dir, max_studies=40, split="test", extra=()):
    """Write the index to out_dir; ``extra`` = [(frontal_abs_path, lateral_abs_path_or_"")] appended as one
    more series (used for corrupt files). Returns the SeriesIndex."""
    groups = defaultdict(lambda: {"frontal": [], "lateral": []})
    with open(os.path.join(covid_dir, "manifest.csv"), newline="") as f:
        for r in csv.DictReader(f):
            if r["view_kind"] in ("frontal", "lateral"):
                day = float(r["offset_days"]) if r["offset_days"] else 0.0
                groups[(r["patient_id"], day)][r["view_kind"]].append(os.path.join(covid_dir, r["file"]))
    per_patient = defaultdict(list)
    for (pid, day), g in sorted(groups.items()):
        if g["frontal"]:
            per_patient[pid].append((day, g["frontal"][0], g["lateral"][0] if g["lateral"] else ""))
    # patients with many studies and with laterals first, so a small index has full series and laterals
    pids = sorted(per_patient, key=lambda p: (-len(per_patient[p]), -sum(bool(x[2]) for x in per_patient[p]), p))
    studies, series = [], []
    for pid in pids:
        chunk = []
        for k, (day, fr, la) in enumerate(per_patient[pid]):
            if len(studies) >= max_studies:
                break
            studies.append(_study(len(studies), pid, f"p{pid}_d{day:g}", k, fr, la, split))
            chunk.append(len(studies) - 1)
            if len(chunk) == 4:
                series.append(chunk)
                chunk = []
        if chunk:
            series.append(chunk)
    if extra:
        chunk = []
        for fr, la in extra:
            studies.append(_study(len(studies), "x", f"x{len(studies)}", 0, fr, la, split, text="extra study"))
            chunk.append(len(studies) - 1)
        series.append(chunk)
    return SeriesIndex(studies, {split: series}, {"image_root": covid_dir, "source": "covid-cxr test",
                                                   "mode": "study"}).save(out_dir)


def _study(row, pid, sid, order, fr, la, split, text=None):
    return Study(row=row, subject_id=str(pid), study_id=sid, split=split, order=order, study_datetime="",
                 frontal_path=fr, lateral_path=la, frontal_dicom="", lateral_dicom="",
                 text=text or f"study {row} of patient {pid}: the lungs are clear", n_tokens=0)


# -- generated images in every format ------------------------------------------------------------------------------
def chest_like(h, w, seed=0, dtype=np.uint8, peak=255):
    """A smooth random image with some texture (JPEG-friendly), values in [0, peak]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    a = 0.5 + 0.3 * np.sin(6 * xx + rng.uniform(0, 6)) * np.cos(4 * yy + rng.uniform(0, 6))
    a += 0.15 * np.exp(-((xx - 0.5) ** 2 + (yy - 0.5) ** 2) * 20) + rng.normal(0, 0.03, (h, w))
    return np.clip(np.rint(a * peak), 0, peak).astype(dtype)


def write_dicom(path, arr, mono1=False):
    """A minimal uncompressed 16-bit DICOM (pydicom needed)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 12, 11, 0
    ds.PhotometricInterpretation = "MONOCHROME1" if mono1 else "MONOCHROME2"
    ds.PixelData = np.ascontiguousarray(arr.astype(np.uint16)).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def write_format(path, kind, h, w, seed):
    """One image file of ``kind`` at ``path`` (its extension is the caller's)."""
    from PIL import Image

    g = chest_like(h, w, seed)
    if kind == "jpeg":
        Image.fromarray(g).save(path, quality=95)
    elif kind == "jpeg_progressive":
        Image.fromarray(g).save(path, quality=95, progressive=True)
    elif kind == "jpeg_rgb":
        Image.fromarray(np.stack([g, g, g], -1)).save(path, quality=95)
    elif kind == "jpeg_cmyk":
        Image.fromarray(np.stack([g, g, g], -1)).convert("CMYK").save(path, quality=95)
    elif kind == "png8":
        Image.fromarray(g).save(path)
    elif kind == "png16":
        Image.fromarray(chest_like(h, w, seed, np.uint16, 4000)).save(path)
    elif kind == "png_rgba":
        alpha = np.full_like(g, 200)
        Image.fromarray(np.stack([g, g, g, alpha], -1)).save(path)
    elif kind == "png_palette":
        Image.fromarray(g).convert("P").save(path)
    elif kind in ("dicom_mono1", "dicom_mono2"):
        write_dicom(path, chest_like(h, w, seed, np.uint16, 4000), mono1=kind == "dicom_mono1")
    elif kind == "truncated_jpeg":
        write_format(path, "jpeg", h, w, seed)
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    else:
        raise ValueError(kind)


EXT = {"png8": ".png", "png16": ".png", "png_rgba": ".png", "png_palette": ".png", "dicom_mono1": ".dcm",
       "dicom_mono2": ".dcm"}

# (frontal kind, lateral kind or None) per study, series by series: two full series and three short ones
MIXED_SERIES = [
    [("jpeg", "png8"), ("png16", None), ("dicom_mono2", "dicom_mono1"), ("png_rgba", "jpeg")],
    [("jpeg_rgb", None), ("jpeg_progressive", "png16"), ("png_palette", "jpeg_cmyk"), ("jpeg", "png_rgba")],
    [("dicom_mono1", "jpeg"), ("truncated_jpeg", "png8")],  # the truncated frontal drops its study
    [("jpeg", "missing"), ("png8", "truncated_jpeg")],     # missing / unreadable laterals -> absent views
    [("jpeg_cmyk", "dicom_mono2")],
]


def mixed_format_index(out_dir, split="train", sizes=((240, 200), (200, 256), (181, 301), (256, 256), (333, 97)),
                       repeat=1, layout=None):
    """Write the images and the index under ``out_dir`` (``layout`` as MIXED_SERIES, written ``repeat``
    times with new files); returns the index folder."""
    img_dir = os.path.join(out_dir, "images")
    os.makedirs(img_dir, exist_ok=True)
    studies, series, k = [], [], 0

    def image(kind):
        nonlocal k
        k += 1
        path = os.path.join(img_dir, f"{k:03d}_{kind}{EXT.get(kind, '.jpg')}")
        if kind != "missing":
            h, w = sizes[k % len(sizes)]
            write_format(path, kind, h, w, seed=k)
        return os.path.relpath(path, img_dir)

    for s, spec in enumerate(list(layout or MIXED_SERIES) * repeat):
        rows = []
        for t, (fr, la) in enumerate(spec):
            studies.append(_study(len(studies), f"m{s}", f"m{s}_{t}", t, image(fr), image(la) if la else "", split,
                                  text=f"series {s} study {t}: {fr} frontal" + (f" and {la} lateral" if la else "")))
            rows.append(len(studies) - 1)
        series.append(rows)
    index_dir = os.path.join(out_dir, "index")
    SeriesIndex(studies, {split: series}, {"image_root": img_dir, "source": "mixed formats", "mode": "study"}).save(index_dir)
    return index_dir
