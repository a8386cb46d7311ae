"""What every benchmark shares: one row schema, the environment stamp, timing, the CSV and the summary table.

A row compares one thing two ways measured in the same run: a baseline and ours, each with its value and its
precision, and ``ratio`` = how many times better ours is (baseline time / our time, or our rate / baseline
rate). A ratio never mixes a precision change into a speed-up: rows whose sides differ in precision are
allowed only as explicit precision rows (``name`` ending in "precision").

``performance_number`` is true only on a CUDA device outside quick mode; every row from a CPU run says it is
not a performance number (the shapes are tiny and the machine is whatever runs the tests).

Quick mode (``MEDST_BENCH_QUICK=1`` or ``pytest benchmarks/ --benchmark --bench-quick``) shrinks every
benchmark so the whole folder runs in a few minutes on a laptop CPU: it checks that they run.
"""
from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Dict, List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL_RESULTS = os.path.join(ROOT, "benchmarks", "results", "local")  # git-ignored
CUDA = torch.cuda.is_available()

SCHEMA = [
    "bench", "name", "shape", "unit", "baseline", "baseline_value", "baseline_precision", "ours", "ours_value",
    "ours_precision", "ratio", "device", "performance_number", "quick", "note",
    "medst_fast", "torch", "cuda", "triton", "torchvision", "dali", "python", "cpus", "git_sha", "git_dirty",
    "timestamp",
]
TABLE = ["bench", "name", "shape", "baseline", "ours", "ratio", "unit", "device"]
RATES = ("studies/s", "images/s")
TIMES = ("ms", "s")


def quick() -> bool:
    return os.environ.get("MEDST_BENCH_QUICK", "0") not in ("", "0")


def performance_number() -> bool:
    return CUDA and not quick()


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return ""


def _version(module: str) -> str:
    try:
        return __import__(module, fromlist=["__version__"]).__version__
    except Exception:
        return "none"


_ENV: Dict[str, str] = {}


def env_info() -> Dict[str, str]:
    """The columns every row carries: device, software versions, commit (and whether the tree was dirty)."""
    if not _ENV:
        import medst_fast

        _ENV.update({
            "device": torch.cuda.get_device_name() if CUDA else f"cpu ({os.cpu_count()} cores)",
            "medst_fast": medst_fast.__version__, "torch": torch.__version__, "cuda": torch.version.cuda or "none",
            "triton": _version("triton"), "torchvision": _version("torchvision"), "dali": _version("nvidia.dali"),
            "python": platform.python_version(), "cpus": str(os.cpu_count()),
            "git_sha": _git("rev-parse", "--short", "HEAD") or "unknown",
            "git_dirty": str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower(),
        })
    return dict(_ENV)


def ratio(unit: str, baseline_value: float, ours_value: float) -> float:
    """How many times better ours is than the baseline."""
    if unit in RATES:
        return ours_value / baseline_value
    if unit in TIMES:
        return baseline_value / ours_value
    raise ValueError(f"unit {unit!r}: expected one of {RATES + TIMES}")


def row(bench: str, name: str, shape: str, unit: str, baseline: str, baseline_value: float, ours: str,
        ours_value: float, baseline_precision: str, ours_precision: Optional[str] = None, note: str = "") -> Dict:
    """One comparison in the common schema. Sides of different precision only in a "... precision" row."""
    ours_precision = baseline_precision if ours_precision is None else ours_precision
    if ours_precision != baseline_precision and not name.endswith("precision"):
        raise ValueError(f"{bench}/{name}: {baseline_precision} baseline vs {ours_precision} ours; a precision "
                         "change gets its own row named '... precision'")
    perf = performance_number()
    if not perf:
        why = ", ".join(x for x in ("" if CUDA else "CPU, tiny shapes", "quick mode" if quick() else "") if x)
        note = "; ".join(x for x in (f"not a performance number ({why})", note) if x)
    r = {"bench": bench, "name": name, "shape": shape, "unit": unit, "baseline": baseline,
         "baseline_value": _round(baseline_value), "baseline_precision": baseline_precision, "ours": ours,
         "ours_value": _round(ours_value), "ours_precision": ours_precision,
         "ratio": round(ratio(unit, baseline_value, ours_value), 3), "performance_number": str(perf).lower(),
         "quick": str(quick()).lower(), "note": note,
         "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    r.update(env_info())
    return {k: r[k] for k in SCHEMA}


def _round(v: float) -> float:
    return float(f"{v:.4g}")


# -- where rows go ------------------------------------------------------------------------------------------------
class Results:
    """The rows of one pytest session: written to the CSV as they come (a timed-out run keeps what it has)
    and printed as one table at the end."""

    def __init__(self, path: Optional[str] = None):
        if path is None:
            stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            path = os.path.join(LOCAL_RESULTS, f"bench-{stamp}.csv")
        self.path = os.path.abspath(path)
        self.rows: List[Dict] = []
        if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            with open(self.path, newline="") as f:
                header = next(csv.reader(f), [])
            if header != SCHEMA:
                raise ValueError(f"{self.path}: its header is not the benchmark schema (columns {header[:6]}...); "
                                 "pass a new --bench-csv path")

    def add(self, rows: List[Dict]) -> None:
        for r in rows:
            if list(r) != SCHEMA:
                raise ValueError(f"benchmark row {r.get('bench')}/{r.get('name')} is not in the schema; build it with row()")
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        new = not (os.path.exists(self.path) and os.path.getsize(self.path) > 0)
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=SCHEMA)
            if new:
                w.writeheader()
            w.writerows(rows)
        self.rows.extend(rows)

    def table(self) -> List[str]:
        return format_table(self.rows)


