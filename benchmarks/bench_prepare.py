"""How fast `prepare mimic` builds the 256-px cache from full-size MIMIC-like JPEGs, draft vs plain decode.

Run:  MEDST_BENCH=1 pytest benchmarks/bench_prepare.py -s     (or: pytest benchmarks/ --benchmark)
      python benchmarks/bench_prepare.py [--images 1000] [--workers 2] [--size 3000 2500]
Skipped otherwise (it writes ~1,000 full-size images first). Numbers are per 1,000 images, wall clock, with
the given worker processes; the CPU count and versions are printed with them.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import shutil
import tempfile
import time

import pytest


def _gen(root: str, images: int, size) -> int:
    from medst_fast.data import synth

    # ~7 images per patient with the generator's rates; add patients until we have enough
    patients = max(1, images // 7)
    gt = synth.generate(root, patients=patients, seed=0, image_size=tuple(size), extras=False, zip_reports=False)
    return gt["counts"]["images"]


def run(images: int = 1000, workers: int = 2, size=(3000, 2500), keep: str = None) -> list:
    from medst_fast.data.prepare import prepare_mimic

    tmp = keep or tempfile.mkdtemp(prefix="bench_prepare_")
    root = os.path.join(tmp, "tree")
    t0 = time.perf_counter()
    if not os.path.isfile(os.path.join(root, "ground_truth.json")):
        n_img = _gen(root, images, size)
    else:
        import json
        n_img = json.load(open(os.path.join(root, "ground_truth.json")))["counts"]["images"]
    t_gen = time.perf_counter() - t0
    rows = []
    for draft in (True, False):
        out = os.path.join(tmp, f"out_{'draft' if draft else 'plain'}")
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        idx = prepare_mimic(root, root, out, cache_size=256, workers=workers, draft=draft, progress=False)
        dt = time.perf_counter() - t0
        cached = sum(len(f) for _, _, f in os.walk(idx.image_root))
        rows.append({"decode": "draft" if draft else "plain", "images_cached": cached, "seconds": round(dt, 2),
                     "s_per_1000": round(dt * 1000 / max(cached, 1), 2), "img_per_s": round(cached / dt, 1),
                     "workers": workers, "cpus": os.cpu_count(), "size": f"{size[0]}x{size[1]}",
                     "python": platform.python_version()})
    print(f"\ngenerated {n_img} images of {size[0]}x{size[1]} in {t_gen:.1f}s")
    for r in rows:
        print(" ".join(f"{k}={v}" for k, v in r.items()))
    res = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_prepare.csv")
    os.makedirs(os.path.dirname(res), exist_ok=True)
    new = not os.path.exists(res)
    with open(res, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)
    if keep is None:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def _enabled(config) -> bool:
    return os.environ.get("MEDST_BENCH") == "1" or bool(config.getoption("--benchmark", default=False))


def test_bench_prepare(request):
    if not _enabled(request.config):
        pytest.skip("benchmark: set MEDST_BENCH=1 or pass --benchmark")
    rows = run(images=int(os.environ.get("MEDST_BENCH_IMAGES", "1000")), workers=2)
    draft, plain = rows
    assert draft["images_cached"] == plain["images_cached"] > 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--size", type=int, nargs=2, default=(3000, 2500))
    ap.add_argument("--keep", default=None, help="reuse/keep the generated tree in this folder")
    a = ap.parse_args()
    run(a.images, a.workers, tuple(a.size), a.keep)
