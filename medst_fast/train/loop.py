"""The Med-ST pretraining loop: setup, micro-/optimizer steps, faults, checkpoints, exports.

One host sync per optimizer step, on purpose: the non-finite-loss check must finish before the optimizer
may touch the weights, and the same small all-reduce carries the stop flag (SIGTERM/SIGINT on any rank),
the loss terms for logging and the finiteness of the weights after the previous update, so every rank
takes the same decision at the same step. Under DDP a second, host-only exchange (gloo, no device sync)
agrees on bad batches before the forward.

What can go wrong and what happens (README "Reliability"):
- a non-finite loss or gradient (the gradient norm used for clipping rides in the step's one all-reduce):
  the update is skipped and every buffer the forward touched (BatchNorm running
  statistics) is restored; --max-bad-steps in a row stop the run;
- non-finite weights after an update: the run stops with an error; no checkpoint or export is written
  with a NaN/inf tensor;
- a batch the model cannot take (all studies unreadable, or one study, which leaves BatchNorm one row):
  the step is skipped without a forward and counted (bad_batches);
- resume: the newest intact checkpoint, the run's own settings unless changed explicitly and allowed, the
  same data set size; one trainer per run folder.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import math
import os
import random
import shutil
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from . import checkpoint as ckpt
from . import distributed as D
from ..config import LossCfg, MedSTConfig
from ..losses import MedSTLoss
from ..kernels._utils import torch_version_tuple
from ..plot import PLOT_FILE
from .args import UsageError, parse_overrides, resolve
from .data import (BAD_BATCH, RandomSeriesDataset, build_train_loader, build_wordpiece_vocab, check_inputs,
                   ensure_synthetic, split_size)
from .metrics import MetricsWriter, check_report_to, data_note, hms, make_progress, memory_gib, setup_logging, timing_note
from .schedule import cosine_warmup_lr
from .validate import Validator, describe, is_finite

VAL_SPLIT = "valid"

log = logging.getLogger("medst_fast")

# Parameters the official model creates but whose outputs are never used (the weighting attention's
# output projection: only its attention weights enter the loss). They never receive a gradient, so they
# are frozen: DDP then needs no find_unused_parameters pass, and AdamW skips them exactly as it skips
# parameters without a gradient in the official run.
UNUSED_PARAMS = ("word_weighting.out_proj.", "patch_weighting.out_proj.")
ENCODER_COMPONENTS = ["visual", "visual_global_head"]
# Arguments that fix the sampler order or the meaning of a step: a resumed run must keep them.
_RESUME_FIXED = ("batch_series", "accum_steps", "seed", "dataset_type", "split", "synthetic_patients", "random_series",
                 "series_len")
# Arguments that define the run's optimisation and data: a change on resume needs --allow-changed-args.
RUN_DEFINING = ("lr", "min_lr", "warmup_frac", "epochs", "max_steps", "wd", "beta1", "beta2", "eps", "clip_grad",
                "lambda_ita", "lambda_local", "lambda_temporal", "lambda_fmc", "lambda_rmr", "gather_with_grad",
                "amp", "data", "data_path", "vocab_sha256", "replicate_collate_bug", "temporal_shuffle",
                "local_weighting", "local_scope", "lambda_cross_local")
_NOT_RECORDED = ("inherited",)  # parse_args bookkeeping, not a setting
_PAPER_LOSS = LossCfg()  # the defaults are the paper's loss
# A stop signal repeated within this many seconds is the same request delivered twice, not a second one: torchrun
# passes the SIGTERM its own process group received on to each rank's group, and SLURM signals every process of
# the job, so a rank may get one preemption twice within milliseconds.
SAME_SIGNAL_S = 2.0


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@contextlib.contextmanager
def _without_loader_line():
    """Drop build_series_loader's "loader: ..." record while the validation loader is built (one such line per run)."""
    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("loader: ")

    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)


class TrainingDiverged(RuntimeError):
    pass


class OutOfMemory(RuntimeError):
    """The device ran out of memory in a step or a validation; the message names the flags that lower memory."""


_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


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


class NoUpdates(TrainingDiverged):
    """The run, or --max-bad-steps steps in a row, made no update: exporting would publish weights that did not
    train (every batch unreadable, e.g. images moved or deleted, or every loss non-finite)."""


class PretrainModule(nn.Module):
    """Model + loss in one module, so DDP sees every parameter used in its forward."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        out = self.model(batch)
        # The losses run outside autocast, in fp32 (they upcast their inputs): softmax/logsumexp over
        # similarity logits with masked -inf/finfo.min entries must not be recast to bf16/fp16 by autocast.
        with torch.autocast(out.img_global.device.type, enabled=False):
            lo = self.loss_fn(out, self.model)
        return lo.total, torch.stack([lo.ita, lo.local, lo.temporal, lo.cross_local]).float()


# With loss.local_weighting "uniform" the local loss never reads the weighting attentions: their input
# projections get no gradient either (None on the reference path, zeros from the fused kernels).
WEIGHTING_PARAMS = ("word_weighting.", "patch_weighting.")


def freeze_unused(model: nn.Module) -> List[str]:
    """Freeze the parameters the loss never uses, so DDP finds no unused parameter and AdamW's weight decay,
    which also acts on a zero gradient, leaves them as initialised; returns their names."""
    unused = UNUSED_PARAMS
    if model.cfg.loss.local_weighting == "uniform":
        unused = UNUSED_PARAMS + WEIGHTING_PARAMS
    names = []
    for n, p in model.named_parameters():
        if n.startswith(unused):
            p.requires_grad_(False)
            names.append(n)
    return names


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def batch_to(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    out = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
    lat = batch.get("has_lateral")
    if torch.is_tensor(lat) and lat.device.type == "cpu":
        # The model builds its packing plan from the host copy, so the forward needs no device->host sync.
        out["has_lateral_host"] = lat
    return out


def build_optimizer(params, args, device: torch.device) -> torch.optim.Optimizer:
    kw = dict(lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps, weight_decay=args.wd)
    if device.type == "cuda":
        kw["fused"] = True  # one kernel for the whole update
    return torch.optim.AdamW(params, **kw)


def amp_dtype(amp: str) -> Optional[torch.dtype]:
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
    if amp not in dtypes:
        raise ValueError(f"amp {amp!r}: expected one of {list(dtypes)}")
    return dtypes[amp]


_LAMBDAS = ("lambda_ita", "lambda_local", "lambda_temporal", "lambda_fmc", "lambda_rmr")
# LossCfg fields with a trainer flag of the same name (--lambda-*, the research switches, --series-len).
_LOSS_FLAGS = _LAMBDAS + ("temporal_shuffle", "local_weighting", "local_scope", "series_len", "lambda_cross_local")


def _merge_section(overrides: Dict[str, Any], section: str, values: Dict[str, Any]) -> None:
    """Add ``values`` to the ``section`` dict override, keeping what --model-override put there."""
    cur = overrides.get(section)
    overrides[section] = dict(cur, **values) if isinstance(cur, dict) else dict(values)


def model_overrides(a: argparse.Namespace) -> Dict[str, Any]:
    """--model-override items plus the flags that set model config fields (--faithful, --lambda-*, the
    research switches, --series-len).

    A field set both ways is an error: one of the two would be dropped without a word.
    """
    overrides: Dict[str, Any] = dict(parse_overrides(a.model_override))
    loss_dict = overrides.get("loss") if isinstance(overrides.get("loss"), dict) else {}
    clash = [k for k in _LOSS_FLAGS if f"loss.{k}" in overrides or k in loss_dict]
    if a.faithful and "faithful" in overrides:
        clash.append("faithful")
    if clash:
        raise SystemExit(f"--model-override sets {clash}, which have their own flags "
                         f"({', '.join(_flag(k) for k in clash)}): use the flags")
    if a.faithful:
        overrides["faithful"] = True
    loss = {k: getattr(a, k) for k in _LOSS_FLAGS}
    if overrides.get("faithful") is True:  # parse_args checks --faithful; this catches --model-override faithful=true
        changed = [_flag(k) for k, v in loss.items() if k not in _LAMBDAS and v != getattr(_PAPER_LOSS, k)]
        if changed:
            raise SystemExit(f"--model-override faithful=true cannot be combined with {', '.join(changed)}: faithful "
                             f"mode keeps the paper's loss (series of {_PAPER_LOSS.series_len} studies, time-ordered "
                             f"temporal loss, learned local weighting, per-sample local context, no cross-image local "
                             f"term)")
    _merge_section(overrides, "loss", loss)
    return overrides


def _architecture(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """A config dict without the loss fields that are flags (compared with the run-defining arguments), with
    every field a later version added filled by its default, so an older run's checkpoint still matches."""
    try:
        d = MedSTConfig.from_dict(cfg).to_dict()
    except (TypeError, ValueError) as e:
        raise ckpt.CheckpointError(f"the checkpoint's model config cannot be read by this version ({e})") from None
    d["loss"] = {k: v for k, v in d["loss"].items() if k not in _LOSS_FLAGS}
    return d