def format_table(rows: List[Dict]) -> List[str]:
    """Markdown table of the summary columns; each side shows its value and its precision."""
    def cell(r, c):
        if c in ("baseline", "ours"):
            return f"{r[c]}: {r[c + '_value']} ({r[c + '_precision']})"
        return str(r[c])

    lines = ["| " + " | ".join(TABLE) + " |", "|" + "|".join("---" for _ in TABLE) + "|"]
    lines += ["| " + " | ".join(cell(r, c) for c in TABLE) + " |" for r in rows]
    return lines


# -- timing ---------------------------------------------------------------------------------------------------------
def bench(fn: Callable[[], object], warmup: int = 10, rep: int = 50) -> Dict[str, float]:
    """Milliseconds of ``fn``: ``warmup`` untimed calls, then ``rep`` timed ones, each timed on its own (CUDA
    events on a GPU, the wall clock on the CPU). Returns the median, min, max, p20 and p80 and ``n`` (the
    number of timed calls). The counts are honoured as given: a slow step gets its ``rep`` samples, not a
    millisecond budget's one. Quick mode and CPU runs cap them (tiny shapes: they check that things run)."""
    if not CUDA or quick():
        warmup, rep = min(warmup, 1 if quick() else 2), max(1, min(rep, 2 if quick() else 5))
    for _ in range(warmup):
        fn()
    ts = _timed(fn, rep)
    q = lambda p: ts[min(len(ts) - 1, int(p * len(ts)))]  # noqa: E731
    return {"ms": statistics.median(ts), "ms_min": ts[0], "ms_max": ts[-1], "ms_p20": q(0.2), "ms_p80": q(0.8),
            "n": len(ts)}


def _timed(fn: Callable[[], object], rep: int) -> List[float]:
    """Sorted per-call milliseconds."""
    if CUDA:
        torch.cuda.synchronize()
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(rep)]
        for a, b in ev:
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize()
        return sorted(a.elapsed_time(b) for a, b in ev)
    ts = []
    for _ in range(rep):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return sorted(ts)


def spread(t: Dict[str, float]) -> str:
    """"median (min-max, n=N) ms" for a note."""
    return f"{t['ms']:.4g} ms ({t['ms_min']:.4g}-{t['ms_max']:.4g}, n={t['n']})"


def matmul_peak_tflops(dtype=None) -> Dict[str, float]:
    """The dense matmul rate this device reaches in this run (bf16 on CUDA, fp32 on the CPU), in TFLOP/s:
    the MFU denominator, measured rather than taken from a data sheet (clocks, power caps and the card's
    variant all move it). 8192^3 on CUDA (best of 10 after warm-up); 256^3 on the CPU (not a performance
    number)."""
    dtype = dtype or (torch.bfloat16 if CUDA else torch.float32)
    n = 8192 if CUDA and not quick() else 256
    dev = "cuda" if CUDA else "cpu"
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    t = bench(lambda: a @ b, warmup=5, rep=10)
    return {"tflops": 2 * n ** 3 / (t["ms_min"] * 1e-3) / 1e12, "n": n, "dtype": precision_name(dtype)}


def peak_gib(fn: Callable[[], object]) -> float:
    if not CUDA:
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2 ** 30


def precision_name(dtype) -> str:
    return {None: "fp32", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
