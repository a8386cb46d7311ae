"""Build a :class:`Run` from the parsed arguments: device and DDP, run folder, vocabulary, model, loaders,
validator, optimizer and the step runner. Every input is checked before the run folder is claimed, so an input
error leaves nothing behind.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from . import distributed as D
from . import run_dir as R
from ..config import LossCfg, MedSTConfig
from ..convert import load_checkpoint, load_hf_bert, load_official_checkpoint
from ..data import manifest
from ..data.index import index_fingerprint
from ..factory import create_model, get_model_config
from ..files import file_digest
from ..kernels._utils import set_backend, torch_version_tuple
from ..losses import MedSTLoss
from ..text.tokenizer import MedSTTokenizer
from .args import UsageError, parse_overrides, resolve
from .data import (RandomSeriesDataset, build_train_loader, build_wordpiece_vocab, check_inputs, ensure_synthetic,
                   split_size)
from .metrics import check_report_to, setup_logging
from .quickstart import describe as describe_quick_start
from .step import PretrainModule, StepRunner, freeze_unused, wrap_module
from .validate import Validator

log = logging.getLogger("medst_fast")

VAL_SPLIT = "valid"
_LAMBDAS = ("lambda_ita", "lambda_local", "lambda_temporal", "lambda_fmc", "lambda_rmr")
# LossCfg fields with a trainer flag of the same name (--lambda-*, the research switches, --series-len).
LOSS_FLAGS = _LAMBDAS + ("temporal_shuffle", "local_weighting", "local_scope", "series_len", "lambda_cross_local")
_PAPER_LOSS = LossCfg()  # the defaults are the paper's loss
_NOT_RECORDED = ("inherited",)  # parse_args bookkeeping, not a setting
# torch releases whose inductor gives this model wrong gradients under --compile (measured on the CPU: torch
# 2.11.0's compiled step returns the eager loss but NaN in every gradient upstream of the local loss, while
# aot_eager, the model alone and the losses alone all compile correctly; torch 2.14.1 matches eager).
COMPILE_WRONG_ON = ((2, 11),)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(params, args, device: torch.device) -> torch.optim.Optimizer:
    kw = dict(lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps, weight_decay=args.wd)
    if device.type == "cuda":
        kw["fused"] = True  # one kernel for the whole update
    return torch.optim.AdamW(params, **kw)


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


def merge_section(overrides: Dict[str, Any], section: str, values: Dict[str, Any]) -> None:
    """Add ``values`` to the ``section`` dict override, keeping what --model-override put there."""
    cur = overrides.get(section)
    overrides[section] = dict(cur, **values) if isinstance(cur, dict) else dict(values)


def model_overrides(a: argparse.Namespace) -> Dict[str, Any]:
    """--model-override items plus the flags that set model config fields (--faithful, --lambda-*, the
    research switches, --series-len). A field set both ways is an error: one of the two would be dropped."""
    overrides: Dict[str, Any] = dict(parse_overrides(a.model_override))
    loss_dict = overrides.get("loss") if isinstance(overrides.get("loss"), dict) else {}
    clash = [k for k in LOSS_FLAGS if f"loss.{k}" in overrides or k in loss_dict]
    if a.faithful and "faithful" in overrides:
        clash.append("faithful")
    if clash:
        raise SystemExit(f"--model-override sets {clash}, which have their own flags "
                         f"({', '.join(flag(k) for k in clash)}): use the flags")
    if a.faithful:
        overrides["faithful"] = True
    loss = {k: getattr(a, k) for k in LOSS_FLAGS}
    if overrides.get("faithful") is True:  # parse_args checks --faithful; this catches --model-override faithful=true
        changed = [flag(k) for k, v in loss.items() if k not in _LAMBDAS and v != getattr(_PAPER_LOSS, k)]
        if changed:
            raise SystemExit(f"--model-override faithful=true cannot be combined with {', '.join(changed)}: faithful "
                             f"mode keeps the paper's loss (series of {_PAPER_LOSS.series_len} studies, time-ordered "
                             f"temporal loss, learned local weighting, per-sample local context, no cross-image local "
                             f"term)")
    merge_section(overrides, "loss", loss)
    return overrides


def model_config(a: argparse.Namespace) -> Tuple[Dict[str, Any], MedSTConfig]:
    """(overrides, MedSTConfig) of --model, --model-override and the flags that set config fields."""
    overrides = model_overrides(a)
    try:
        return overrides, get_model_config(a.model).replace(**overrides)
    except ValueError as e:
        raise UsageError(f"--model {a.model} / --model-override: {e}") from None


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


@dataclass
class Run:
    """Everything a training run is built from; the loop (train/loop.py) drives it, :meth:`close` releases it."""

    args: argparse.Namespace
    world: D.WorldInfo = None
    device: torch.device = None
    run_dir: str = ""
    lock: Optional[R.RunLock] = None
    log_handlers: List[logging.Handler] = field(default_factory=list)
    log_level: int = logging.NOTSET  # restored by close(): train() may be called from tests or notebooks
    vocab_sha256: str = ""
    data_path: Optional[str] = None  # what --data resolved to (None for random data)
    data_fingerprint: Optional[str] = None  # the index files' digest (None for random data)
    model: nn.Module = None
    cfg: MedSTConfig = None
    tokenizer: Any = None
    loader: Any = None
    n_series: int = 0
    steps_per_epoch: int = 0
    total_steps: int = 0
    eval_every: int = 0  # 0: validate at the end only
    validator: Optional[Validator] = None
    val_loss_fn: Optional[nn.Module] = None
    optimizer: torch.optim.Optimizer = None
    runner: StepRunner = None

    @property
    def primary(self) -> bool:
        return self.world.is_primary

    def recorded_args(self) -> Dict[str, Any]:
        """What args.json and the checkpoint record: the resolved flags plus what --data/--vocab resolved to."""
        d = {k: v for k, v in vars(self.args).items() if k not in _NOT_RECORDED}
        d["world_size"] = self.world.world_size
        d["data_path"], d["vocab_sha256"] = self.data_path, self.vocab_sha256
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        for h in self.log_handlers:
            log.removeHandler(h)
            h.close()
        self.log_handlers = []
        log.setLevel(self.log_level)
        D.cleanup()


def build_run(raw: argparse.Namespace) -> Run:
    """The run of ``raw`` (parsed CLI arguments), ready for its first step or a resume; on an error everything
    claimed so far (lock, log handlers, process group) is released."""
    run = Run(args=raw, log_level=log.level)
    try:
        _start(run, raw)
        overrides, cfg = model_config(run.args)
        index = check_inputs(run.args, cfg)  # the loaded index for --data <index folder>, else None
        _claim(run)
        data = _data_and_vocab(run)
        n_frozen = _build_model(run, overrides, cfg)
        data = _build_loaders(run, index, data)
        _build_optimization(run)
        _describe(run, n_frozen, data)
        return run
    except BaseException:
        run.close()
        raise


def _start(run: Run, raw: argparse.Namespace) -> None:
    """Device and process group, the resolved arguments, and the checks that need no file."""
    want_cuda = raw.device in (None, "cuda") and torch.cuda.is_available()
    run.world, run.device = D.init_distributed("cuda" if want_cuda else "cpu")
    a = run.args = resolve(raw, cuda_available=want_cuda)
    check_report_to(a.report_to)  # every rank, before any collective: a missing extra stops all of them
    check_compile_args(a.compile, a.gather_with_grad)
    if run.device.type == "cpu" and a.amp != "none":
        # measured 2.5x slower than fp32 for this model on a CPU: the bf16/fp16 kernels there are no faster
        log.warning("--amp %s on a CPU: CPU autocast is slower than fp32 here (--amp none is faster)", a.amp)
    if a.kernels:
        set_backend(a.kernels)


def _claim(run: Run) -> None:
    """Claim the run folder (collective) and start the run's log."""
    a = run.args
    out = a.out or os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    run.run_dir = D.broadcast_object(os.path.abspath(out))  # collective: rank 0's clock names the folder
    run.lock, removed = R.claim(run.run_dir, a.resume, getattr(a, "overwrite", False), run.primary)
    run.log_handlers = setup_logging(run.run_dir, run.primary)
    if removed:
        log.info("removed %d file(s) left by interrupted writes: %s", len(removed), removed)
    if getattr(a, "inherited", None):
        log.info("--resume: taking %s from the run's args.json (flags not given on the command line)",
                 ", ".join(flag(k) for k in a.inherited))
    if a.quick_start:  # the synthetic CPU run's own defaults (train/quickstart.py): say which, once
        log.info("%s", describe_quick_start(a.quick_start))


