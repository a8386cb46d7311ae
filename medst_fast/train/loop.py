"""The Med-ST pretraining loop: build the run, resume or start, then step, validate, log and save until done.

The parts it calls: train/build.py (the :class:`Run`), train/step.py (one optimizer step and its
:class:`StepStats`), train/faults.py (what a bad step leads to), train/state.py (the checkpointed state and the
resume checks), train/export.py, train/window.py (the log window), train/stop.py (stop signals).

Collectives: under DDP every rank must make the same collective calls in the same order. Each one the loop makes
is a named call commented "collective"; the decisions before them (skip, stop, validate, save) are taken from
numbers all ranks share, so no rank waits alone.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from . import distributed as D
from .. import weights as W
from ..files import atomic_write
from .build import Run, build_run, set_seed
from .export import export_best, export_final, plot_curves
from .faults import OOM, UPDATE, NoUpdates, OutOfMemory, StepAccount, oom_message
from .metrics import MetricsWriter, make_progress
from .schedule import cosine_warmup_lr
from .state import TrainState, check_finite, restore, to_checkpoint
from .step import StepStats, batch_problem, batch_to
from .stop import StopRequest
from .validate import describe, is_finite
from .window import Clock, Window, bar_text, log_line, with_val

log = logging.getLogger("medst_fast")


@dataclass
class TrainResult:
    run_dir: str
    step: int
    epoch: int
    interrupted: Optional[int] = None  # the signal number when stopped by SIGTERM/SIGINT
    last_checkpoint: Optional[str] = None
    export_dir: Optional[str] = None
    bad_steps: int = 0
    last_loss: float = float("nan")
    bad_batches: int = 0  # steps skipped because a batch could not be used (counted per micro-batch)
    val: Optional[Dict[str, Any]] = None  # the last validation (val_loss, val_r1, val_r5, studies, ...)
    best_dir: Optional[str] = None  # <run>/best: the model with the lowest validation loss so far


def train(args: argparse.Namespace) -> TrainResult:
    """Pretrain Med-ST with the parsed ``python -m medst_fast.pretrain`` arguments."""
    run = build_run(args)
    try:
        state = resume_or_start(run)
        if run.primary:
            recorded = json.dumps(run.recorded_args(), indent=2, sort_keys=True)
            atomic_write(os.path.join(run.run_dir, "args.json"), recorded)
        t = Training(run, state)
        try:
            return _loop(t)
        finally:
            t.close()
    finally:
        run.close()


def resume_or_start(run: Run) -> TrainState:
    """The state of the newest intact checkpoint (--resume), or a fresh one."""
    loaded = W.load_resume(run.args.resume, run.run_dir)
    if loaded:
        return restore(run, *loaded)
    if run.args.resume == "auto":
        log.info("--resume auto: no checkpoint in %s, starting a new run", run.run_dir)
    set_seed(run.args.seed + run.world.rank)  # dropout differs per rank, data order is the sampler's
    return TrainState()


def _loop(t: "Training") -> TrainResult:
    run, state, a = t.run, t.state, t.run.args
    it = None
    try:
        run.runner.module.train(True)
        while state.step < run.total_steps and state.epoch < a.epochs:
            run.loader.set_epoch(state.epoch, state.step_in_epoch * a.accum_steps)
            it, epoch = iter(run.loader), state.epoch
            while state.epoch == epoch and state.step < run.total_steps:
                lr = cosine_warmup_lr(state.step, run.total_steps, a.lr, a.min_lr, a.warmup_frac)
                s = t.one_step(it, lr)  # load, check, forward/backward, the one all-reduce, update or skip
                state.advance(run.steps_per_epoch)
                t.steps_run += 1
                stop = s.stop > 0
                # Validation before the checkpoint, which records the best loss so far; not while stopping on a
                # signal, whose grace period (SLURM's KillWait, torchrun's 30 s) is for the checkpoint.
                val = t.validate_if_due(skip=stop)  # collective when due
                t.show(s, epoch + 1, lr)
                if state.step % a.log_every == 0 or state.step == run.total_steps or val is not None:
                    t.log_window(epoch + 1, lr, val)  # collective (the loader counts are summed)
                if stop or state.step % a.save_every == 0 or state.step == run.total_steps:
                    t.save()  # collective
                if stop:
                    log.warning("stopped by signal at step %d; resume with --resume auto --out %s", state.step,
                                run.run_dir)
                    return t.finish(interrupted=int(t.stop.signal or signal.SIGTERM))
            it = None  # the epoch's loader workers finish here
        return t.finish(interrupted=None)
    finally:
        if it is not None and hasattr(it, "close"):  # stopped mid-epoch: stop the loader's workers now
            it.close()


class Training:
    """The loop's per-process context: the run, its state, the step accounting, outputs and stop signals."""

    def __init__(self, run: Run, state: TrainState):
        self.run, self.state = run, state
        self.steps_run = 0  # optimizer steps finished by this process (a resumed run counts from 0)
        self.last_ckpt = state.resumed_from
        self.account = StepAccount(run.args.max_bad_steps, fp16=run.runner.scaler.is_enabled(),
                                   bad_total=state.bad_steps, bad_batches=state.bad_batches, last_ckpt=self.last_ckpt,
                                   loader_bad=lambda: state.loader_counts(run.loader)["bad"],
                                   index_meta=_index_meta(run))
        self.stop = StopRequest(lambda: (self.steps_run, state.resumed_from, self.last_ckpt))
        self.weights_bad = torch.zeros(1, device=run.device, dtype=torch.float64)  # set after each update
        a = run.args
        # resume_step: the position continued from (0 for a fresh start), so no step is ever logged twice
        self.writer = (MetricsWriter(run.run_dir, a.report_to, resume_step=state.step, config=run.recorded_args())
                       if run.primary else None)
        self.bar = make_progress(run.total_steps, state.step, a.progress, run.primary, a.progress_interval)
        self.clock = Clock(time.perf_counter(), state.step, run.total_steps)
        self.window = Window()
        self.result = TrainResult(run.run_dir, state.step, state.epoch, bad_steps=state.bad_steps,
                                  bad_batches=state.bad_batches)
        self.stop.install()

    # -- one step ---------------------------------------------------------------------------------------------
    def one_step(self, it, lr: float) -> StepStats:
        """Load the step's micro-batches, agree on bad ones, then forward/backward and update or skip."""
        t_start = time.perf_counter()
        raw = [self._next_batch(it) for _ in range(self.run.args.accum_steps)]
        t_ready = time.perf_counter()
        try:
            s = self._use_batches(raw, lr)
        except OOM as e:
            raise OutOfMemory(oom_message(e, self.run.args, f"in step {self.state.step + 1}", self.last_ckpt)) from None
        # Input = blocked waiting for the loader; compute = the rest of the step, which ends with the step's one
        # host sync, so host time follows the device here without an extra synchronisation.
        if self.window.add(s, self.run.world.world_size, t_ready - t_start, time.perf_counter() - t_ready):
            self.result.last_loss = s.loss / self.run.world.world_size
        self.state.bad_steps, self.state.bad_batches = self.account.bad_total, self.account.bad_batches
        return s

    def _next_batch(self, it) -> Dict[str, Any]:
        try:
            return next(it)
        except StopIteration:  # the sampler promised more: never end an epoch early and silently
            st = self.state
            raise RuntimeError(f"the data loader ran out at step {st.step + 1} (step {st.step_in_epoch + 1} of "
                               f"{self.run.steps_per_epoch} in epoch {st.epoch + 1}): the data set yields fewer "
                               f"batches than its sampler") from None

    def _use_batches(self, raw: List[Dict[str, Any]], lr: float) -> StepStats:
        run, step = self.run, self.state.step + 1
        problems = [p for p in map(batch_problem, raw) if p]
        stop = 1.0 if self.stop.signal is not None else 0.0
        n_bad = len(problems)
        if run.world.distributed:  # every rank must skip the same steps (DDP runs backward in lockstep)
            host = D.all_reduce_host(torch.tensor([float(n_bad), stop], dtype=torch.float64))  # collective, host
            n_bad, stop = int(host[0]), float(host[1])
        if n_bad:
            self.account.bad_batch_step(step, n_bad, problems[0] if problems else "on another rank")
            return StepStats.skipped(stop)
        # The packing plan is built here, on the host and outside any compiled region (models/packing.py).
        batches = [run.model.prepare_batch(batch_to(b, run.device)) for b in raw]
        dev = run.runner.forward_backward(batches)
        stop = 1.0 if stop or self.stop.signal is not None else 0.0  # a signal during the forward counts too
        vec = StepStats.pack(**dev.parts(), stop=torch.tensor(stop, device=run.device),
                             weights_bad=self.weights_bad, grad_norm=run.runner.grad_norm())
        if run.world.distributed:
            dist.all_reduce(vec)  # collective: the step's one all-reduce
        s = StepStats.unpack(vec.tolist())  # the step's one host sync
        if self.account.decide(step, s, run.world.world_size, run.args.lr, run.args.clip_grad) == UPDATE:
            run.runner.optimizer_step(lr)
            self.weights_bad = run.runner.nonfinite_weights()
        else:
            run.runner.skip_step()  # also restores the BatchNorm statistics the forward wrote
        return s

    # -- after a step -----------------------------------------------------------------------------------------
    def validate_if_due(self, skip: bool = False) -> Optional[Dict[str, Any]]:
        """Validate after this step when it is due (every rank); export best/ when the loss improved."""
        run, st = self.run, self.state
        due = st.step == run.total_steps or (run.eval_every and st.step % run.eval_every == 0)
        if run.validator is None or not due:
            return None
        if skip:
            log.warning("validation at step %d skipped: stopping on a signal", st.step)
            return None
        t = time.perf_counter()
        try:
            v = run.validator.run(run.model, run.val_loss_fn, run.device, run.runner.dtype,
                                  lambda b: run.model.prepare_batch(batch_to(b, run.device)))
        except OOM as e:
            raise OutOfMemory(oom_message(e, run.args, f"in the validation at step {st.step}", self.last_ckpt)) from None
        improved = is_finite(v) and (st.best_val is None or v["val_loss"] < st.best_val)
        if improved:
            st.best_val = v["val_loss"]
        if improved and not run.args.no_export:
            best = export_best(run, st.step, v, self.last_ckpt)  # collective
            note = f"; best so far, exported to {best}"
        else:
            note = "; best so far" if improved else (f"; best {st.best_val:.4f}" if st.best_val is not None else "")
        v["seconds"] = time.perf_counter() - t
        self.window.t += v["seconds"]  # studies/s and the window's times count training only
        self.result.val = v
        log.info("validation at step %d: %s (%.1f s)%s", st.step, describe(v), v["seconds"], note)
        return v

    def show(self, s: StepStats, epoch: int, lr: float) -> None:
        if self.bar is not None:
            self.bar.update(self.state.step, bar_text(s, self.run.world.world_size, epoch, self.run.args.epochs, lr,
                                                      self.clock.text(time.perf_counter(), self.state.step)))

    def log_window(self, epoch: int, lr: float, val: Optional[Dict[str, Any]]) -> None:
        """The metrics row and log line of the window's steps. Collective: the loader counts are summed."""
        run, st, W = self.run, self.state, self.run.world.world_size
        row = self.window.row(st.step, epoch, lr, W, run.device, run.cfg.loss.lambda_cross_local > 0)
        now = time.perf_counter()
        row.update(bad_steps=st.bad_steps, bad_batches=st.bad_batches, elapsed_s=now - self.clock.t0,
                   eta_s=self.clock.eta(now, st.step), **self._data_summary())  # collective
        if run.primary:
            self.writer.write(with_val(row, val))
            log.info("%s", log_line(row, run.total_steps, run.args.epochs, self.window.good, W,
                                    self.clock.text(now, st.step)))
            if self.bar is not None:
                self.bar.logged()
        self.window = Window()

    def _data_summary(self) -> Dict[str, int]:
        """Bad-image counts of the run summed over ranks (a host-only gloo exchange under DDP)."""
        c = self.state.loader_counts(self.run.loader)
        bad, cpu = c["bad"], c["cpu_decoded"]
        t = torch.tensor([bad["missing_image"] + bad["unreadable_image"], bad["dropped_study"], sum(cpu.values())],
                         dtype=torch.float64)
        if self.run.world.distributed:
            t = D.all_reduce_host(t)  # collective, host only
        return dict(zip(("bad_images", "dropped_studies", "cpu_decoded"), (int(x) for x in t.tolist())))

    def save(self) -> Optional[str]:
        """Checkpoint the step. Collective: the finite check, the gathered RNG states, the barrier."""
        run, st = self.run, self.state
        check_finite(run.model, run.world, "write a checkpoint", st.step, self.last_ckpt)  # collective
        contents = to_checkpoint(run, st)  # collective
        path = None
        if run.primary:
            path = W.save_checkpoint(contents, run.run_dir, st.step, run.args.keep)
            log.info("checkpoint %s", path)
        D.barrier()  # collective: no rank goes on before the checkpoint exists
        self.last_ckpt = self.account.last_ckpt = W.ckpt_path(run.run_dir, st.step)
        return path

    def finish(self, interrupted: Optional[int]) -> TrainResult:
        """The last checkpoint, the curves and (unless stopped or --no-export) the exports. Collective."""
        run, st, r, acc = self.run, self.state, self.result, self.account
        if self.steps_run and not acc.updates_run and st.resumed_from is None and not interrupted:
            raise NoUpdates(f"stopping: none of the run's {self.steps_run} steps made an update, so there is no "
                            f"trained model to save or export. {acc.no_update_cause()}")
        r.step, r.epoch, r.bad_steps, r.bad_batches, r.interrupted = st.step, st.epoch, st.bad_steps, st.bad_batches, interrupted
        if self.last_ckpt is None or not self.last_ckpt.endswith(f"ckpt-{st.step:08d}.pt"):
            self.save()  # collective
        r.last_checkpoint = self.last_ckpt
        if st.best_val is not None and os.path.isdir(os.path.join(run.run_dir, "best")):
            r.best_dir = os.path.join(run.run_dir, "best")
        if run.primary and not interrupted:  # a stopped run exits within its grace period
            plot_curves(run.run_dir)
        if not interrupted and not run.args.no_export:
            r.export_dir = export_final(run, st.step, self.last_ckpt)  # collective
        D.barrier()  # collective
        return r

    def close(self) -> None:
        self.stop.restore()
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _index_meta(run: Run) -> Optional[str]:
    """The index's meta.json, whose image_root a run of unreadable images should check (None for random data)."""
    if run.data_path and run.args.dataset_type != "random":
        return os.path.join(run.data_path, "meta.json")
    return None
