"""How fast ``prepare mimic`` builds the 256-px cache from full-size MIMIC-like JPEGs: JPEG draft decoding
(ours) against a plain full decode (baseline), images/s, same worker processes, same run.

Run:  pytest benchmarks/bench_prepare.py --benchmark [--bench-csv PATH] [--bench-quick]
      python benchmarks/bench_prepare.py [--images 1000] [--workers 2] [--size 3000 2500] [--keep DIR]
It writes ``MEDST_BENCH_IMAGES`` (default 1000; 24 in quick mode) full-size images first, in a temporary
folder. The preparation is CPU work; the row says which machine ran it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import format_table, quick, row  # noqa: E402


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
    try:
        if not os.path.isfile(os.path.join(root, "ground_truth.json")):
            _gen(root, images, size)
        rate = {}
        for draft in (False, True):
            out = os.path.join(tmp, f"out_{'draft' if draft else 'plain'}")
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            idx = prepare_mimic(root, root, out, cache_size=256, workers=workers, draft=draft, progress=False)
            dt = time.perf_counter() - t0
            cached = sum(len(f) for _, _, f in os.walk(idx.image_root))
            rate[draft] = (cached, cached / dt)
        if rate[True][0] != rate[False][0] or rate[True][0] == 0:
            raise AssertionError(f"draft and plain decoding cached different image counts: {rate}")
        shape = f"{rate[True][0]} images {size[0]}x{size[1]} -> 256, {workers} workers"
        return [row("prepare", "prepare cache", shape, "images/s", "plain decode", rate[False][1], "draft decode",
                    rate[True][1], "uint8")]
    finally:
        if keep is None:
            shutil.rmtree(tmp, ignore_errors=True)


def test_bench_prepare(bench_results):
    n = int(os.environ.get("MEDST_BENCH_IMAGES", "24" if quick() else "1000"))
    bench_results.add(run(images=n, workers=2))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--size", type=int, nargs=2, default=(3000, 2500))
    ap.add_argument("--keep", default=None, help="reuse/keep the generated tree in this folder")
    a = ap.parse_args()
    print("\n".join(format_table(run(a.images, a.workers, tuple(a.size), a.keep))))
