"""The checkpointed training state: where the run is, what it counted, and the checks a resume must pass.

A checkpoint (format version 1; medst_fast/weights.py writes and verifies the file) holds the model, optimizer
and GradScaler states, the position (step, epoch, step in epoch), the counts (bad steps, bad batches, the
loader's per-rank counts), the best validation loss, every rank's RNG states, the data set's size and
fingerprint, the model config and the run's arguments. A resume continues bitwise where the run stopped, or is
refused with one line naming what changed.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from . import distributed as D
from .. import weights as W
from ..config import MedSTConfig
from .build import LOSS_FLAGS, Run, flag
from .faults import TrainingDiverged
from .rng import capture_rng, restore_rng

log = logging.getLogger("medst_fast")

# Arguments that fix the sampler order or the meaning of a step: a resumed run must keep them.
RESUME_FIXED = ("batch_series", "accum_steps", "seed", "dataset_type", "split", "synthetic_patients", "random_series",
                "series_len")
# Arguments that define the run's optimisation and data: a change on resume needs --allow-changed-args.
RUN_DEFINING = ("lr", "min_lr", "warmup_frac", "epochs", "max_steps", "wd", "beta1", "beta2", "eps", "clip_grad",
                "lambda_ita", "lambda_local", "lambda_temporal", "lambda_fmc", "lambda_rmr", "gather_with_grad",
                "amp", "data", "data_path", "vocab_sha256", "replicate_collate_bug", "temporal_shuffle",
                "local_weighting", "local_scope", "lambda_cross_local")
LOADER_COUNTS = ("bad", "cpu_decoded")


@dataclass
class TrainState:
    """Where the run is and what it counted; the part of a checkpoint besides the weights and optimizer."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    step_in_epoch: int = 0  # the position saved at an epoch's end is the start of the next one
    bad_steps: int = 0
    bad_batches: int = 0
    best_val: Optional[float] = None  # the lowest validation loss so far (the model in <run>/best)
    resumed_from: Optional[str] = None
    # this rank's loader counts from before this process (a resumed run's), added to the loader's own
    counts_base: Dict[str, Counter] = field(default_factory=lambda: {k: Counter() for k in LOADER_COUNTS})

    def advance(self, steps_per_epoch: int) -> None:
        self.step += 1
        self.step_in_epoch += 1
        if self.step_in_epoch == steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def loader_counts(self, loader) -> Dict[str, Counter]:
        """This rank's loader counts over the whole run: the resumed checkpoint's plus this process's."""
        return {k: base + getattr(loader, k) for k, base in self.counts_base.items()}


