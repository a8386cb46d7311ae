"""Run output on rank 0: log lines, metrics.csv, optional TensorBoard, the progress bar.

(Named metrics.py rather than logging.py so it never shadows the standard library module.)
"""
from __future__ import annotations

import csv
import logging
import os
import resource
import sys
from typing import Dict, List, Optional

import torch

log = logging.getLogger("medst_fast")

# input_ms / compute_ms: mean per optimizer step over the log window of the time blocked waiting for the next
# batch / the rest of the step. bad_images, dropped_studies, cpu_decoded: the loader's counts over the run.
COLUMNS = ["step", "epoch", "loss", "ita", "local", "temporal", "lr", "studies_per_s", "studies_per_s_per_rank",
           "mem_gib", "bad_steps", "bad_batches", "elapsed_s", "input_ms", "compute_ms", "bad_images",
           "dropped_studies", "cpu_decoded"]


def memory_gib(device: torch.device) -> float:
    """Peak CUDA memory allocated on ``device``, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 2**20


def setup_logging(run_dir: Optional[str], primary: bool) -> logging.Handler:
    """Console (rank 0 only) and <run>/train.log handlers on the "medst_fast" logger; returns what to remove."""
    log.setLevel(logging.INFO if primary else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers = []
    if primary and not any(getattr(h, "_medst_console", False) for h in log.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(fmt)
        h._medst_console = True
        log.addHandler(h)
        handlers.append(h)
    if primary and run_dir:
        fh = logging.FileHandler(os.path.join(run_dir, "train.log"))
        fh.setFormatter(fmt)
        log.addHandler(fh)
        handlers.append(fh)
    return handlers


class MetricsWriter:
    """metrics.csv (appending across resumes; rows past the resumed step are dropped) and TensorBoard.

    ``resume_step``: the step the run continues from (0 for a fresh start): rows a killed run logged after
    that step are dropped, so no step appears twice. None appends to whatever is there.
    """

    def __init__(self, run_dir: str, report_to: List[str], resume_step: Optional[int] = None):
        self.path = os.path.join(run_dir, "metrics.csv")
        if resume_step is not None and os.path.isfile(self.path):
            self._truncate_after(resume_step)
        new = not os.path.isfile(self.path)
        self._f = open(self.path, "a", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=COLUMNS)
        if new:
            self._w.writeheader()
        self.tb = None
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("--report-to tensorboard needs the 'tensorboard' package: pip install tensorboard") from e
            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        # A killed run may have logged steps after its last checkpoint; the resumed run logs them again.
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        keep = [r for r in rows if r.get("step", "").isdigit() and int(r["step"]) <= step]
        tmp = os.path.join(os.path.dirname(self.path), ".tmp-metrics.csv")  # removed by clean_run_dir if killed
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(keep)
        os.replace(tmp, self.path)

    def write(self, row: Dict[str, float]) -> None:
        self._w.writerow({k: row.get(k, "") for k in COLUMNS})
        self._f.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "epoch"):
                    self.tb.add_scalar(f"train/{k}", v, row["step"])

    def close(self) -> None:
        self._f.close()
        if self.tb is not None:
            self.tb.close()


def make_progress(total: int, initial: int, mode: str, primary: bool):
    """A tqdm bar on rank 0 (mode auto: only when stderr is a TTY); None otherwise."""
    if not primary or mode == "off" or (mode == "auto" and not sys.stderr.isatty()):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        log.info("tqdm not installed: no progress bar (log lines only)")
        return None
    return tqdm(total=total, initial=initial, dynamic_ncols=True, desc="pretrain", file=sys.stderr)
