"""Command-line arguments of ``python -m medst_fast.pretrain``, grouped; defaults follow the official recipe.

Defaults (medst-spec §4): AdamW (0.9, 0.999), lr 4e-5, weight decay 0.05 on every parameter, a per-step
cosine schedule with 40 % linear warm-up from min_lr 1e-8, 8 epochs, loss weights 1/1/1, 10 series per
GPU. Values left as None ("auto") are resolved at start-up (device, model, precision, workers, out).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import List, Optional

DEFAULT_SYNTHETIC_PATIENTS = 40


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m medst_fast.pretrain",
        description="Med-ST pretraining. With no --data it trains on a small synthetic MIMIC-CXR set "
                    "generated into --cache-dir. Multi-GPU: torchrun --nproc_per_node=N -m medst_fast.pretrain ...",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None, help="JSON file whose keys (flag names, '-' or '_') become the defaults")

    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="model config name (default: medst_tiny on CPU, medst_vit_b16 on GPU)")
    g.add_argument("--model-override", action="append", default=[], metavar="KEY=VALUE",
                   help="model config field, e.g. vision.img_size=64 or text.max_length=64 (repeatable; JSON values)")
    g.add_argument("--faithful", action="store_true", help="official semantics, quirks included (MedSTConfig.faithful)")
    g.add_argument("--init", default=None, help="initial weights: official Med-ST or MGCA checkpoint (converted)")
    g.add_argument("--init-kind", default="auto", choices=["auto", "medst", "mgca"],
                   help="layout of --init; auto detects it from the key names")
    g.add_argument("--text-init", default=None, help="local Hugging Face BERT folder for the text tower (e.g. BioClinicalBERT)")
    g.add_argument("--vocab", default=None,
                   help="WordPiece vocab.txt (default: $MEDST_FAST_VOCAB, else one built from the synthetic reports)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute transformer blocks in backward")
    g.add_argument("--compile", action="store_true", help="torch.compile the model and loss")
    g.add_argument("--kernels", default=None, choices=["triton", "torch"],
                   help="fused-op backend (default: $MEDST_FAST_KERNELS or triton where available)")

    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="prepared index folder or generic manifest CSV (default: built-in synthetic set)")
    g.add_argument("--dataset-type", default="auto", choices=["auto", "index", "manifest", "synthetic", "random"],
                   help="auto: synthetic without --data, index for a folder, manifest for a .csv; random: in-memory "
                        "random tensors (throughput tests, no I/O)")
    g.add_argument("--cache-dir", default=None, help="cache for the synthetic set (default: $MEDST_FAST_CACHE or ~/.cache/medst_fast)")
    g.add_argument("--synthetic-patients", type=int, default=DEFAULT_SYNTHETIC_PATIENTS, help="patients in the synthetic set")
    g.add_argument("--random-series", type=int, default=64, help="series in the --dataset-type random set")
    g.add_argument("--split", default="train", help="index split to train on")
    g.add_argument("--batch-series", type=int, default=10, help="series (up to 4 studies each) per step per rank")
    g.add_argument("--workers", type=int, default=None, help="data-loader worker processes per rank (default: from CPU count)")
    g.add_argument("--replicate-collate-bug", action="store_true",
                   help="reproduce the official lateral misalignment in collation (spec §6.1 item 1)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=8)
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (the schedule spans them)")
    g.add_argument("--lr", type=float, default=4e-5)
    g.add_argument("--min-lr", type=float, default=1e-8)
    g.add_argument("--warmup-frac", type=float, default=0.4, help="fraction of the steps spent in linear warm-up")
    g.add_argument("--wd", type=float, default=0.05, help="AdamW weight decay (all parameters, as the official)")
    g.add_argument("--beta1", type=float, default=0.9)
    g.add_argument("--beta2", type=float, default=0.999)
    g.add_argument("--eps", type=float, default=1e-8)
    g.add_argument("--accum-steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--clip-grad", type=float, default=None, help="clip the global gradient norm to this value")
    g.add_argument("--lambda-ita", type=float, default=1.0)
    g.add_argument("--lambda-local", type=float, default=1.0)
    g.add_argument("--lambda-temporal", type=float, default=1.0)
    g.add_argument("--lambda-fmc", type=float, default=1.0, help="weight of FMC inside the temporal loss (ablation)")
    g.add_argument("--lambda-rmr", type=float, default=1.0, help="weight of RMR inside the temporal loss (ablation)")
    g.add_argument("--gather-with-grad", action="store_true",
                   help="global contrastive loss over all ranks' batches (the official contrasts within a GPU)")
    g.add_argument("--max-bad-steps", type=int, default=5, help="stop after this many non-finite losses in a row")

    g = p.add_argument_group("precision and device")
    g.add_argument("--amp", default=None, choices=["bf16", "fp16", "none"],
                   help="autocast dtype (default: bf16 on CUDA, none on CPU); GradScaler only for fp16")
    g.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    g.add_argument("--seed", type=int, default=42)

    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="run folder (default: runs/<timestamp>)")
    g.add_argument("--resume", default=None, help="checkpoint path, run folder, or 'auto' (latest in --out; none: start)")
    g.add_argument("--save-every", type=int, default=500, help="checkpoint every N optimizer steps (and at the end)")
    g.add_argument("--keep", type=int, default=3, help="keep the last K checkpoints")
    g.add_argument("--log-every", type=int, default=10, help="log line and metrics row every N steps")
    g.add_argument("--report-to", default="", help="comma list; 'tensorboard' writes <out>/tensorboard")
    g.add_argument("--progress", default="auto", choices=["auto", "on", "off"], help="tqdm bar (auto: when stderr is a TTY)")
    g.add_argument("--no-export", action="store_true", help="skip the save_pretrained exports at the end")
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = build_parser()
    pre, _ = p.parse_known_args(argv)
    if pre.config:
        p.set_defaults(**_config_defaults(p, pre.config))
    args = p.parse_args(argv)
    _validate(args, p)
    return args


def _config_defaults(p: argparse.ArgumentParser, path: str) -> dict:
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"--config {path}: cannot read ({e})")
    if not isinstance(d, dict):
        raise SystemExit(f"--config {path}: top level must be an object of flag names")
    known = {a.dest for a in p._actions}
    out = {}
    for k, v in d.items():
        dest = k.lstrip("-").replace("-", "_")
        if dest not in known or dest == "config":
            raise SystemExit(f"--config {path}: unknown field {k!r}")
        out[dest] = v
    return out


def _validate(a: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    def bad(msg):
        p.error(msg)

    for name in ("batch_series", "accum_steps", "epochs", "log_every", "save_every", "max_bad_steps"):
        if getattr(a, name) < 1:
            bad(f"--{name.replace('_', '-')} must be >= 1")
    if a.max_steps is not None and a.max_steps < 1:
        bad("--max-steps must be >= 1")
    if not 0.0 <= a.warmup_frac < 1.0:
        bad("--warmup-frac must be in [0, 1)")
    if a.keep < 1:
        bad("--keep must be >= 1")
    if a.workers is not None and a.workers < 0:
        bad("--workers must be >= 0")
    if a.resume == "auto" and not a.out:
        bad("--resume auto needs --out (the run folder to resume)")
    bad_reports = [r for r in _report_list(a.report_to) if r not in ("tensorboard",)]
    if bad_reports:
        bad(f"--report-to: unknown backend(s) {bad_reports}; supported: tensorboard")


def parse_overrides(items: List[str]) -> dict:
    """["vision.img_size=64", ...] -> {"vision.img_size": 64}; values parsed as JSON, else kept as text."""
    out = {}
    for it in items or []:
        if "=" not in it:
            raise SystemExit(f"--model-override {it!r}: expected KEY=VALUE, e.g. vision.img_size=64")
        k, v = it.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def _report_list(s: str) -> List[str]:
    return [r.strip() for r in (s or "").split(",") if r.strip()]


def resolve(a: argparse.Namespace, cuda_available: bool) -> argparse.Namespace:
    """Fill the "auto" values; the result is what gets written to <out>/args.json."""
    a = argparse.Namespace(**vars(a))
    if a.device is None:
        a.device = "cuda" if cuda_available else "cpu"
    if a.device == "cuda" and not cuda_available:
        raise SystemExit("--device cuda: no CUDA device available")
    if a.model is None:
        a.model = "medst_vit_b16" if a.device == "cuda" else "medst_tiny"
    if a.amp is None:
        a.amp = "bf16" if a.device == "cuda" else "none"
    if a.workers is None:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        a.workers = min(8, max(0, n // 2)) if a.device == "cuda" else (1 if n > 1 else 0)
    if a.cache_dir is None:
        a.cache_dir = os.environ.get("MEDST_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "medst_fast")
    if a.dataset_type == "auto":
        if a.data is None:
            a.dataset_type = "synthetic"
        elif os.path.isdir(a.data):
            a.dataset_type = "index"
        elif a.data.lower().endswith(".csv"):
            a.dataset_type = "manifest"
        else:
            raise SystemExit(f"--data {a.data}: neither a prepared index folder nor a .csv manifest")
    if a.dataset_type in ("index", "manifest") and not a.data:
        raise SystemExit(f"--dataset-type {a.dataset_type} needs --data")
    a.report_to = _report_list(a.report_to)
    return a