def architecture(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """A config dict without the loss fields that are flags (compared with the run-defining arguments), with
    every field a later version added filled by its default, so an older run's checkpoint still matches."""
    try:
        d = MedSTConfig.from_dict(cfg).to_dict()
    except (TypeError, ValueError) as e:
        raise W.CheckpointError(f"the checkpoint's model config cannot be read by this version ({e})") from None
    d["loss"] = {k: v for k, v in d["loss"].items() if k not in LOSS_FLAGS}
    return d


def check_finite(model: torch.nn.Module, world: D.WorldInfo, what: str, step: int, last_ckpt: Optional[str]) -> None:
    """Raise TrainingDiverged on every rank when a model tensor is NaN/inf: nothing non-finite is written.
    Collective under DDP (an all-reduce of the count): every rank calls it."""
    sd = model.state_dict()
    names = [k for k, v in sd.items() if v.is_floating_point() and v.numel()]
    bad_mask = torch.stack([~torch.isfinite(sd[k]).all() for k in names]) if names else torch.zeros(0, dtype=torch.bool)
    n_bad = bad_mask.sum().double().view(1)
    if world.distributed:
        dist.all_reduce(n_bad)  # collective
    if float(n_bad) > 0:
        bad = [k for k, b in zip(names, bad_mask.tolist()) if b]
        raise TrainingDiverged(
            f"refusing to {what}: {len(bad) or 'some'} model tensors are NaN/inf after step {step} "
            f"({', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}). Nothing was written; the last checkpoint "
            f"({last_ckpt}) holds finite weights. Lower --lr, enable --clip-grad, or use --amp bf16/none.")


def to_checkpoint(run: Run, state: TrainState) -> Dict[str, Any]:
    """The checkpoint's contents. Collective: every rank's RNG states and loader counts are gathered."""
    rngs = D.all_gather_object(capture_rng())  # collective
    counts = {k: dict(v) for k, v in state.loader_counts(run.loader).items()}
    return {
        "format": W.FORMAT_VERSION,
        "model": {k: v.detach().cpu() for k, v in run.model.state_dict().items()},
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.runner.scaler.state_dict(),
        "step": state.step, "epoch": state.epoch, "step_in_epoch": state.step_in_epoch,
        "bad_steps": state.bad_steps, "bad_batches": state.bad_batches,
        "n_series": run.n_series,
        "data_fingerprint": run.data_fingerprint,  # None for --dataset-type random (no files)
        "best_val_loss": state.best_val,
        "rng": rngs,
        "loader_counts": D.all_gather_object(counts),  # collective; per rank, like the RNG states
        "config": run.cfg.to_dict(),
        "args": run.recorded_args(),
    }


def restore(run: Run, path: str, st: Dict[str, Any]) -> TrainState:
    """Load checkpoint ``st`` (read from ``path``) into the run after the resume checks; returns its state."""
    check_resume(run, path, st)
    try:
        run.model.load_state_dict(st["model"])
        run.optimizer.load_state_dict(st["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise W.CheckpointError(f"{path}: state does not fit this model/optimizer ({str(e).splitlines()[0]})") from None
    if st.get("scaler"):
        run.runner.scaler.load_state_dict(st["scaler"])
    state = TrainState(int(st["step"]), int(st["epoch"]), int(st["step_in_epoch"]), int(st.get("bad_steps", 0)),
                       int(st.get("bad_batches", 0)), st.get("best_val_loss"), resumed_from=path)
    check_position(path, state, run.total_steps, run.steps_per_epoch)
    rngs = st["rng"]
    restore_rng(rngs[run.world.rank] if isinstance(rngs, list) else rngs)
    counts = st.get("loader_counts")
    if counts:  # the world size is fixed on resume, so rank r continues rank r's counts
        state.counts_base = {k: Counter(counts[run.world.rank].get(k, {})) for k in LOADER_COUNTS}
    log.info("resumed from %s at step %d (epoch %d, step %d of the epoch)", path, state.step, state.epoch,
             state.step_in_epoch)
    return state


def check_position(path: str, state: TrainState, total_steps: int, steps_per_epoch: int) -> None:
    if state.step > total_steps:
        raise W.CheckpointError(f"{path}: the checkpoint is at step {state.step}, past the end of this run "
                                   f"({total_steps} steps from --epochs/--max-steps)")
    if state.step_in_epoch >= steps_per_epoch:
        raise W.CheckpointError(f"{path}: the checkpoint is at step {state.step_in_epoch} of its epoch, but an "
                                   f"epoch now has {steps_per_epoch} steps: the data set changed")


def fixed_changes(old: Dict[str, Any], new: Dict[str, Any], st: Dict[str, Any], cfg: MedSTConfig, world_size: int,
                  n_series: int) -> List[str]:
    """What changed among the settings a resume must keep (data order, model, data size)."""
    fixed = [f"{flag(k)} {old.get(k)!r} -> {new.get(k)!r}" for k in RESUME_FIXED if k in old and old[k] != new.get(k)]
    if old.get("world_size", 1) != world_size:
        fixed.append(f"world size {old.get('world_size')} -> {world_size}")
    if architecture(st["config"]) != architecture(cfg.to_dict()):
        fixed.append("model config differs")
    if "n_series" in st and int(st["n_series"]) != n_series:
        fixed.append(f"the data set has {n_series} series, the checkpoint's run had {int(st['n_series'])}")
    return fixed


def defining_changes(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """What changed among the run-defining settings (allowed on resume only with --allow-changed-args)."""
    return [f"{flag(k)} {old[k]!r} -> {new.get(k)!r}" for k in RUN_DEFINING if k in old and old[k] != new.get(k)]


def check_data_fingerprint(path: str, old: Optional[str], new: Optional[str], data: Optional[str],
                           allow_changed: bool) -> None:
    """Refuse to resume on an index whose content differs from the checkpoint's (the same series count is not
    the same data), unless ``allow_changed`` (--allow-changed-args), which logs it. A checkpoint written before
    the fingerprint was recorded (``old`` None) is not checked."""
    if old is None or old == new:
        return
    what = (f"the index {data} differs from the one the run trained on (index fingerprint {str(old)[:12]} -> "
            f"{str(new)[:12]}: reports, image paths, splits or series changed)")
    if not allow_changed:
        raise W.CheckpointError(f"{path}: resuming would change the run: {what}. Resume with the run's own index, or "
                              f"pass --allow-changed-args to continue on this one")
    log.warning("--allow-changed-args: resuming %s although %s", path, what)


def check_resume(run: Run, path: str, st: Dict[str, Any]) -> None:
    """Refuse a resume that would silently change the run: data order, model and data size always;
    run-defining settings unless --allow-changed-args (then each change is logged)."""
    old, new = st["args"], run.recorded_args()
    allow = getattr(run.args, "allow_changed_args", False)
    try:
        fixed = fixed_changes(old, new, st, run.cfg, run.world.world_size, run.n_series)
    except W.CheckpointError as e:
        raise W.CheckpointError(f"{path}: {e}") from None
    if fixed:
        raise W.CheckpointError(f"{path}: cannot resume with changed settings that fix the data order, the "
                                   f"data or the model: {'; '.join(fixed)}")
    check_data_fingerprint(path, st.get("data_fingerprint"), run.data_fingerprint, run.data_path, allow)
    changed = defining_changes(old, new)
    if changed and not allow:
        raise W.CheckpointError(
            f"{path}: resuming would change the run: {'; '.join(changed)}. Omit these flags to continue with "
            f"the run's own values, or pass --allow-changed-args to continue with the new ones")
    if changed:
        log.warning("--allow-changed-args: resuming %s with changed settings: %s", path, "; ".join(changed))