def batch_problem(batch: Dict[str, Any]) -> Optional[str]:
    """Why the model cannot take this batch (None when it can); decided on the host, before any forward."""
    if BAD_BATCH in batch:
        return batch[BAD_BATCH]
    n = batch["frontal"].shape[0]
    if n < 2:  # the global heads' BatchNorm1d runs over the studies of the batch and needs two rows in training
        return f"{n} study in the batch: BatchNorm needs at least 2 rows in training"
    return None


def _nonfinite_flag(tensors: List[torch.Tensor], device: torch.device) -> torch.Tensor:
    """(1,) float64 on ``device``: 1 when any tensor holds a NaN/inf, else 0. No host sync.

    One fused max-abs reduction per dtype (torch._foreach_norm, ord=inf: cannot overflow, NaN propagates).
    """
    flag = torch.zeros(1, device=device, dtype=torch.float64)
    groups: Dict[torch.dtype, List[torch.Tensor]] = {}
    for t in tensors:
        if t.is_floating_point() and t.numel():
            groups.setdefault(t.dtype, []).append(t.detach())
    for ts in groups.values():
        m = torch.stack(torch._foreach_norm(ts, ord=float("inf")))
        flag += (~torch.isfinite(m)).any().double()
    return flag


# torch releases whose inductor gives this model wrong gradients under --compile (measured on the CPU: torch
# 2.11.0's compiled step returns the eager loss but NaN in every gradient upstream of the local loss, while
# aot_eager, the model alone and the losses alone all compile correctly; torch 2.14.1 matches eager).
COMPILE_WRONG_ON = ((2, 11),)


def check_compile_args(compile_: bool, gather_with_grad: bool, torch_version: str = torch.__version__) -> None:
    """One clear line for a combination torch.compile cannot take, or a torch whose compile is wrong here."""
    if compile_ and torch_version_tuple(torch_version) in COMPILE_WRONG_ON:
        raise SystemExit(f"--compile is refused with torch {torch_version}: its inductor compiles this model's "
                         f"training step with NaN gradients (the loss itself looks right); run without --compile or "
                         f"with another torch release (torch 2.14 is tested to match eager)")
    if compile_ and gather_with_grad:
        # The gather exchanges per-rank row counts on the host (ranks hold 1..N studies per series) before the
        # autograd all_gather: a host sync and collectives inside the one full graph, which fails to compile.
        raise SystemExit("--compile cannot be combined with --gather-with-grad: the cross-rank feature gather "
                         "needs the ranks' row counts on the host inside the compiled step; drop one of the two")


def wrap_module(module: nn.Module, compile_: bool, distributed: bool, device: torch.device,
                backend: str = "inductor") -> nn.Module:
    """DDP, then torch.compile over it, the order PyTorch documents for compiled DDP models: dynamo's
    DDPOptimizer then splits the graph at DDP's bucket boundaries, so each bucket's gradient all-reduce starts
    while the rest of the backward still runs (DDP around a compiled module waits for the whole backward)."""
    if distributed:
        module = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    if compile_:
        # One graph for model + losses (tests/test_compile.py checks there is no break); dynamic shapes, so
        # batches with other study/lateral counts reuse it instead of recompiling. Under DDP, fullgraph would
        # force dynamo through DDP's own forward (bucket rebuilds, reducer hooks), which it cannot trace:
        # dynamo skips that frame and compiles the wrapped module's forward inside it.
        module = torch.compile(module, fullgraph=not distributed, dynamic=True, backend=backend)
    return module


def unwrap_compiled(module: nn.Module) -> nn.Module:
    """The module torch.compile wrapped (the DDP module under --compile with DDP), else ``module``."""
    return getattr(module, "_orig_mod", module)


