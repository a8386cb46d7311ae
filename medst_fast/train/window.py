"""The log window: what the next metrics row and log line average over (the steps since the last one)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import numpy as np

from .metrics import data_note, hms, memory_gib, timing_note
from .step import LOSS_TERMS, StepStats

_MEANS = ("loss",) + LOSS_TERMS  # loss, ita, local, temporal, cross_local


@dataclass
class Clock:
    """This process's part of the run, for elapsed time and ETA (checkpoints and validation included)."""

    t0: float
    step0: int
    total: int

    def eta(self, now: float, step: int) -> float:
        done = step - self.step0
        return (now - self.t0) / done * (self.total - step) if done else float("nan")

    def text(self, now: float, step: int) -> str:
        return f"elapsed {hms(now - self.t0)} ETA {hms(self.eta(now, step))}"


@dataclass
class Window:
    t: float = field(default_factory=time.perf_counter)  # start (moved on by the time validation took)
    studies: float = 0.0
    steps: int = 0
    good: int = 0
    acc: np.ndarray = field(default_factory=lambda: np.zeros(len(_MEANS)))
    t_input: float = 0.0  # seconds the window's steps waited for batches
    t_compute: float = 0.0  # the rest of those steps (ending with each step's one host sync)

    def add(self, s: StepStats, world: int, t_input: float, t_compute: float) -> bool:
        """Count one step's all-reduced stats; True when it was a good step (its loss enters the mean)."""
        self.steps += 1
        self.studies += s.studies
        self.t_input += t_input
        self.t_compute += t_compute
        good = s.nonfinite == 0 and not math.isnan(s.loss)
        if good:
            self.acc += np.array([getattr(s, k) for k in _MEANS]) / world
            self.good += 1
        return good

    def row(self, step: int, epoch: int, lr: float, world: int, device, with_cross_local: bool) -> Dict[str, Any]:
        """The metrics row (train/metrics.py COLUMNS) without the run-level counts and validation numbers."""
        now = time.perf_counter()
        rate = self.studies / max(now - self.t, 1e-9)
        m = self.acc / self.good if self.good else np.full(len(_MEANS), np.nan)  # no good step: no loss
        means = dict(zip(_MEANS, m))
        if not with_cross_local:
            del means["cross_local"]
        return dict(step=step, epoch=epoch, **means, lr=lr, studies_per_s=rate, studies_per_s_per_rank=rate / world,
                    mem_gib=memory_gib(device), input_ms=1e3 * self.t_input / self.steps,
                    compute_ms=1e3 * self.t_compute / self.steps)


def log_line(row: Dict[str, Any], total: int, epochs: int, good: int, world: int, clock: str) -> str:
    xl = f" cross_local {row['cross_local']:.4f}" if "cross_local" in row else ""
    rate = row["studies_per_s"]
    return (f"step {row['step']}/{total} epoch {row['epoch']}/{epochs} loss {row['loss']:.4f} (ita {row['ita']:.4f} "
            f"local {row['local']:.4f} temporal {row['temporal']:.4f}{xl}; mean of {good} step(s)) {rate:.1f} "
            f"studies/s ({rate / world:.1f}/rank) lr {row['lr']:.3e} mem {row['mem_gib']:.2f} GiB {timing_note(row)} "
            f"{clock}{data_note(row)}")


def bar_text(s: StepStats, world: int, epoch: int, epochs: int, lr: float, clock: str) -> str:
    """The progress bar's postfix: the last step's numbers (not the window's mean)."""
    m = s.per_rank(world)
    return (f"ep {epoch}/{epochs} last batch: loss {m['loss']:.3f} ita {m['ita']:.3f} local {m['local']:.3f} "
            f"temporal {m['temporal']:.3f} lr {lr:.2e} {clock}")


def with_val(row: Dict[str, Any], val: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    if val is not None:
        row.update({k: val[k] for k in ("val_loss", "val_r1", "val_r5")})
    return row
