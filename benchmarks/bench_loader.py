"""Input-pipeline throughput per backend, and the batched transform op against the per-image PyTorch path.

Run:  pytest benchmarks/bench_loader.py --benchmark -s      (rows appended to --bench-csv)
      python benchmarks/bench_loader.py [--studies 1024] [--full-studies 16] [--batch-series 16]
Backends: PIL DataLoader workers, DALI CPU (device_id=None), DALI GPU ("mixed"), torchvision decode_jpeg +
the extension op on CPU and on CUDA (nvJPEG). Data: the real covid-cxr JPEGs in ../shared/data (when
present), synthetic 256-px JPEGs (what a prepared cache holds) and synthetic MIMIC-size (3000 x 2500) JPEGs.
Each figure is one full epoch after a warm-up epoch: studies/s and images/s (frontal + present laterals).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:  # written by another module owner; keep this file usable without it
    from _common import append_rows, env_info
except ImportError:  # pragma: no cover
    def append_rows(path, rows):
        pass

    def env_info():
        return {"gpu_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                "torch": torch.__version__}

HERE = os.path.dirname(os.path.abspath(__file__))
COVID = os.path.abspath(os.path.join(HERE, "..", "..", "shared", "data", "covid-cxr"))


# -- data ---------------------------------------------------------------------------------------------------------
def _synthetic_jpegs(folder: str, n: int, size, seed: int = 0) -> List[str]:
    """Smooth random grey images (chest-X-ray-like JPEG sizes), varied aspect ratio."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = size
        w = int(w * rng.uniform(0.8, 1.0))
        small = rng.integers(0, 256, (max(2, h // 32), max(2, w // 32)), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        noise = rng.normal(0, 6, (h, w))
        img = Image.fromarray(np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8))
        p = os.path.join(folder, f"img{i:05d}.jpg")
        img.save(p, quality=95)
        paths.append(p)
    return paths


def _index(out: str, frontals: List[str], laterals: List[str], lateral_every: int = 2) -> str:
    """Studies in series of 4; every ``lateral_every``-th study has a lateral."""
    from medst_fast.data.index import SeriesIndex, Study

    studies = []
    for i, fr in enumerate(frontals):
        la = laterals[i % len(laterals)] if laterals and i % lateral_every == 0 else ""
        studies.append(Study(row=i, subject_id=str(i // 4), study_id=f"s{i}", split="train", order=i % 4,
                             study_datetime="", frontal_path=fr, lateral_path=la, frontal_dicom="",
                             lateral_dicom="", text="the lungs are clear. no effusion.", n_tokens=0))
    series = [list(range(i, min(i + 4, len(studies)))) for i in range(0, len(studies), 4)]
    SeriesIndex(studies, {"train": series}, {"image_root": "/", "source": "bench", "mode": "study"}).save(out)
    return out


def datasets(tmp: str, studies: int, full_studies: int) -> Dict[str, str]:
    out = {}
    if os.path.isfile(os.path.join(COVID, "manifest.csv")):
        import csv

        rows = list(csv.DictReader(open(os.path.join(COVID, "manifest.csv"))))
        fr = [os.path.join(COVID, r["file"]) for r in rows if r["view_kind"] == "frontal"]
        la = [os.path.join(COVID, r["file"]) for r in rows if r["view_kind"] == "lateral"]
        out["covid-cxr"] = _index(os.path.join(tmp, "covid"), (fr * (studies // len(fr) + 1))[:studies], la)
    imgs = _synthetic_jpegs(os.path.join(tmp, "syn256"), 64, (256, 256))
    out["synthetic-256px"] = _index(os.path.join(tmp, "i256"), [imgs[i % 48] for i in range(studies)], imgs[48:])
    if full_studies:
        big = _synthetic_jpegs(os.path.join(tmp, "synfull"), 8, (3000, 2500), seed=1)
        out["synthetic-3000x2500"] = _index(os.path.join(tmp, "ifull"), [big[i % 6] for i in range(full_studies)],
                                            big[6:])
    return out


# -- loader throughput -------------------------------------------------------------------------------------------
def backends() -> List[tuple]:
    cuda = torch.cuda.is_available()
    workers = max(1, (os.cpu_count() or 1))
    threads = max(1, (os.cpu_count() or 1))
    b = [("pil", dict(backend="pil", num_workers=workers), f"PIL DataLoader, {workers} workers")]
    try:
        import nvidia.dali  # noqa: F401

        b.append(("dali-cpu", dict(backend="dali", device_id=None, num_threads=threads), f"DALI CPU, {threads} threads"))
        if cuda:
            b.append(("dali-gpu", dict(backend="dali", num_threads=threads), "DALI mixed decode + op"))
            b.append(("dali-gpu-graph", dict(backend="dali", num_threads=threads, filter="bilinear"),
                      "DALI mixed decode + DALI resize/slice/normalise"))
    except ImportError:
        pass
    b.append(("tv-cpu+op", dict(backend="nvjpeg", device="cpu"), "torchvision CPU decode + op"))
    if cuda:
        b.append(("nvjpeg+op", dict(backend="nvjpeg", device="cuda"), "torchvision nvJPEG + op"))
    return b


def time_loader(index: str, kw: dict, img_size: int, batch_series: int) -> dict:
    from medst_fast.data.gpu_loader import make_loader

    loader = make_loader(index, "train", None, img_size, batch_series, True, **kw)

    def epoch():
        studies = images = 0
        for batch in loader:
            b = len(batch["study_id"])
            studies += b
            images += b + int(batch["has_lateral"].sum())
            if torch.cuda.is_available():
                batch["frontal"].sum().item()  # wait for the device work (a sync point, on purpose)
        return studies, images

    epoch()  # warm-up: worker start, pipeline build, page cache
    t0 = time.perf_counter()
    studies, images = epoch()
    dt = time.perf_counter() - t0
    return {"studies": studies, "seconds": round(dt, 4), "studies_per_s": round(studies / dt, 1),
            "images_per_s": round(images / dt, 1)}


# -- the op against the per-image path ----------------------------------------------------------------------------
def bench_op(n: int = 256, reps: int = 3, device: str = "cpu") -> List[dict]:
    from medst_fast import ext
    from medst_fast import ops_image as oi

    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(200, 520, (n, 2), generator=g)
    imgs = [torch.randint(0, 256, (int(h), int(w)), dtype=torch.uint8, generator=g).to(device) for h, w in sizes]
    off = oi.crop_offsets(n, 256, 224, True, g)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def t(fn):
        fn()
        sync()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts))

    rows = []
    t_ref = t(lambda: oi.resize_pad_crop_normalize_ref(imgs, 224, 256, off))
    rows.append({"what": f"per-image PyTorch ({device})", "ms": round(t_ref * 1e3, 2), "images_per_s": round(n / t_ref, 1)})
    if ext.load() and (device == "cpu" or ext.has_cuda()):
        t_op = t(lambda: oi.resize_pad_crop_normalize(imgs, 224, 256, off, use_ext=True))
        rows.append({"what": f"medst_fast::resize_pad_crop_normalize ({device})", "ms": round(t_op * 1e3, 2),
                     "images_per_s": round(n / t_op, 1), "speedup": round(t_ref / t_op, 2)})
    return rows


def run(studies: int = 1024, full_studies: int = 16, batch_series: int = 16, img_size: int = 224) -> List[dict]:
    env = env_info()
    env["cpus"] = os.cpu_count()
    rows = []
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        for r in bench_op(device=dev):
            rows.append({"bench": "resize_pad_crop_normalize", "batch": 256, **r, **env})
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        for data, index in datasets(tmp, studies, full_studies).items():
            bs = batch_series if data != "synthetic-3000x2500" else max(1, min(batch_series, full_studies // 8))
            for name, kw, desc in backends():
                r = time_loader(index, kw, img_size, bs)
                rows.append({"bench": "loader", "data": data, "backend": name, "what": desc,
                             "batch_series": bs, **r, **env})
    for r in rows:
        print({k: v for k, v in r.items() if k not in ("torch", "triton", "cuda", "git_sha", "timestamp")})
    return rows


def test_bench_loader(bench_csv):
    pytest.importorskip("PIL")
    rows = run()
    append_rows(bench_csv, rows)
    assert rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=1024)
    ap.add_argument("--full-studies", type=int, default=16)
    ap.add_argument("--batch-series", type=int, default=16)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--csv", default=None)
    a = ap.parse_args()
    out = run(a.studies, a.full_studies, a.batch_series, a.img_size)
    if a.csv:
        append_rows(a.csv, out)