class StepRunner:
    """Forward/backward over the micro-batches of one optimizer step, and the guarded optimizer update."""

    def __init__(self, module: nn.Module, optimizer, device: torch.device, amp: str, accum_steps: int = 1,
                 clip_grad: Optional[float] = None):
        self.module, self.opt, self.device = module, optimizer, device
        self.dtype = amp_dtype(amp)
        self.accum, self.clip = accum_steps, clip_grad
        self.scaler = torch.amp.GradScaler(device.type, enabled=(amp == "fp16"))
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        # Every buffer a forward may write (BatchNorm running statistics and counters): copied before each
        # step's forward, so a skipped step can put them back (a NaN batch must not poison them).
        self.buffers = [b for b in module.buffers()]
        self._snapshot = [b.detach().clone() for b in self.buffers]
        self._norm: Optional[torch.Tensor] = None  # this step's gradient norm (grad_norm), on the device

    def forward_backward(self, batches: List[Dict[str, Any]]) -> torch.Tensor:
        """Returns per-rank stats [non-finite count, 0, loss, ita, local, temporal, cross_local, studies] (no sync)."""
        if self.buffers:
            torch._foreach_copy_(self._snapshot, self.buffers)  # ~17k numbers for ViT-B: one fused copy
        stats = torch.zeros(8, device=self.device, dtype=torch.float64)
        ddp = isinstance(unwrap_compiled(self.module), nn.parallel.DistributedDataParallel)
        for j, batch in enumerate(batches):
            sync = (not ddp) or j == len(batches) - 1
            # skip the all-reduce until the last micro-step
            ctx = contextlib.nullcontext() if sync else unwrap_compiled(self.module).no_sync()
            with ctx:
                with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
                    total, parts = self.module(batch)
                self.scaler.scale(total / len(batches)).backward()
            t = total.detach().double()
            stats[0] += (~torch.isfinite(t)).double()
            stats[2] += t / len(batches)
            stats[3:7] += parts.detach().double() / len(batches)
            stats[7] += batch["frontal"].shape[0]
        return stats

    def grad_norm(self) -> torch.Tensor:
        """(1,) float64 on the device: the L2 norm of all gradients (unscaled under fp16), as clip_grad_norm_
        computes it; NaN/inf when any gradient is. No host sync: it rides in the step's one stats all-reduce,
        and optimizer_step clips with the device value. Under DDP it is read after backward's all-reduce, so
        every rank holds the same gradients and the same norm."""
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.opt)  # once per step; scaler.step then does not unscale again
        groups: Dict[torch.dtype, List[torch.Tensor]] = {}
        for p in self.params:
            if p.grad is not None:
                groups.setdefault(p.grad.dtype, []).append(p.grad.detach())
        norms = [n for gs in groups.values() for n in torch._foreach_norm(gs, 2.0)]
        if norms:
            self._norm = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]), 2.0)
        else:
            self._norm = torch.zeros((), device=self.device)
        return self._norm.double().reshape(1)

    def optimizer_step(self, lr: float) -> None:
        """The update, after the caller saw a finite loss and a finite :meth:`grad_norm` (computed here when
        the caller did not ask for it, e.g. a benchmark driving the runner directly)."""
        for g in self.opt.param_groups:
            g["lr"] = lr
        if self.clip:
            if self._norm is None:
                self.grad_norm()
            # clip_grad_norm_'s coefficient, from the norm already computed (no second reduction, no sync)
            coef = torch.clamp(self.clip / (self._norm + 1e-6), max=1.0)
            grads = [p.grad for p in self.params if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, coef.to(grads[0].dtype))
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self._norm = None

    def skip_step(self) -> None:
        """Drop the step's gradients and restore the buffers its forward wrote. Under fp16 the loss scale is
        lowered as GradScaler does after an overflow (grad_norm's unscale_ recorded it)."""
        if self.scaler.is_enabled() and self._norm is not None:
            self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self._norm = None
        if self.buffers:
            torch._foreach_copy_(self.buffers, self._snapshot)

    def nonfinite_weights(self) -> torch.Tensor:
        """Device flag: 1 when a trained parameter or a floating buffer is NaN/inf (read at the next sync)."""
        return _nonfinite_flag(self.params + self.buffers, self.device)


@dataclass
class _Window:
    """What the next log line averages over: the steps since the last one."""

    t: float  # start (moved on by the time validation took)
    studies: float = 0.0
    steps: int = 0
    good: int = 0
    acc: np.ndarray = field(default_factory=lambda: np.zeros(5))  # loss, ita, local, temporal, cross_local

    def add(self, s: List[float], world: int) -> bool:
        """Count one step's all-reduced stats; True when it was a good step (its loss enters the mean)."""
        self.steps += 1
        self.studies += s[7]
        good = s[0] == 0 and not math.isnan(s[2])
        if good:
            self.acc += np.array(s[2:7]) / world
            self.good += 1
        return good


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


