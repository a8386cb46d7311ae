"""``python -m medst_fast.plot RUN_DIR``: the training curves of a run as ``RUN_DIR/training_curves.png``.

Reads ``RUN_DIR/metrics.csv`` (the trainer writes the same picture at the end of a run): the loss and its
terms, the learning rate, the validation loss and image-to-report R@1/R@5 with their chance levels (the
validation size from ``RUN_DIR/train.log``), and the input vs compute time
per step. Needs matplotlib, the optional extra ``[plot]`` (``pip install medst_fast[plot]``).
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from .files import atomic_writer

PLOT_FILE = "training_curves.png"
_INSTALL = "pip install medst_fast[plot]"


def read_metrics(path: str) -> Dict[str, List[float]]:
    """Columns of metrics.csv as floats; an empty cell (a column that row does not have) is NaN."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no metrics.csv (is this a run folder of medst_fast.pretrain?)") from None
    if not rows:
        raise ValueError(f"{path}: no rows yet (the first row is written at the first --log-every step)")
    cols: Dict[str, List[float]] = {k: [] for k in rows[0]}
    for line, r in enumerate(rows, start=2):
        for k in cols:
            v = r.get(k) or ""
            try:
                cols[k].append(float(v) if v.strip() else math.nan)
            except ValueError:
                raise ValueError(f"{path}: line {line}, column {k!r}: not a number ({v!r})") from None
    return cols


def _series(cols: Dict[str, List[float]], key: str):
    """(steps, values) where the column has a number: rows without it (NaN) are left out of that curve."""
    pts = [(s, v) for s, v in zip(cols["step"], cols.get(key, [])) if not math.isnan(v)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _panel(ax, cols, keys: Sequence[str], title: str, log_y: bool = False) -> None:
    drawn = False
    for k in keys:
        x, y = _series(cols, k)
        if x:
            ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, label=k)
            drawn = True
    ax.set_title(title)
    ax.set_xlabel("step")
    if not drawn:
        ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
        return
    if log_y and all(v > 0 for k in keys for v in _series(cols, k)[1]):
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


# The trainer's validation log line (train/loop.py with train/validate.describe): the one reader of it.
_VALIDATION = re.compile(r"validation at step (\d+): loss \S+, image-to-report R@1 ([\d.]+) R@5 ([\d.]+) .* over "
                         r"(\d+) studies")


def validations(log_text: str) -> List[Tuple[int, float, float, int]]:
    """[(step, R@1, R@5, studies)] of every validation line in a train.log (or the trainer's stderr)."""
    return [(int(m[1]), float(m[2]), float(m[3]), int(m[4])) for m in _VALIDATION.finditer(log_text)]


def validation_studies(run_dir: str) -> Optional[int]:
    """How many studies the run's last validation ranked (from train.log: metrics.csv has no such column), or None."""
    try:
        with open(os.path.join(run_dir, "train.log"), encoding="utf-8", errors="replace") as f:
            found = validations(f.read())
    except OSError:
        return None
    return found[-1][3] if found and found[-1][3] > 0 else None


def _chance_lines(ax, n: Optional[int]) -> None:
    """Chance R@1 = 1/n and R@5 = 5/n for random ranking of n reports: a recall curve means little without them."""
    if n is None:
        return
    for k, color in ((1, "C0"), (5, "C1")):
        ax.axhline(min(1.0, k / n), color=color, linestyle="--", linewidth=1, label=f"chance R@{k} ({k}/{n})")
    ax.legend(fontsize=8)


def plot_run(run_dir: str, out: Optional[str] = None) -> str:
    """Write the training curves of ``run_dir`` to ``out`` (default RUN_DIR/training_curves.png); returns the path.

    Raises ImportError naming the extra when matplotlib is missing.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        # Figure + the Agg canvas, not pyplot: no global backend switch in the caller's process
        raise ImportError(f"plotting needs matplotlib, the optional extra [plot]: {_INSTALL}") from None
    cols = read_metrics(os.path.join(run_dir, "metrics.csv"))
    fig = Figure(figsize=(15, 8), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3)
    _panel(axes[0][0], cols, ("loss", "ita", "local", "temporal"), "training loss and its terms", log_y=True)
    _panel(axes[0][1], cols, ("lr",), "learning rate")
    _panel(axes[0][2], cols, ("input_ms", "compute_ms"), "ms per step: waiting for data vs the rest")
    _panel(axes[1][0], cols, ("val_loss",), "validation loss")
    _panel(axes[1][1], cols, ("val_r1", "val_r5"), "validation image-to-report recall")
    if any(_series(cols, k)[0] for k in ("val_r1", "val_r5")):
        _chance_lines(axes[1][1], validation_studies(run_dir))
    _panel(axes[1][2], cols, ("studies_per_s",), "studies/s (all ranks)")
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)))
    out = out or os.path.join(run_dir, PLOT_FILE)
    with atomic_writer(out, "wb") as f:  # a reader never sees a half-written picture
        fig.savefig(f, format="png", dpi=90)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m medst_fast.plot", description="Draw a run's training curves "
                                "(RUN_DIR/metrics.csv) as a PNG.")
    p.add_argument("run_dir", help="a run folder (holds metrics.csv)")
    p.add_argument("--out", default=None, help=f"PNG to write (default: RUN_DIR/{PLOT_FILE})")
    a = p.parse_args(argv)
    try:
        print(plot_run(a.run_dir, a.out))
    except (ImportError, FileNotFoundError, ValueError) as e:
        print(f"medst_fast.plot: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
