"""Input pipeline: the trainer's loader per back-end against its PIL path, and the batched transform op against
the per-image PyTorch path, in the same run.

Run:  pytest benchmarks/bench_loader.py --benchmark [--bench-csv PATH] [--bench-quick]
      python benchmarks/bench_loader.py [--quick] [--csv PATH]

Rows (ratio = ours / PIL, same CPU budget: ``min(8, CPUs)`` PIL worker processes or reader threads):
* ``loader 256px cache``: studies/s of ``build_series_loader`` over 256-px JPEGs (what ``prepare`` caches),
  half the studies with a lateral, one epoch after a warm-up batch (worker start-up counts, as in training);
* ``loader full-size``: images/s (frontal + laterals decoded and resized) over ~3000 x 2500 JPEGs, the
  uncached MIMIC-CXR-JPG case;
* ``resize op``: ms for 256 decoded images of 200-520 px, ``medst_fast::resize_pad_crop_normalize`` against
  ``resize_pad_crop_normalize_ref``.
Back-ends: DALI and torchvision decode (+ the op) on the CPU, and on CUDA when there is a GPU ("mixed"
DALI, nvJPEG). All outputs are fp32 (1, S, S) by the same transform definition.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Dict, List, Tuple

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import format_table, quick, row  # noqa: E402

CUDA = torch.cuda.is_available()
CPUS = max(1, min(8, os.cpu_count() or 1))


def sizes() -> Dict[str, int]:
    if quick():
        return {"studies": 48, "full_studies": 6, "batch_series": 4, "op_images": 32}
    return {"studies": 1024, "full_studies": 32, "batch_series": 16, "op_images": 256}


# -- data ---------------------------------------------------------------------------------------------------------
def synthetic_jpegs(folder: str, n: int, size: Tuple[int, int], seed: int = 0) -> List[str]:
    """Smooth random grey images with noise (chest-X-ray-like JPEG sizes), varied aspect ratio."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = size
        w = int(w * rng.uniform(0.8, 1.0))
        small = rng.integers(0, 256, (max(2, h // 32), max(2, w // 32)), dtype=np.uint8)
        img = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR), np.float32)
        img = np.clip(img + rng.normal(0, 6, (h, w)), 0, 255).astype(np.uint8)
        p = os.path.join(folder, f"img{i:05d}.jpg")
        Image.fromarray(img).save(p, quality=95)
        paths.append(p)
    return paths


def write_index(out: str, frontals: List[str], laterals: List[str]) -> str:
    """Studies in series of 4; every second study has a lateral."""
    from medst_fast.data.index import SeriesIndex, Study

    studies = []
    for i, fr in enumerate(frontals):
        la = laterals[i % len(laterals)] if i % 2 == 0 else ""
        studies.append(Study(row=i, subject_id=str(i // 4), study_id=f"s{i}", split="train", order=i % 4,
                             study_datetime="", frontal_path=fr, lateral_path=la, frontal_dicom="",
                             lateral_dicom="", text="the lungs are clear. no effusion.", n_tokens=0))
    series = [list(range(i, min(i + 4, len(studies)))) for i in range(0, len(studies), 4)]
    SeriesIndex(studies, {"train": series}, {"image_root": "/", "source": "bench", "mode": "study"}).save(out)
    return out


# -- loader throughput -------------------------------------------------------------------------------------------
def backends() -> List[Tuple[str, dict]]:
    """(label, build_series_loader kwargs) of every back-end this machine runs; PIL first (the baseline)."""
    from medst_fast.data.loaders import dali_missing

    b = [("pil", dict(backend="pil", device="cpu"))]
    has_dali = dali_missing() is None
    if has_dali:
        b.append(("dali-cpu", dict(backend="dali", device="cpu")))
    b.append(("tv-cpu+op", dict(backend="nvjpeg", device="cpu")))
    if CUDA:
        if has_dali:
            b.append(("dali-gpu+op", dict(backend="dali", device="cuda")))
        b.append(("nvjpeg+op", dict(backend="nvjpeg", device="cuda")))
    return b


def time_loader(index: str, kw: dict, img_size: int, batch_series: int) -> Dict[str, float]:
    from medst_fast.data.loaders import build_series_loader

    loader = build_series_loader(index_or_dir=index, split="train", tokenizer=None, img_size=img_size,
                                 batch_series=batch_series, train=True, workers=CPUS, seed=0, **kw)
    loader.set_epoch(0)
    next(iter(loader))  # warm-up: pipeline build, page cache, lazy imports
    sync = torch.cuda.synchronize if CUDA else (lambda: None)
    loader.set_epoch(1)
    t0 = time.perf_counter()
    studies = images = 0
    for batch in loader:
        b = len(batch["study_id"])
        studies += b
        images += b + int(batch["has_lateral"].sum())
    sync()  # the device work of the last batch counts
    dt = time.perf_counter() - t0
    if sum(loader.bad.values()):
        raise AssertionError(f"{kw['backend']}: unexpected bad images {dict(loader.bad)}")
    return {"studies/s": studies / dt, "images/s": images / dt}


def loader_rows(tmp: str, img_size: int = 224, cached: bool = True, full_size: bool = True) -> List[dict]:
    n = sizes()
    data = []
    if cached:
        small = synthetic_jpegs(os.path.join(tmp, "syn256"), 64, (256, 256))
        data.append(("loader 256px cache", write_index(os.path.join(tmp, "i256"),
                                                       [small[i % 48] for i in range(n["studies"])], small[48:]),
                     "studies/s", n["batch_series"], n["studies"]))
    if full_size:  # ~3000 x 2500 JPEG synthesis is CPU work: left out where the time is a GPU's
        big = synthetic_jpegs(os.path.join(tmp, "synfull"), 8, (3000, 2500), seed=1)
        data.append(("loader full-size", write_index(os.path.join(tmp, "ifull"),
                                                     [big[i % 6] for i in range(n["full_studies"])], big[6:]),
                     "images/s", max(1, n["full_studies"] // 8), n["full_studies"]))
    rows = []
    for name, index, unit, bs, studies in data:
        shape = f"{studies} studies, {bs} series/batch, S={img_size}, {CPUS} workers"
        measured = [(label, time_loader(index, kw, img_size, bs)[unit]) for label, kw in backends()]
        (base, base_v), others = measured[0], measured[1:]
        rows += [row("loader", name, shape, unit, base, base_v, label, v, "fp32") for label, v in others]
        if not CUDA:
            print("SKIP (needs CUDA): loader back-ends nvjpeg+op and dali-gpu+op (GPU decode)")
    return rows


# -- the op against the per-image path ----------------------------------------------------------------------------
def op_rows(device: str) -> List[dict]:
    from medst_fast import ext
    from medst_fast import ops_image as oi

    if not ext.load() or (device == "cuda" and not ext.has_cuda()):
        return []
    n = sizes()["op_images"]
    g = torch.Generator().manual_seed(0)
    hw = torch.randint(200, 520, (n, 2), generator=g)
    imgs = [torch.randint(0, 256, (int(h), int(w)), dtype=torch.uint8, generator=g).to(device) for h, w in hw]
    off = torch.tensor([oi.crop_offsets(256, 224, True, g) for _ in range(n)])
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def t(fn, reps=3):
        fn()
        sync()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts)) * 1e3

    ref = t(lambda: oi.resize_pad_crop_normalize_ref(imgs, 224, 256, off))
    op = t(lambda: oi.resize_pad_crop_normalize(imgs, 224, 256, off, use_ext=True))
    return [row("loader", f"resize op ({device})", f"{n} images 200-520 px -> 224", "ms", "per-image PyTorch", ref,
                "medst_fast::resize_pad_crop_normalize", op, "fp32")]


def run() -> List[dict]:
    rows = []
    for dev in ["cpu"] + (["cuda"] if CUDA else []):
        rows += op_rows(dev)
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        rows += loader_rows(tmp)
    return rows


def test_bench_loader_256px_cache(bench_results):
    """The device check's loader stage: studies/s from the 256-px JPEGs prepare caches."""
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        rows = loader_rows(tmp, full_size=False)
    bench_results.add(rows)
    assert rows and all(r["ours_value"] > 0 for r in rows)


def test_bench_loader_full_size_and_op(bench_results):
    rows = [r for dev in ["cpu"] + (["cuda"] if CUDA else []) for r in op_rows(dev)]
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        rows += loader_rows(tmp, cached=False)
    bench_results.add(rows)
    assert rows and all(r["ours_value"] > 0 for r in rows)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--csv", default=None)
    a = ap.parse_args()
    if a.quick:
        os.environ["MEDST_BENCH_QUICK"] = "1"
    out = run()
    print("\n".join(format_table(out)))
    if a.csv:
        from _common import Results

        Results(a.csv).add(out)