class Trainer:
    def __init__(self, args: argparse.Namespace):
        self.raw_args = args
        self._stop_signal: Optional[int] = None
        self._stop_time = 0.0  # time.monotonic() of the first stop signal
        self._steps_run = 0  # optimizer steps finished by this process (a resumed run counts from 0)
        # the step accounting _use_batches updates: non-finite losses in a row, steps in a row without an update
        # (for any reason), updates made by this process, fp16 GradScaler overflows, and why the last unusable
        # batch could not be used
        self._bad_run = self._skipped_run = self._updates_run = self._scaler_skips = 0
        self._last_problem = ""
        self.resumed_from: Optional[str] = None
        self.last_ckpt: Optional[str] = None
        self._old_handlers: Dict[int, Any] = {}
        self._log_handlers: List[logging.Handler] = []
        self._log_level = log.level  # restored by close(): main() may be called from tests or notebooks
        self._lock: Optional[ckpt.RunLock] = None
        self._t_input = self._t_compute = 0.0  # see _one_step

    # -- setup ------------------------------------------------------------------------------------------
    def setup(self) -> None:
        a = self.raw_args
        want_cuda = (a.device in (None, "cuda")) and torch.cuda.is_available()
        self.world, self.device = D.init_distributed("cuda" if want_cuda else "cpu")
        a = self.args = resolve(a, cuda_available=want_cuda)
        check_report_to(a.report_to)  # every rank, before any collective: a missing extra stops all of them
        check_compile_args(a.compile, a.gather_with_grad)
        if self.device.type == "cpu" and a.amp != "none":
            # measured 2.5x slower than fp32 for this model on a CPU: the bf16/fp16 kernels there are no faster
            log.warning("--amp %s on a CPU: CPU autocast is slower than fp32 here (--amp none is faster)", a.amp)
        primary = self.world.is_primary
        if a.kernels:
            from ..kernels._utils import set_backend

            set_backend(a.kernels)

        # Every input is checked before the run folder is claimed, so an input error leaves nothing behind.
        overrides, cfg = self._model_config(a)
        index = check_inputs(a, cfg)  # the loaded index for --data <index folder>, else None
        out = a.out or os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
        self.run_dir = D.broadcast_object(os.path.abspath(out))
        removed = self._claim_run_dir()
        self._log_handlers = setup_logging(self.run_dir, primary)
        if removed:
            log.info("removed %d file(s) left by interrupted writes: %s", len(removed), removed)
        if getattr(a, "inherited", None):
            log.info("--resume: taking %s from the run's args.json (flags not given on the command line)",
                     ", ".join(_flag(k) for k in a.inherited))
        if a.quick_start:  # the synthetic CPU run's own defaults (train/quickstart.py): say which, once
            from .quickstart import describe as describe_quick_start

            log.info("%s", describe_quick_start(a.quick_start))

        # Data first: the vocab (and so the model's vocab size) may come from the synthetic set.
        vocab = a.vocab or os.environ.get("MEDST_FAST_VOCAB") or None
        data = a.data
        if a.dataset_type == "synthetic":
            if primary:
                data, syn_vocab = ensure_synthetic(a.cache_dir, a.synthetic_patients, seed=0, workers=a.workers)
            D.barrier()
            data, syn_vocab = ensure_synthetic(a.cache_dir, a.synthetic_patients, seed=0)
            vocab = vocab or syn_vocab
        elif a.dataset_type == "random" and vocab is None:
            path = os.path.join(self.run_dir, "vocab.txt")
            if primary:
                build_wordpiece_vocab(RandomSeriesDataset(64, None, 8, seed=a.seed).texts(), self.run_dir)
            D.barrier()
            vocab = path
        a.vocab = os.path.abspath(vocab)
        from ..hub import file_digest

        self.vocab_sha256 = file_digest(a.vocab)
        self.data_path = os.path.abspath(data) if data else None

        from .. import create_model
        from ..text.tokenizer import MedSTTokenizer

        tok = MedSTTokenizer(a.vocab, max_length=cfg.text.max_length)
        if tok.vocab_size != cfg.text.vocab_size:
            log.info("vocab %s has %d tokens; model %s expects %d: using text.vocab_size=%d",
                     a.vocab, tok.vocab_size, a.model, cfg.text.vocab_size, tok.vocab_size)
            _merge_section(overrides, "text", {"vocab_size": tok.vocab_size})
        set_seed(a.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
        model = create_model(a.model, **overrides)
        if a.init:
            from ..convert import load_checkpoint, load_official_checkpoint

            notes = load_checkpoint(model, a.init) if a.init_kind == "auto" else load_official_checkpoint(model, a.init, a.init_kind)
            log.info("initialised from %s (%s)", a.init, "; ".join(notes or []) or "all keys matched")
        if a.text_init:
            from ..convert import load_hf_bert

            load_hf_bert(model, a.text_init)
            log.info("text tower initialised from %s", a.text_init)
        if a.grad_checkpointing:
            model.set_grad_checkpointing(True)
        frozen = freeze_unused(model)
        self.model = model.to(self.device)
        self.cfg = model.cfg
        self.tokenizer = tok

        if a.dataset_type == "manifest":  # convert once, on rank 0, into the run folder
            from ..data import manifest

            index_dir = os.path.join(self.run_dir, "manifest_index")
            if primary:
                manifest.index_from_manifest(data, index_dir)
            D.barrier()
            data = index_dir
        # Every back-end yields the batches of SeriesBatchSampler(n_series, batch_series, rank, world, seed): the
        # data order, crops and step count do not depend on --loader (data/loaders.py).
        source = index if index is not None else data  # the index check_inputs loaded is not read again
        self.loader, self.n_series = build_train_loader(
            a.dataset_type, source, a.split, tok, self.cfg.vision.img_size, a.batch_series, self.world.rank,
            self.world.world_size, a.seed, a.workers, self.device, backend=a.loader,
            replicate_collate_bug=a.replicate_collate_bug, n_random=a.random_series,
            series_len=self.cfg.loss.series_len)  # the data's N is the temporal loss's N
        # after the loader, which read the index (and named any problem with it)
        self.data_fingerprint = ckpt.index_fingerprint(data) if a.dataset_type != "random" else None
        if a.dataset_type == "random":  # build_series_loader logs its own choice
            log.info("loader: %s (%s)", self.loader.backend, self.loader.reason)
        self._counts_base = {"bad": Counter(), "cpu_decoded": Counter()}  # a resumed run's counts so far
        self.steps_per_epoch = len(self.loader) // a.accum_steps
        if self.steps_per_epoch == 0:
            raise SystemExit(f"an epoch has {len(self.loader)} batches per rank, fewer than --accum-steps {a.accum_steps}")
        self.total_steps = self.steps_per_epoch * a.epochs
        if a.max_steps:
            self.total_steps = min(self.total_steps, a.max_steps)
        self.eval_every = self.steps_per_epoch if a.eval_every is None else a.eval_every  # 0: at the end only
        self.validator = self._build_validator(source)
        self.best_val: Optional[float] = None  # the lowest validation loss so far (the model in <run>/best)

        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(params, a, self.device)
        loss_fn = MedSTLoss(self.cfg.loss, self.cfg.faithful, gather=D.make_gather(a.gather_with_grad))
        module = wrap_module(PretrainModule(self.model, loss_fn), a.compile, self.world.distributed, self.device)
        self.runner = StepRunner(module, self.optimizer, self.device, a.amp, a.accum_steps, a.clip_grad)

        self.step, self.epoch, self.step_in_epoch, self.bad_total, self.bad_batches = 0, 0, 0, 0, 0
        loaded = ckpt.load_resume(a.resume, self.run_dir)
        self.resumed_from = None
        if loaded:
            self._load(*loaded)
        else:
            if a.resume == "auto":
                log.info("--resume auto: no checkpoint in %s, starting a new run", self.run_dir)
            set_seed(a.seed + self.world.rank)  # dropout differs per rank, data order is the sampler's
        if primary:
            with open(os.path.join(self.run_dir, "args.json"), "w") as f:
                json.dump(self._args_dict(), f, indent=2, sort_keys=True)
        n_par = sum(p.numel() for p in self.model.parameters())
        log.info("model %s (%.1f M parameters, %d frozen as unused), device %s x %d, amp %s, data %s (%d series)",
                 a.model, n_par / 1e6, len(frozen), self.device, self.world.world_size, a.amp,
                 data or a.dataset_type, self.n_series)
        log.info("batch: %d series per rank, %d per step over %d rank(s), %d effective with --accum-steps %d; "
                 "%d steps per epoch, %d steps in total", a.batch_series, a.batch_series * self.world.world_size,
                 self.world.world_size, a.batch_series * self.world.world_size * a.accum_steps, a.accum_steps,
                 self.steps_per_epoch, self.total_steps)

    @staticmethod
    def _model_config(a: argparse.Namespace):
        """(overrides, MedSTConfig) of --model, --model-override and the flags that set config fields."""
        from .. import get_model_config

        overrides = model_overrides(a)
        try:
            return overrides, get_model_config(a.model).replace(**overrides)
        except ValueError as e:
            raise UsageError(f"--model {a.model} / --model-override: {e}") from None

    def _build_validator(self, data: Optional[str]) -> Optional[Validator]:
        """The validation pass over the index's 'valid' split with the training back-end, or None (logged why)."""
        a, W = self.args, self.world.world_size
        if a.dataset_type == "random":
            log.info("validation: off (--dataset-type random has no %r split)", VAL_SPLIT)
            return None
        n = split_size(data, VAL_SPLIT, self.cfg.loss.series_len)
        if n < W:
            log.info("validation: off (%s has %d series in its %r split, fewer than the %d rank(s))", self.data_path, n,
                     VAL_SPLIT, W)
            return None
        bs = min(a.batch_series, n // W)
        with _without_loader_line():  # the training loader's line already said which back-end runs and why
            loader, _ = build_train_loader(a.dataset_type, data, VAL_SPLIT, self.tokenizer, self.cfg.vision.img_size,
                                           bs, self.world.rank, W, a.seed, a.workers, self.device,
                                           backend=self.loader.backend, replicate_collate_bug=a.replicate_collate_bug,
                                           train=False, series_len=self.cfg.loss.series_len)
        when = f"every {self.eval_every} steps and at the end" if self.eval_every else "at the end"
        log.info("validation: %d of the %d series of the %r split (%d per batch and rank, centre crops), %s; the "
                 "model with the lowest validation loss is exported to %s", len(loader) * bs * W, n, VAL_SPLIT, bs,
                 when, os.path.join(self.run_dir, "best"))
        self.val_loss_fn = MedSTLoss(self.cfg.loss, self.cfg.faithful)  # per rank: no gather, no gradients
        return Validator(loader, n, bs)

    def _validate_if_due(self, skip: bool = False) -> Optional[Dict[str, Any]]:
        """Validate after this step when it is due (every rank); export best/ when the loss improved."""
        due = self.step == self.total_steps or (self.eval_every and self.step % self.eval_every == 0)
        if self.validator is None or not due:
            return None
        if skip:
            log.warning("validation at step %d skipped: stopping on a signal", self.step)
            return None
        t = time.perf_counter()
        try:
            v = self.validator.run(self.model, self.val_loss_fn, self.device, self.runner.dtype,
                                   lambda b: self.model.prepare_batch(batch_to(b, self.device)))
        except _OOM as e:
            raise OutOfMemory(oom_message(e, self.args, f"in the validation at step {self.step}", self.last_ckpt)) from None
        improved = is_finite(v) and (self.best_val is None or v["val_loss"] < self.best_val)
        if improved:
            self.best_val = v["val_loss"]
            if not self.args.no_export:
                self._export_best(v)
        v["seconds"] = time.perf_counter() - t
        if improved:
            note = "; best so far" + ("" if self.args.no_export else f", exported to {os.path.join(self.run_dir, 'best')}")
        else:
            note = f"; best {self.best_val:.4f}" if self.best_val is not None else ""
        log.info("validation at step %d: %s (%.1f s)%s", self.step, describe(v), v["seconds"], note)
        return v

    def _export_best(self, v: Dict[str, Any]) -> None:
        self._check_finite("export the best model")  # collective
        if self.world.is_primary:
            from ..hub import save_pretrained

            best = save_pretrained(self.model, os.path.join(self.run_dir, "best"))
            shutil.copyfile(self.args.vocab, os.path.join(best, "vocab.txt"))
            info = {"step": self.step, **{k: v[k] for k in ("val_loss", "val_r1", "val_r5", "studies")}}
            tmp = os.path.join(best, ".tmp-best.json")
            with open(tmp, "w") as f:
                json.dump(info, f, indent=2)
            os.replace(tmp, os.path.join(best, "best.json"))
        D.barrier()

    def _data_counts(self) -> Dict[str, Counter]:
        """This rank's loader counts over the whole run: the resumed checkpoint's plus this process's."""
        return {k: base + getattr(self.loader, k) for k, base in self._counts_base.items()}

    def _data_summary(self) -> Dict[str, float]:
        """Bad-image counts of the run summed over ranks (a host-only gloo exchange under DDP; every rank calls it)."""
        c = self._data_counts()
        bad, cpu = c["bad"], c["cpu_decoded"]
        t = torch.tensor([bad["missing_image"] + bad["unreadable_image"], bad["dropped_study"], sum(cpu.values())],
                         dtype=torch.float64)
        if self.world.distributed:
            t = D.all_reduce_host(t)
        return dict(zip(("bad_images", "dropped_studies", "cpu_decoded"), (int(x) for x in t.tolist())))

    def _args_dict(self) -> Dict[str, Any]:
        d = {k: v for k, v in vars(self.args).items() if k not in _NOT_RECORDED}
        d["world_size"] = self.world.world_size
        d["data_path"], d["vocab_sha256"] = self.data_path, self.vocab_sha256  # what --data/--vocab resolved to
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    # -- run folder -----------------------------------------------------------------------------------------
    def _claim_run_dir(self) -> List[str]:
        """Lock the run folder, clear stale temps, refuse to start a fresh run over another; returns removed."""
        err, removed = None, []
        if self.world.is_primary:
            os.makedirs(self.run_dir, exist_ok=True)
            try:
                self._lock = ckpt.RunLock(self.run_dir)
                removed = ckpt.clean_run_dir(self.run_dir)  # safe: this process holds the folder
                if not self.args.resume:
                    self._require_fresh_folder()
            except ckpt.RunFolderError as e:
                err = str(e)
        err = D.broadcast_object(err)  # every rank stops, none waits at a barrier for a failed rank 0
        if err:
            self._release_lock()
            raise ckpt.RunFolderError(err)
        return removed

    def _require_fresh_folder(self) -> None:
        """A fresh run may not mix with another run's checkpoints, exports and records (--overwrite deletes them)."""
        d = self.run_dir
        prior = [n for n in ("args.json", "metrics.csv", "final", "final_encoder", "best") if os.path.exists(os.path.join(d, n))]
        prior += [os.path.join(ckpt.CKPT_DIR, os.path.basename(p)) for p in ckpt.list_checkpoints(d)]
        if not prior:
            return
        if not getattr(self.args, "overwrite", False):
            raise ckpt.RunFolderError(
                f"{d} already holds a run ({', '.join(prior[:6])}{' ...' if len(prior) > 6 else ''}); continue it "
                f"with --resume auto, or start over with --overwrite (deletes its checkpoints and exports)")
        for n in (ckpt.CKPT_DIR, "final", "final_encoder", "best", "tensorboard", "args.json", "metrics.csv", "train.log",
                  PLOT_FILE, "wandb-id.txt"):
            p = os.path.join(d, n)
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.unlink(p)

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # -- checkpoints --------------------------------------------------------------------------------------
    def _state(self) -> Dict[str, Any]:
        rngs = D.all_gather_object(ckpt.capture_rng())
        return {
            "format": ckpt.FORMAT_VERSION,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.runner.scaler.state_dict(),
            "step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "bad_steps": self.bad_total, "bad_batches": self.bad_batches,
            "n_series": self.n_series,
            "data_fingerprint": self.data_fingerprint,  # None for --dataset-type random (no files)
            "best_val_loss": self.best_val,
            "rng": rngs,
            # per rank, like the RNG states: what the loader skipped or decoded on the CPU so far
            "loader_counts": D.all_gather_object({k: dict(v) for k, v in self._data_counts().items()}),
            "config": self.cfg.to_dict(),
            "args": self._args_dict(),
        }

    def _check_finite(self, what: str) -> None:
        """Raise TrainingDiverged (on every rank) when a model tensor is NaN/inf: nothing non-finite is written."""
        sd = self.model.state_dict()
        names = [k for k, v in sd.items() if v.is_floating_point() and v.numel()]
        bad_mask = torch.stack([~torch.isfinite(sd[k]).all() for k in names]) if names else torch.zeros(0, dtype=torch.bool)
        n_bad = bad_mask.sum().double().view(1)
        if self.world.distributed:
            dist.all_reduce(n_bad)
        if float(n_bad) > 0:
            bad = [k for k, b in zip(names, bad_mask.tolist()) if b]
            raise TrainingDiverged(
                f"refusing to {what}: {len(bad) or 'some'} model tensors are NaN/inf after step {self.step} "
                f"({', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}). Nothing was written; the last checkpoint "
                f"({self.last_ckpt}) holds finite weights. Lower --lr, enable --clip-grad, or use --amp bf16/none.")

    def save(self) -> Optional[str]:
        self._check_finite("write a checkpoint")
        state = self._state()  # collective: every rank takes part
        path = None
        if self.world.is_primary:
            path = ckpt.save_checkpoint(state, self.run_dir, self.step, self.args.keep)
            log.info("checkpoint %s", path)
        D.barrier()
        self.last_ckpt = ckpt.ckpt_path(self.run_dir, self.step)
        return path

    def _load(self, path: str, st: Dict[str, Any]) -> None:
        self._check_resume_args(path, st)
        try:
            self.model.load_state_dict(st["model"])
            self.optimizer.load_state_dict(st["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ckpt.CheckpointError(f"{path}: state does not fit this model/optimizer ({str(e).splitlines()[0]})") from None
        if st.get("scaler"):
            self.runner.scaler.load_state_dict(st["scaler"])
        self.step, self.epoch, self.step_in_epoch = int(st["step"]), int(st["epoch"]), int(st["step_in_epoch"])
        self.bad_total = int(st.get("bad_steps", 0))
        self.bad_batches = int(st.get("bad_batches", 0))
        if self.step > self.total_steps:
            raise ckpt.CheckpointError(f"{path}: the checkpoint is at step {self.step}, past the end of this run "
                                       f"({self.total_steps} steps from --epochs/--max-steps)")
        if self.step_in_epoch >= self.steps_per_epoch:
            raise ckpt.CheckpointError(f"{path}: the checkpoint is at step {self.step_in_epoch} of its epoch, but an "
                                       f"epoch now has {self.steps_per_epoch} steps: the data set changed")
        rngs = st["rng"]
        ckpt.restore_rng(rngs[self.world.rank] if isinstance(rngs, list) else rngs)
        self.best_val = st.get("best_val_loss")
        counts = st.get("loader_counts")
        if counts:  # the world size is fixed on resume, so rank r continues rank r's counts
            self._counts_base = {k: Counter(counts[self.world.rank].get(k, {})) for k in self._counts_base}
        self.resumed_from = path
        log.info("resumed from %s at step %d (epoch %d, step %d of the epoch)", path, self.step, self.epoch,
                 self.step_in_epoch)

    def _check_resume_args(self, path: str, st: Dict[str, Any]) -> None:
        """Refuse a resume that would silently change the run: data order, model and data size always;
        run-defining settings unless --allow-changed-args (then each change is logged)."""
        old, new = st["args"], self._args_dict()
        fixed = [f"{_flag(k)} {old.get(k)!r} -> {new.get(k)!r}" for k in _RESUME_FIXED if k in old and old[k] != new.get(k)]
        if old.get("world_size", 1) != self.world.world_size:
            fixed.append(f"world size {old.get('world_size')} -> {self.world.world_size}")
        try:
            same_model = _architecture(st["config"]) == _architecture(self.cfg.to_dict())
        except ckpt.CheckpointError as e:
            raise ckpt.CheckpointError(f"{path}: {e}") from None
        if not same_model:
            fixed.append("model config differs")
        if "n_series" in st and int(st["n_series"]) != self.n_series:
            fixed.append(f"the data set has {self.n_series} series, the checkpoint's run had {int(st['n_series'])}")
        if fixed:
            raise ckpt.CheckpointError(f"{path}: cannot resume with changed settings that fix the data order, the "
                                       f"data or the model: {'; '.join(fixed)}")
        ckpt.check_data_fingerprint(path, st.get("data_fingerprint"), self.data_fingerprint, self.data_path,
                                    getattr(self.args, "allow_changed_args", False))
        changed = [f"{_flag(k)} {old[k]!r} -> {new.get(k)!r}" for k in RUN_DEFINING if k in old and old[k] != new.get(k)]
        if changed and not getattr(self.args, "allow_changed_args", False):
            raise ckpt.CheckpointError(
                f"{path}: resuming would change the run: {'; '.join(changed)}. Omit these flags to continue with "
                f"the run's own values, or pass --allow-changed-args to continue with the new ones")
        if changed:
            log.warning("--allow-changed-args: resuming %s with changed settings: %s", path, "; ".join(changed))

    # -- signals ----------------------------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        """First SIGTERM/SIGINT after a step: finish the step, checkpoint, exit 128 + signal. Before the first step
        of this process has finished, or a second time, exit at once: there is no new step to save, or the user
        asked twice. A repeat within SAME_SIGNAL_S is the first one delivered twice, not a second request."""
        name, now = signal.Signals(signum).name, time.monotonic()
        if self._stop_signal is not None and now - self._stop_time < SAME_SIGNAL_S:
            return
        if self._stop_signal is not None:
            why = (f"received {name} again while stopping: exiting now without waiting for the checkpoint of this "
                   f"step; the last complete checkpoint is {self.last_ckpt}")
        elif self._steps_run == 0:
            since = f"the checkpoint {self.resumed_from} it resumed from" if self.resumed_from else "no checkpoint"
            why = (f"received {name} before the first step of this process finished (data loading or a first "
                   f"--compile): exiting now; no step was taken since {since}, so there is nothing new to save")
        else:
            self._stop_signal, self._stop_time = signum, now
            log.warning("received %s: saving a checkpoint at the end of this step, then exiting", name)
            return
        log.warning("%s", why)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def _install_signals(self) -> None:
        # Installed by run(), not setup(): during setup SIGTERM keeps its default and ends the process at once
        # (nothing to save yet), and a Trainer set up but never run leaves the process's handlers alone.
        if self._old_handlers:
            return
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old_handlers[s] = signal.signal(s, self._on_signal)
            except ValueError:  # not the main thread (e.g. called from a worker thread): no handler
                pass

    def _restore_signals(self) -> None:
        for s, h in self._old_handlers.items():
            signal.signal(s, h)
        self._old_handlers = {}

    # -- loop -------------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        a = self.args
        primary = self.world.is_primary
        self.last_ckpt = self.resumed_from
        # resume_step: the position continued from (0 for a fresh start), so no step is ever logged twice
        writer = MetricsWriter(self.run_dir, a.report_to, resume_step=self.step,
                               config=self._args_dict()) if primary else None
        bar = make_progress(self.total_steps, self.step, a.progress, primary, a.progress_interval)
        result = TrainResult(self.run_dir, self.step, self.epoch, bad_steps=self.bad_total, bad_batches=self.bad_batches)
        self._install_signals()
        self._weights_bad = torch.zeros(1, device=self.device, dtype=torch.float64)  # set after each update
        W = self.world.world_size
        self._t0, self._step0 = time.perf_counter(), self.step  # for elapsed and ETA
        win = _Window(self._t0)
        self._t_input = self._t_compute = 0.0  # seconds this log window spent waiting for batches / the rest
        it = None
        try:
            self.module_train(True)
            while self.step < self.total_steps and self.epoch < a.epochs:
                self.loader.set_epoch(self.epoch, self.step_in_epoch * a.accum_steps)
                it = iter(self.loader)
                epoch_now = self.epoch
                while self.epoch == epoch_now and self.step < self.total_steps:
                    lr = cosine_warmup_lr(self.step, self.total_steps, a.lr, a.min_lr, a.warmup_frac)
                    try:
                        s = self._one_step(it, lr)
                    except _OOM as e:
                        raise OutOfMemory(oom_message(e, a, f"in step {self.step + 1}", self.last_ckpt)) from None
                    if win.add(s, W):
                        result.last_loss = s[2] / W
                    self.step += 1
                    self.step_in_epoch += 1
                    self._steps_run += 1
                    log_epoch = self.epoch + 1
                    if self.step_in_epoch == self.steps_per_epoch:  # position saved = start of the next epoch
                        self.epoch, self.step_in_epoch = self.epoch + 1, 0
                    stop = s[1] > 0
                    # before the checkpoint, which records the best loss so far; not while stopping on a signal,
                    # whose grace period (SLURM's KillWait, torchrun's 30 s) is for the checkpoint
                    val = self._validate_if_due(skip=stop)
                    if val is not None:
                        result.val = val
                        win.t += val["seconds"]  # studies/s and the window's times count training only
                    if bar is not None:
                        bar.update(self.step, f"ep {log_epoch}/{a.epochs} last batch: loss {s[2] / W:.3f} "
                                              f"ita {s[3] / W:.3f} local {s[4] / W:.3f} temporal {s[5] / W:.3f} "
                                              f"lr {lr:.2e} "
                                              f"{self._clock(time.perf_counter())}")
                    if self.step % a.log_every == 0 or self.step == self.total_steps or val is not None:
                        self._log_window(win, log_epoch, lr, val, writer, bar)
                        win = _Window(time.perf_counter())
                    if stop or self.step % a.save_every == 0 or self.step == self.total_steps:
                        self.save()
                    if stop:
                        sig = self._stop_signal if self._stop_signal is not None else signal.SIGTERM
                        log.warning("stopped by signal at step %d; resume with --resume auto --out %s",
                                    self.step, self.run_dir)
                        result.interrupted = int(sig)
                        return self._finish(result, writer, bar, export=False)
                it = None  # the epoch's loader workers finish here
            return self._finish(result, writer, bar, export=not a.no_export)
        finally:
            if it is not None and hasattr(it, "close"):  # stopped mid-epoch: stop the loader's workers now
                it.close()
            self._restore_signals()
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()

    def _clock(self, now: float) -> str:
        """'elapsed 0:01:02 ETA 0:10:00' for this process's part of the run (checkpoints and validation included)."""
        done = self.step - self._step0
        eta = (now - self._t0) / done * (self.total_steps - self.step) if done else float("nan")
        return f"elapsed {hms(now - self._t0)} ETA {hms(eta)}"

    def _log_window(self, win: "_Window", epoch: int, lr: float, val: Optional[Dict[str, Any]], writer, bar) -> None:
        """The metrics row and log line of the steps since the last one (every rank: the counts are summed)."""
        a, W = self.args, self.world.world_size
        now = time.perf_counter()
        rate = win.studies / max(now - win.t, 1e-9)
        m = win.acc / win.good if win.good else np.full(5, np.nan)  # no good step in the window: no loss
        done = self.step - self._step0
        row = dict(step=self.step, epoch=epoch, loss=m[0], ita=m[1], local=m[2], temporal=m[3], lr=lr,
                   **({"cross_local": m[4]} if self.cfg.loss.lambda_cross_local > 0 else {}),
                   studies_per_s=rate, studies_per_s_per_rank=rate / W, mem_gib=memory_gib(self.device),
                   bad_steps=self.bad_total, bad_batches=self.bad_batches, elapsed_s=now - self._t0,
                   input_ms=1e3 * self._t_input / win.steps, compute_ms=1e3 * self._t_compute / win.steps,
                   eta_s=(now - self._t0) / done * (self.total_steps - self.step), **self._data_summary())
        if val is not None:
            row.update({k: val[k] for k in ("val_loss", "val_r1", "val_r5")})
        self._t_input = self._t_compute = 0.0
        if not self.world.is_primary:
            return
        writer.write(row)
        xl = f" cross_local {m[4]:.4f}" if "cross_local" in row else ""
        log.info(f"step {self.step}/{self.total_steps} epoch {epoch}/{a.epochs} loss {m[0]:.4f} (ita {m[1]:.4f} "
                 f"local {m[2]:.4f} temporal {m[3]:.4f}{xl}; mean of {win.good} step(s)) {rate:.1f} studies/s ({rate / W:.1f}/rank) lr {lr:.3e} "
                 f"mem {row['mem_gib']:.2f} GiB {timing_note(row)} {self._clock(now)}{data_note(row)}")
        if bar is not None:
            bar.logged()

    def _next_batch(self, it) -> Dict[str, Any]:
        try:
            return next(it)
        except StopIteration:  # the sampler promised more: never end an epoch early and silently
            raise RuntimeError(f"the data loader ran out at step {self.step + 1} (step {self.step_in_epoch + 1} of "
                               f"{self.steps_per_epoch} in epoch {self.epoch + 1}): the data set yields fewer "
                               f"batches than its sampler") from None

    def _one_step(self, it, lr: float) -> List[float]:
        """Load, check, forward/backward and (unless skipped) update one optimizer step.

        Returns the all-reduced stats [non-finite count, stop, loss, ita, local, temporal, cross_local, studies,
        ...]: loss terms are NaN and studies 0 when the step was skipped for a bad batch.
        """
        t_start = time.perf_counter()
        raw = [self._next_batch(it) for _ in range(self.args.accum_steps)]
        t_ready = time.perf_counter()
        try:
            return self._use_batches(raw, lr)
        finally:
            # Input = blocked waiting for the loader; compute = the rest of the step, which ends with the step's
            # one host sync, so host time follows the device here without an extra synchronisation.
            now = time.perf_counter()
            self._t_input += t_ready - t_start
            self._t_compute += now - t_ready

    def _use_batches(self, raw: List[Dict[str, Any]], lr: float) -> List[float]:
        """Check the step's batches, then forward/backward and update (see _one_step)."""
        a, W = self.args, self.world.world_size
        problems = [p for p in map(batch_problem, raw) if p]
        stop = 1.0 if self._stop_signal is not None else 0.0
        if self.world.distributed:  # every rank must skip the same steps (DDP runs backward in lockstep)
            host = D.all_reduce_host(torch.tensor([float(len(problems)), stop], dtype=torch.float64))
            n_bad, stop = int(host[0]), float(host[1])
        else:
            n_bad = len(problems)
        if n_bad:
            self.bad_batches += n_bad
            self._last_problem = problems[0] if problems else "on another rank"
            log.warning("step %d: %d unusable batch(es) (%s); step skipped without a forward (%d bad batches in total)",
                        self.step + 1, n_bad, self._last_problem, self.bad_batches)
            self._no_update()
            nan = float("nan")
            return [0.0, stop, nan, nan, nan, nan, nan, 0.0]
        # The packing plan is built here, on the host and outside any compiled region (models/packing.py).
        batches = [self.model.prepare_batch(batch_to(b, self.device)) for b in raw]
        stats = self.runner.forward_backward(batches)
        stats[1] = 1.0 if stop or self._stop_signal is not None else 0.0  # a signal during the forward counts too
        # [8]: the previous update made the weights non-finite; [9]: this step's gradient norm (the same on every
        # rank after DDP's all-reduce, so the sum is finite exactly when each rank's is)
        stats = torch.cat([stats, self._weights_bad, self.runner.grad_norm()])
        if self.world.distributed:
            dist.all_reduce(stats)
        s = stats.tolist()  # the one host sync per step (see module docstring)
        if s[8] > 0:
            raise TrainingDiverged(
                f"stopping: the update of step {self.step} made the weights NaN/inf (lr {a.lr:g}, --clip-grad "
                f"{a.clip_grad}). Nothing non-finite is saved or exported; last checkpoint: {self.last_ckpt}. "
                f"Lower --lr or enable --clip-grad.")
        grad_bad = not math.isfinite(s[9])
        if grad_bad and s[0] == 0 and self.runner.scaler.is_enabled():
            # fp16: an overflow of the scaled gradients is GradScaler's business (the scale drops, the step is
            # skipped, as GradScaler itself would), not a sign of divergence
            self.runner.skip_step()
            self._scaler_skips += 1
            log.info("step %d: fp16 gradient overflow; update skipped and the loss scale lowered", self.step + 1)
        elif s[0] > 0 or grad_bad:
            # a non-finite gradient never reaches the optimizer, even with a finite loss
            self.runner.skip_step()  # also restores the BatchNorm statistics the forward wrote
            self._bad_run += 1
            self.bad_total += 1
            what = f"loss ({s[2] / W})" if s[0] > 0 else f"gradient (norm {s[9] / W}, loss {s[2] / W})"
            log.warning("step %d: non-finite %s; update skipped (%d in a row, %d in total)",
                        self.step + 1, what, self._bad_run, self.bad_total)
            if self._bad_run >= a.max_bad_steps:
                raise TrainingDiverged(
                    f"stopping: the loss or the gradients were NaN/inf in {self._bad_run} consecutive steps "
                    f"(up to step {self.step + 1}, limit --max-bad-steps {a.max_bad_steps}). The weights are those "
                    f"of the last good step; last checkpoint: {self.last_ckpt}. Lower --lr, enable "
                    f"--clip-grad, or use --amp bf16/none instead of fp16.")
            self._no_update()
        else:
            self._bad_run = self._skipped_run = 0
            self._updates_run += 1
            self.runner.optimizer_step(lr)
            self._weights_bad = self.runner.nonfinite_weights()
        return s[:8]

    def _no_update(self) -> None:
        """Count a step without an update; --max-bad-steps of them in a row stop the run (every rank alike: the
        decisions before it were all-reduced)."""
        self._skipped_run += 1
        if self._skipped_run >= self.args.max_bad_steps:
            raise NoUpdates(f"stopping: {self._skipped_run} steps in a row made no update (up to step "
                            f"{self.step + 1}, limit --max-bad-steps {self.args.max_bad_steps}). {self._no_update_cause()}")

    def _no_update_cause(self) -> str:
        """Why steps were skipped, with the loader's counts and where it looked for the images."""
        bad = self._data_counts()["bad"]
        counts = ", ".join(f"{k} {v}" for k, v in sorted(bad.items()) if v) or "none"
        parts = [f"{self.bad_batches} unusable batch(es) in total, last: {self._last_problem or '-'}; loader "
                 f"counts: {counts}", f"{self.bad_total} step(s) with a non-finite loss"]
        if self._scaler_skips:
            parts.append(f"{self._scaler_skips} fp16 gradient overflow(s) while GradScaler lowered its loss scale from "
                         f"its start (normal in a run's first steps: a longer run gets past them, or use --amp bf16)")
        where = ""
        if self.data_path and self.args.dataset_type != "random":
            where = (f" Check that the images exist where the index says: {os.path.join(self.data_path, 'meta.json')}"
                     f" field 'image_root'.")
        return f"Cause: {'; '.join(parts)}.{where} Last checkpoint: {self.last_ckpt}."

    def module_train(self, mode: bool) -> None:
        self.runner.module.train(mode)

    def _finish(self, result: TrainResult, writer, bar, export: bool) -> TrainResult:
        if self._steps_run and not self._updates_run and self.resumed_from is None and not result.interrupted:
            raise NoUpdates(f"stopping: none of the run's {self._steps_run} steps made an update, so there is no "
                            f"trained model to save or export. {self._no_update_cause()}")
        result.step, result.epoch, result.bad_steps = self.step, self.epoch, self.bad_total
        result.bad_batches = self.bad_batches
        if self.last_ckpt is None or not self.last_ckpt.endswith(f"ckpt-{self.step:08d}.pt"):
            self.save()
        result.last_checkpoint = self.last_ckpt
        if self.best_val is not None and os.path.isdir(os.path.join(self.run_dir, "best")):
            result.best_dir = os.path.join(self.run_dir, "best")
        if self.world.is_primary and not result.interrupted:  # a stopped run exits within its grace period
            self._plot()
        if export:
            self._check_finite("export the model")
        if export and self.world.is_primary:
            from ..hub import save_pretrained

            final = save_pretrained(self.model, os.path.join(self.run_dir, "final"))
            shutil.copyfile(self.args.vocab, os.path.join(final, "vocab.txt"))
            save_pretrained(self.model, os.path.join(self.run_dir, "final_encoder"), components=ENCODER_COMPONENTS)
            result.export_dir = final
            log.info("exported %s (full model + vocab.txt) and %s (image encoder)", final,
                     os.path.join(self.run_dir, "final_encoder"))
            if self.args.dataset_type == "synthetic":  # its evaluation sets sit beside it: say how to use them
                log.info("evaluate it on the synthetic MS-CXR-T, RSNA and COVIDx-format sets: python -m "
                         "medst_fast.eval all --checkpoint %s (pip install medst_fast[eval])", final)
        D.barrier()
        return result

    def _plot(self) -> None:
        """<run>/training_curves.png; never fails the run (matplotlib is the optional extra [plot])."""
        from ..plot import plot_run

        try:
            log.info("training curves: %s", plot_run(self.run_dir))
        except ImportError as e:
            log.info("no %s: %s", PLOT_FILE, e)
        except Exception as e:  # a plot is a convenience: a bad row must not cost the finished run
            log.warning("could not plot the training curves (%s: %s)", type(e).__name__, e)

    def close(self) -> None:
        self._restore_signals()
        self._release_lock()
        for h in self._log_handlers:
            log.removeHandler(h)
            h.close()
        log.setLevel(self._log_level)
        D.cleanup()


def train(args: argparse.Namespace) -> TrainResult:
    t = Trainer(args)
    try:
        t.setup()
        return t.run()
    finally:
        t.close()
