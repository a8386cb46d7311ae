"""Run output on rank 0: log lines, metrics.csv, optional TensorBoard / Weights & Biases, the progress display.

(Named metrics.py rather than logging.py so it never shadows the standard library module.)
"""
from __future__ import annotations

import csv
import datetime
import logging
import math
import os
import resource
import sys
import time
import uuid
from typing import Any, Dict, List, Optional

import torch

from ..files import atomic_writer

log = logging.getLogger("medst_fast")

# input_ms / compute_ms: mean per optimizer step over the log window of the time blocked waiting for the next
# batch / the rest of the step. bad_images, dropped_studies, cpu_decoded: the loader's counts over the run.
# eta_s: the estimated time left. val_*: the validation numbers, on the rows of the steps that ran it (empty
# elsewhere).
COLUMNS = ["step", "epoch", "loss", "ita", "local", "temporal", "lr", "studies_per_s", "studies_per_s_per_rank",
           "mem_gib", "bad_steps", "bad_batches", "elapsed_s", "input_ms", "compute_ms", "bad_images",
           "dropped_studies", "cpu_decoded", "eta_s", "val_loss", "val_r1", "val_r5", "cross_local"]
REPORT_BACKENDS = ("csv", "tensorboard", "wandb")  # csv: metrics.csv, always written
_EXTRA = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def check_report_to(report_to: List[str]) -> None:
    """Fail at start-up, with the extra to install, when a --report-to back-end does not import."""
    import importlib

    for name in report_to:
        if name not in REPORT_BACKENDS:
            raise SystemExit(f"--report-to: unknown back-end {name!r}; supported: {', '.join(REPORT_BACKENDS)}")
        if name in _EXTRA:
            try:
                importlib.import_module(_EXTRA[name][0])
            except ImportError as e:
                raise SystemExit(f"--report-to {name} needs the '{_EXTRA[name][1]}' package ({e}): "
                                 f"pip install medst_fast[{name}]") from None


def hms(seconds: float) -> str:
    """1:02:03 (h:mm:ss); '?' when not known yet."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    return str(datetime.timedelta(seconds=int(round(seconds))))


def memory_gib(device: torch.device) -> float:
    """Peak CUDA memory allocated on ``device``, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 2**20


def timing_note(row: Dict[str, float]) -> str:
    """'input 12 ms compute 130 ms/step (8% waiting for data)': is the loader the bottleneck?"""
    i, c = row["input_ms"], row["compute_ms"]
    return f"input {i:.0f} ms compute {c:.0f} ms/step ({100 * i / max(i + c, 1e-9):.0f}% waiting for data)"


def data_note(row: Dict[str, float]) -> str:
    """The loader's counts over the run, only when there is something to say."""
    parts = [f"{row[k]} {name}" for k, name in (("bad_images", "bad images"), ("dropped_studies", "dropped studies"),
                                                 ("cpu_decoded", "CPU-decoded images")) if row[k]]
    return f"; data: {', '.join(parts)}" if parts else ""


