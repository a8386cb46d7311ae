"""Helpers shared by the benchmark files: environment stamp, timing, CSV rows (Liger's schema + env columns)."""
from __future__ import annotations

import csv
import datetime
import os
import statistics
import subprocess
from typing import Callable, Dict, List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CSV = os.path.join(ROOT, "benchmarks", "results", "bench.csv")


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def env_info() -> Dict[str, str]:
    """The columns every benchmark row carries: GPU, software versions, commit, time."""
    try:
        import triton

        triton_v = triton.__version__
    except Exception:
        triton_v = "none"
    cuda = torch.cuda.is_available()
    return {
        "gpu_name": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "triton": triton_v,
        "cuda": torch.version.cuda or "none",
        "git_sha": git_sha(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def append_rows(path: str, rows: List[dict]) -> None:
    """Append rows to a CSV, writing the header when the file is new; columns are the union of the rows'
    keys (existing header first), so different benchmarks can share one file."""
    if not rows:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fields: List[str] = []
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline="") as f:
            fields = next(csv.reader(f), [])
    new = [k for r in rows for k in r if k not in fields]
    for k in new:
        if k not in fields:
            fields.append(k)
    if new and os.path.exists(path) and os.path.getsize(path) > 0:
        # header grew: rewrite the file with the wider header (old rows get empty cells)
        with open(path, newline="") as f:
            old = list(csv.DictReader(f))
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(old)
    exists = os.path.exists(path) and os.path.getsize(path) > 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if not exists:
            w.writeheader()
        w.writerows(rows)


def print_table(rows: List[dict], cols: List[str]) -> None:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)))


def bench(fn: Callable[[], object], warmup: int = 10, rep: int = 50) -> Dict[str, float]:
    """Median / p20 / p80 milliseconds of ``fn`` after warm-up. CUDA: triton.testing.do_bench (flushes L2,
    CUDA-event timed); CPU: wall clock, few repetitions (tiny shapes only)."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        p50, p20, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return {"ms": p50, "ms_p20": p20, "ms_p80": p80}
    import time

    for _ in range(min(warmup, 2)):
        fn()
    ts = []
    for _ in range(min(rep, 5)):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    ts.sort()
    q = lambda p: ts[min(len(ts) - 1, int(p * len(ts)))]  # noqa: E731
    return {"ms": statistics.median(ts), "ms_p20": q(0.2), "ms_p80": q(0.8)}


def peak_gib(fn: Callable[[], object]) -> float:
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2 ** 30