def _data_and_vocab(run: Run) -> Optional[str]:
    """The data folder and the vocabulary (the synthetic set brings its own); returns the data path."""
    a, primary = run.args, run.primary
    vocab = a.vocab or os.environ.get("MEDST_FAST_VOCAB") or None
    data = a.data
    if a.dataset_type == "synthetic":
        if primary:
            ensure_synthetic(a.cache_dir, a.synthetic_patients, seed=0, workers=a.workers)
        D.barrier()  # collective: the other ranks wait for rank 0's build, then find it complete
        data, syn_vocab = ensure_synthetic(a.cache_dir, a.synthetic_patients, seed=0)
        vocab = vocab or syn_vocab
    elif a.dataset_type == "random" and vocab is None:
        if primary:
            build_wordpiece_vocab(RandomSeriesDataset(64, None, 8, seed=a.seed).texts(), run.run_dir)
        D.barrier()  # collective
        vocab = os.path.join(run.run_dir, "vocab.txt")
    a.vocab = os.path.abspath(vocab)
    run.vocab_sha256 = file_digest(a.vocab)
    run.data_path = os.path.abspath(data) if data else None
    return data


def _build_model(run: Run, overrides: Dict[str, Any], cfg: MedSTConfig) -> int:
    """The tokenizer, then the model (its vocab size from the tokenizer), its starting weights, on the device;
    returns how many parameters were frozen as unused."""
    a = run.args
    tok = MedSTTokenizer(a.vocab, max_length=cfg.text.max_length)
    if tok.vocab_size != cfg.text.vocab_size:
        log.info("vocab %s has %d tokens; model %s expects %d: using text.vocab_size=%d",
                 a.vocab, tok.vocab_size, a.model, cfg.text.vocab_size, tok.vocab_size)
        merge_section(overrides, "text", {"vocab_size": tok.vocab_size})
    set_seed(a.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = create_model(a.model, **overrides)
    if a.init:
        notes = (load_checkpoint(model, a.init) if a.init_kind == "auto"
                 else load_official_checkpoint(model, a.init, a.init_kind))
        log.info("initialised from %s (%s)", a.init, "; ".join(notes or []) or "all keys matched")
    if a.text_init:
        load_hf_bert(model, a.text_init)
        log.info("text tower initialised from %s", a.text_init)
    if a.grad_checkpointing:
        model.set_grad_checkpointing(True)
    frozen = freeze_unused(model)
    run.model, run.cfg, run.tokenizer = model.to(run.device), model.cfg, tok
    return len(frozen)


def _build_loaders(run: Run, index, data: Optional[str]) -> Optional[str]:
    """The training loader, the step counts, and the validator; returns the data folder it reads."""
    a, world = run.args, run.world
    if a.dataset_type == "manifest":  # converted once, on rank 0, into the run folder
        index_dir = os.path.join(run.run_dir, "manifest_index")
        if run.primary:
            manifest.index_from_manifest(data, index_dir)
        D.barrier()  # collective
        data = index_dir
    # Every back-end yields the batches of SeriesBatchSampler(n_series, batch_series, rank, world, seed): the
    # data order, crops and step count do not depend on --loader (data/loaders.py).
    source = index if index is not None else data  # the index check_inputs loaded is not read again
    run.loader, run.n_series = build_train_loader(
        a.dataset_type, source, a.split, run.tokenizer, run.cfg.vision.img_size, a.batch_series, world.rank,
        world.world_size, a.seed, a.workers, run.device, backend=a.loader,
        replicate_collate_bug=a.replicate_collate_bug, n_random=a.random_series,
        series_len=run.cfg.loss.series_len)  # the data's N is the temporal loss's N
    # after the loader, which read the index (and named any problem with it)
    run.data_fingerprint = index_fingerprint(data) if a.dataset_type != "random" else None
    if a.dataset_type == "random":  # build_series_loader logs its own choice
        log.info("loader: %s (%s)", run.loader.backend, run.loader.reason)
    _count_steps(run)
    run.validator = _build_validator(run, source)
    return data


def _count_steps(run: Run) -> None:
    a = run.args
    run.steps_per_epoch = len(run.loader) // a.accum_steps
    if run.steps_per_epoch == 0:
        raise SystemExit(f"an epoch has {len(run.loader)} batches per rank, fewer than --accum-steps {a.accum_steps}")
    run.total_steps = run.steps_per_epoch * a.epochs
    if a.max_steps:
        run.total_steps = min(run.total_steps, a.max_steps)
    run.eval_every = run.steps_per_epoch if a.eval_every is None else a.eval_every


def _build_validator(run: Run, data) -> Optional[Validator]:
    """The validation pass over the index's 'valid' split with the training back-end, or None (logged why)."""
    a, W = run.args, run.world.world_size
    if a.dataset_type == "random":
        log.info("validation: off (--dataset-type random has no %r split)", VAL_SPLIT)
        return None
    n = split_size(data, VAL_SPLIT, run.cfg.loss.series_len)
    if n < W:
        log.info("validation: off (%s has %d series in its %r split, fewer than the %d rank(s))", run.data_path, n,
                 VAL_SPLIT, W)
        return None
    bs = min(a.batch_series, n // W)
    with _without_loader_line():  # the training loader's line already said which back-end runs and why
        loader, _ = build_train_loader(a.dataset_type, data, VAL_SPLIT, run.tokenizer, run.cfg.vision.img_size,
                                       bs, run.world.rank, W, a.seed, a.workers, run.device,
                                       backend=run.loader.backend, replicate_collate_bug=a.replicate_collate_bug,
                                       train=False, series_len=run.cfg.loss.series_len)
    when = f"every {run.eval_every} steps and at the end" if run.eval_every else "at the end"
    log.info("validation: %d of the %d series of the %r split (%d per batch and rank, centre crops), %s; the "
             "model with the lowest validation loss is exported to %s", len(loader) * bs * W, n, VAL_SPLIT, bs,
             when, os.path.join(run.run_dir, "best"))
    run.val_loss_fn = MedSTLoss(run.cfg.loss, run.cfg.faithful)  # per rank: no gather, no gradients
    return Validator(loader, n, bs)


def _build_optimization(run: Run) -> None:
    """AdamW over the trained parameters, the model + loss module (DDP, compile) and its step runner."""
    a = run.args
    params = [p for p in run.model.parameters() if p.requires_grad]
    run.optimizer = build_optimizer(params, a, run.device)
    loss_fn = MedSTLoss(run.cfg.loss, run.cfg.faithful, gather=D.make_gather(a.gather_with_grad))
    module = wrap_module(PretrainModule(run.model, loss_fn), a.compile, run.world.distributed, run.device)
    run.runner = StepRunner(module, run.optimizer, run.device, a.amp, a.accum_steps, a.clip_grad)


def _describe(run: Run, n_frozen: int, data: Optional[str]) -> None:
    a, W = run.args, run.world.world_size
    n_par = sum(p.numel() for p in run.model.parameters())
    log.info("model %s (%.1f M parameters, %d frozen as unused), device %s x %d, amp %s, data %s (%d series)",
             a.model, n_par / 1e6, n_frozen, run.device, W, a.amp, data or a.dataset_type, run.n_series)
    log.info("batch: %d series per rank, %d per step over %d rank(s), %d effective with --accum-steps %d; "
             "%d steps per epoch, %d steps in total", a.batch_series, a.batch_series * W, W,
             a.batch_series * W * a.accum_steps, a.accum_steps, run.steps_per_epoch, run.total_steps)
