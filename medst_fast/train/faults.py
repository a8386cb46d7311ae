"""What can go wrong in a step, and what the trainer does then (README "Reliability").

- a non-finite loss or gradient: the update is skipped and the buffers the forward wrote (BatchNorm running
  statistics) are restored; --max-bad-steps in a row stop the run;
- an fp16 gradient overflow: GradScaler's business (the scale drops, the step is skipped), not divergence;
- non-finite weights after an update: the run stops; no checkpoint or export is written with a NaN/inf tensor;
- a batch the model cannot take (every study unreadable, or one study, which leaves BatchNorm one row): the
  step is skipped without a forward and counted (bad_batches);
- --max-bad-steps steps in a row without an update, for any of these reasons, or a whole run without one:
  the run stops naming the cause, instead of exporting weights that did not train.

Every decision here is taken from numbers all ranks share (the step's all-reduced :class:`StepStats`, the
host exchange about bad batches), so every rank takes the same one.
"""
from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch

from .step import StepStats

log = logging.getLogger("medst_fast")

OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


class TrainingDiverged(RuntimeError):
    pass


class NoUpdates(TrainingDiverged):
    """The run, or --max-bad-steps steps in a row, made no update: exporting would publish weights that did not
    train (every batch unreadable, e.g. images moved or deleted, or every loss non-finite)."""


class OutOfMemory(RuntimeError):
    """The device ran out of memory in a step or a validation; the message names the flags that lower memory."""


def oom_message(e: BaseException, a: argparse.Namespace, where: str, last_ckpt: Optional[str]) -> str:
    """One line: what ran out, and the flags that lower memory which this run does not use yet."""
    hints = [f"a smaller --batch-series (now {a.batch_series}; raise --accum-steps, now {a.accum_steps}, to keep the "
             f"effective batch)"]
    if a.amp != "bf16":
        hints.append(f"--amp bf16 (now {a.amp})")
    if not a.grad_checkpointing:
        hints.append("--grad-checkpointing (recomputes the transformer blocks in backward)")
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return (f"out of memory {where} ({first}). To lower memory: {'; '.join(hints)}. Last checkpoint: {last_ckpt}")


UPDATE, SKIP = "update", "skip"


@dataclass
class StepAccount:
    """The run's step accounting and the decision each step's all-reduced stats lead to."""

    max_bad_steps: int
    fp16: bool = False
    bad_total: int = 0  # steps with a non-finite loss or gradient over the run (checkpointed as bad_steps)
    bad_batches: int = 0  # unusable micro-batches over the run (checkpointed)
    bad_run: int = 0  # non-finite steps in a row
    skipped_run: int = 0  # steps in a row without an update, for any reason
    updates_run: int = 0  # updates made by this process
    scaler_skips: int = 0  # fp16 GradScaler overflows
    last_problem: str = ""  # why the last unusable batch could not be used
    last_ckpt: Optional[str] = None  # named in every stop message
    loader_bad: Callable[[], Dict[str, int]] = field(default=dict, repr=False)  # the loader's bad counts so far
    index_meta: Optional[str] = None  # the index's meta.json, whose image_root a run of unreadable images names

    def bad_batch_step(self, step: int, n_bad: int, problem: str) -> None:
        """A step skipped without a forward: ``n_bad`` unusable micro-batches over the ranks."""
        self.bad_batches += n_bad
        self.last_problem = problem
        log.warning("step %d: %d unusable batch(es) (%s); step skipped without a forward (%d bad batches in total)",
                    step, n_bad, problem, self.bad_batches)
        self.no_update(step)

    def decide(self, step: int, s: StepStats, world: int, lr: float, clip: Optional[float]) -> str:
        """UPDATE or SKIP for ``step`` (1-based) from its all-reduced stats; raises when the run must stop."""
        if s.weights_bad > 0:
            raise TrainingDiverged(
                f"stopping: the update of step {step - 1} made the weights NaN/inf (lr {lr:g}, --clip-grad {clip}). "
                f"Nothing non-finite is saved or exported; last checkpoint: {self.last_ckpt}. Lower --lr or enable "
                f"--clip-grad.")
        grad_bad = not math.isfinite(s.grad_norm)
        if grad_bad and s.nonfinite == 0 and self.fp16:
            self.scaler_skips += 1
            log.info("step %d: fp16 gradient overflow; update skipped and the loss scale lowered", step)
            return SKIP
        if s.nonfinite > 0 or grad_bad:  # a non-finite gradient never reaches the optimizer, even with a finite loss
            self._nonfinite(step, s, world)
            return SKIP
        self.bad_run = self.skipped_run = 0
        self.updates_run += 1
        return UPDATE

    def _nonfinite(self, step: int, s: StepStats, world: int) -> None:
        self.bad_run += 1
        self.bad_total += 1
        what = (f"loss ({s.loss / world})" if s.nonfinite > 0
                else f"gradient (norm {s.grad_norm / world}, loss {s.loss / world})")
        log.warning("step %d: non-finite %s; update skipped (%d in a row, %d in total)", step, what, self.bad_run,
                    self.bad_total)
        if self.bad_run >= self.max_bad_steps:
            raise TrainingDiverged(
                f"stopping: the loss or the gradients were NaN/inf in {self.bad_run} consecutive steps (up to step "
                f"{step}, limit --max-bad-steps {self.max_bad_steps}). The weights are those of the last good "
                f"step; last checkpoint: {self.last_ckpt}. Lower --lr, enable --clip-grad, or use --amp bf16/none "
                f"instead of fp16.")
        self.no_update(step)

    def no_update(self, step: int) -> None:
        """Count a step without an update; --max-bad-steps of them in a row stop the run."""
        self.skipped_run += 1
        if self.skipped_run >= self.max_bad_steps:
            raise NoUpdates(f"stopping: {self.skipped_run} steps in a row made no update (up to step {step}, limit "
                            f"--max-bad-steps {self.max_bad_steps}). {self.no_update_cause()}")

    def no_update_cause(self) -> str:
        """Why steps were skipped, with the loader's counts and where it looked for the images."""
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.loader_bad().items()) if v) or "none"
        parts = [f"{self.bad_batches} unusable batch(es) in total, last: {self.last_problem or '-'}; loader "
                 f"counts: {counts}", f"{self.bad_total} step(s) with a non-finite loss"]
        if self.scaler_skips:
            parts.append(f"{self.scaler_skips} fp16 gradient overflow(s) while GradScaler lowered its loss scale from "
                         f"its start (normal in a run's first steps: a longer run gets past them, or use --amp bf16)")
        where = (f" Check that the images exist where the index says: {self.index_meta} field 'image_root'."
                 if self.index_meta else "")
        return f"Cause: {'; '.join(parts)}.{where} Last checkpoint: {self.last_ckpt}."