class _Console(logging.StreamHandler):
    """The console handler: while a tqdm bar is on screen, lines go through tqdm.write so the bar stays whole."""

    _medst_console = True
    bar = None  # the active tqdm bar, set by TqdmProgress

    def emit(self, record: logging.LogRecord) -> None:
        if _Console.bar is None:
            return super().emit(record)
        try:
            _Console.bar.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def setup_logging(run_dir: Optional[str], primary: bool) -> List[logging.Handler]:
    """Console (rank 0 only) and <run>/train.log handlers on the "medst_fast" logger; returns what to remove."""
    log.setLevel(logging.INFO if primary else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: List[logging.Handler] = []
    if primary and not any(getattr(h, "_medst_console", False) for h in log.handlers):
        h = _Console(sys.stderr)
        h.setFormatter(fmt)
        log.addHandler(h)
        handlers.append(h)
    if primary and run_dir:
        fh = logging.FileHandler(os.path.join(run_dir, "train.log"))
        fh.setFormatter(fmt)
        log.addHandler(fh)
        handlers.append(fh)
    return handlers


class MetricsWriter:
    """metrics.csv (appending across resumes; rows past the resumed step are dropped), TensorBoard and W&B.

    ``resume_step``: the step the run continues from (0 for a fresh start): rows a killed run logged after
    that step are dropped, so no step appears twice. None appends to whatever is there.
    ``config``: the run's arguments, for W&B.
    """

    def __init__(self, run_dir: str, report_to: List[str], resume_step: Optional[int] = None,
                 config: Optional[Dict[str, Any]] = None):
        check_report_to(report_to)
        self.path = os.path.join(run_dir, "metrics.csv")
        if resume_step is not None and os.path.isfile(self.path):
            self._truncate_after(resume_step)
        new = not os.path.isfile(self.path)
        self._f = open(self.path, "a", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=COLUMNS)
        if new:
            self._w.writeheader()
        self.tb = self.wandb = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        if "wandb" in report_to:
            self.wandb = _wandb_run(run_dir, config or {})

    def _truncate_after(self, step: int) -> None:
        # A killed run may have logged steps after its last checkpoint; the resumed run logs them again.
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        keep = [r for r in rows if r.get("step", "").isdigit() and int(r["step"]) <= step]
        with atomic_writer(self.path, "w", newline="") as f:  # a killed run's temp: clean_run_dir removes it
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(keep)

    def write(self, row: Dict[str, float]) -> None:
        self._w.writerow({k: row.get(k, "") for k in COLUMNS})
        self._f.flush()
        scalars = {(f"val/{k[4:]}" if k.startswith("val_") else f"train/{k}"): float(v) for k, v in row.items()
                   if k not in ("step", "epoch") and isinstance(v, (int, float))}
        if self.tb is not None:  # a NaN would break the plot's scale; the CSV keeps it, as "nan"
            for k, v in scalars.items():
                if math.isfinite(v):
                    self.tb.add_scalar(k, v, row["step"])
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in scalars.items() if math.isfinite(v)}, step=int(row["step"]))

    def close(self) -> None:
        self._f.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_run(run_dir: str, config: Dict[str, Any]):
    """A W&B run tied to the run folder: a resumed run continues the same W&B run (its id is kept in the folder)."""
    import wandb

    id_file = os.path.join(run_dir, "wandb-id.txt")
    if os.path.isfile(id_file):
        with open(id_file) as f:
            run_id = f.read().strip()
    else:
        run_id = uuid.uuid4().hex[:16]
        with open(id_file, "w") as f:
            f.write(run_id + "\n")
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "medst_fast"), name=os.path.basename(run_dir),
                      id=run_id, resume="allow", dir=run_dir, config=config)


# -- progress -----------------------------------------------------------------------------------------------------
class TqdmProgress:
    """A tqdm bar (on a terminal; or, asked for with --progress on, to a file at one refresh per interval)."""

    def __init__(self, total: int, initial: int, interval: float, tty: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, desc="pretrain", file=sys.stderr, dynamic_ncols=tty,
                        mininterval=0.1 if tty else interval)
        _Console.bar = self.bar

    def update(self, step: int, postfix: str) -> None:
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix_str(postfix, refresh=False)

    def logged(self) -> None:
        pass

    def close(self) -> None:
        _Console.bar = None
        self.bar.close()


class LineProgress:
    """Without a terminal: one progress log line at most every ``interval`` seconds in which no other log line
    was written, so a log file shows the run is alive without a bar's carriage returns."""

    def __init__(self, total: int, interval: float):
        self.total, self.interval = total, interval
        self.last = time.monotonic()

    def update(self, step: int, postfix: str) -> None:
        if time.monotonic() - self.last >= self.interval:
            log.info("progress: step %d/%d (%.0f%%) %s", step, self.total, 100.0 * step / max(self.total, 1), postfix)
            self.logged()

    def logged(self) -> None:
        self.last = time.monotonic()

    def close(self) -> None:
        pass


def make_progress(total: int, initial: int, mode: str, primary: bool, interval: float = 30.0):
    """Rank 0's progress display, or None (other ranks, --progress off).

    auto: a tqdm bar when stderr is a terminal, else progress log lines (``LineProgress``); on: a tqdm bar
    even to a file, refreshed once per ``interval`` seconds there.
    """
    if not primary or mode == "off":
        return None
    tty = sys.stderr.isatty()
    if mode == "auto" and not tty:
        return LineProgress(total, interval)
    import importlib.util

    if importlib.util.find_spec("tqdm") is None:
        log.info("tqdm not installed: progress as log lines")
        return LineProgress(total, interval)
    return TqdmProgress(total, initial, interval, tty)
