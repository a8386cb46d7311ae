"""Command-line arguments of ``python -m medst_fast.pretrain``, grouped; defaults follow the official recipe.

Defaults (docs/method.md §5): AdamW (0.9, 0.999), lr 4e-5, weight decay 0.05 on every parameter, a per-step
cosine schedule with 40 % linear warm-up from min_lr 1e-8, 8 epochs, loss weights 1/1/1, 10 series per
GPU. Values left as None ("auto") are resolved at start-up (device, model, precision, workers, out).
The synthetic quick start (no --data, on the CPU, medst_tiny) has its own defaults for the flags not given
(train/quickstart.py says which and why).

Where a value comes from, highest first: the command line, the ``--config`` file, the resumed run's
``args.json`` (``--resume`` with a run that has one), the defaults. Values from files are checked against
the flag's type and choices (JSON ``"false"`` is not false, 2.5 is not an int) with errors naming the file
and the field, and every value, whatever its source, is range-checked.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any, Dict, List, Optional, Set

from . import quickstart


class UsageError(SystemExit):
    """A flag, or a file a flag names, that cannot be used: the command line prints the one-line message and exits 2
    (argparse's status for usage errors). A SystemExit, so that code which calls the trainer without that command
    line still stops with the message rather than a traceback."""


DEFAULT_SYNTHETIC_PATIENTS = 40
SERIES_LEN_DEFAULT, SERIES_LEN_MIN, SERIES_LEN_MAX = 4, 2, 8  # the paper's series have 4 studies
# Flags a resumed run does not take from its args.json: where and how to run, not what the run is.
NOT_INHERITED = {"config", "resume", "out", "overwrite", "allow_changed_args", "device", "workers", "progress",
                 "progress_interval", "kernels", "init", "init_kind", "text_init"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m medst_fast.pretrain",
        description="Med-ST pretraining. With no --data it trains on a small synthetic MIMIC-CXR set "
                    "generated into --cache-dir. Multi-GPU: torchrun --nproc_per_node=N -m medst_fast.pretrain ...",
        epilog=quickstart.HELP, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None, help="JSON file whose keys (flag names, '-' or '_') become the defaults")
    for add in (_model_flags, _data_flags, _optimisation_flags, _device_flags, _run_flags):
        add(p)
    return p


def _model_flags(p: argparse.ArgumentParser) -> None:
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


def _data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="prepared index folder or generic manifest CSV (default: built-in synthetic set)")
    g.add_argument("--dataset-type", default="auto", choices=["auto", "index", "manifest", "synthetic", "random"],
                   help="auto: synthetic without --data, index for a folder, manifest for a .csv; random: in-memory "
                        "random tensors (throughput tests, no I/O)")
    g.add_argument("--cache-dir", default=None, help="cache for the synthetic set (default: $MEDST_FAST_CACHE or ~/.cache/medst_fast)")
    g.add_argument("--synthetic-patients", type=int, default=DEFAULT_SYNTHETIC_PATIENTS, help="patients in the synthetic set")
    g.add_argument("--random-series", type=int, default=64, help="series in the --dataset-type random set")
    g.add_argument("--split", default="train", help="index split to train on")
    g.add_argument("--batch-series", type=int, default=10, help="series (up to --series-len studies each) per step per rank")
    g.add_argument("--workers", type=int, default=None,
                   help="per rank: PIL loader worker processes, or the file-reading threads of the dali/nvjpeg "
                        "loaders (default: from CPU count)")
    g.add_argument("--loader", default="auto", choices=["auto", "dali", "nvjpeg", "pil"],
                   help="input pipeline for prepared data (index, manifest, synthetic): auto = DALI on a GPU, else "
                        "torchvision nvJPEG + the extension's resize op, else PIL worker processes; one log line "
                        "says which and why. Every back-end yields the same batches (series, order, crops; pixels "
                        "within one grey level of JPEG decoding), so it does not change the data: a resumed run "
                        "keeps the run's back-end unless this flag is given, and may change it freely")
    g.add_argument("--replicate-collate-bug", action="store_true",
                   help="reproduce the official lateral misalignment in collation (docs/method.md §6.2.1)")


def _optimisation_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=8, help="passes over the training series (the paper: 8)")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (the schedule spans them)")
    g.add_argument("--lr", type=float, default=4e-5, help="peak learning rate of the cosine schedule")
    g.add_argument("--min-lr", type=float, default=1e-8, help="learning rate at the start of warm-up and the end")
    g.add_argument("--warmup-frac", type=float, default=0.4, help="fraction of the steps spent in linear warm-up")
    g.add_argument("--wd", type=float, default=0.05, help="AdamW weight decay (all parameters, as the official)")
    g.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--beta2", type=float, default=0.999, help="AdamW beta2")
    g.add_argument("--eps", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--accum-steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--clip-grad", type=float, default=None, help="clip the global gradient norm to this value")
    g.add_argument("--lambda-ita", type=float, default=1.0, help="weight of the global image-text loss")
    g.add_argument("--lambda-local", type=float, default=1.0, help="weight of the local alignment loss")
    g.add_argument("--lambda-temporal", type=float, default=1.0, help="weight of the temporal loss (FMC + RMR)")
    g.add_argument("--lambda-fmc", type=float, default=1.0, help="weight of FMC inside the temporal loss (ablation)")
    g.add_argument("--lambda-rmr", type=float, default=1.0, help="weight of RMR inside the temporal loss (ablation)")
    # Research switches (docs/method.md §8): the defaults are the paper's loss; each sets its loss.* model config
    # field.
    g.add_argument("--temporal-shuffle", action="store_true",
                   help="control run: permute each complete series' studies (images and reports alike) before the "
                        "temporal loss, so time order carries no signal (loss.temporal_shuffle)")
    g.add_argument("--local-weighting", default="learned", choices=["learned", "uniform"],
                   help="token weights of the local loss: the learned 1-head attention (paper) or uniform over the "
                        "valid tokens, which freezes the weighting attention (loss.local_weighting)")
    g.add_argument("--local-scope", default="sample", choices=["sample", "batch"],
                   help="context pool of each token in the local loss: its own sample (paper) or every sample of "
                        "the rank's batch (loss.local_scope)")
    g.add_argument("--lambda-cross-local", type=float, default=0.0, metavar="W",
                   help="weight of an extra cross-image local contrast (each report's words against every image's "
                        "patches of the rank's batch, GLoRIA/FILIP-like; kernels/cross_local.py) added to the loss; "
                        "0 (default) is the paper's loss (loss.lambda_cross_local)")
    g.add_argument("--series-len", type=int, default=SERIES_LEN_DEFAULT,
                   help=f"studies per series ({SERIES_LEN_MIN}..{SERIES_LEN_MAX}): the data is cut into series of "
                        f"this length and the temporal loss runs over the complete ones (loss.series_len)")
    g.add_argument("--gather-with-grad", action="store_true",
                   help="global contrastive loss over all ranks' batches (the official contrasts within a GPU)")
    g.add_argument("--max-bad-steps", type=int, default=5, help="stop after this many non-finite losses in a row")


def _device_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("precision and device")
    g.add_argument("--amp", default=None, choices=["bf16", "fp16", "none"],
                   help="autocast dtype (default: bf16 on CUDA, none on CPU); GradScaler only for fp16")
    g.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    g.add_argument("--seed", type=int, default=42, help="seed of weights, data order and augmentation")


def _run_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="run folder (default: runs/<timestamp>)")
    g.add_argument("--resume", default=None,
                   help="checkpoint path, run folder, or 'auto' (newest intact checkpoint in --out; none: start). "
                        "Flags not given take the run's args.json values")
    g.add_argument("--allow-changed-args", action="store_true",
                   help="resume although run-defining settings (lr, schedule, steps, data, ...) differ from the "
                        "checkpoint's (each change is logged)")
    g.add_argument("--overwrite", action="store_true",
                   help="start a fresh run in an --out that holds another run (deletes its checkpoints and exports)")
    g.add_argument("--save-every", type=int, default=500, help="checkpoint every N optimizer steps (and at the end)")
    g.add_argument("--keep", type=int, default=3, help="keep the last K checkpoints")
    g.add_argument("--log-every", type=int, default=10, help="log line and metrics row every N steps")
    g.add_argument("--eval-every", type=int, default=None,
                   help="validation (loss and image-to-report R@1/R@5 on the 'valid' split) every N steps and at the "
                        "end; 0: only at the end; default: once per epoch. The best model by validation loss is "
                        "exported to <out>/best")
    g.add_argument("--report-to", default="",
                   help="comma list of csv, tensorboard, wandb: csv is <out>/metrics.csv (always written), "
                        "tensorboard writes <out>/tensorboard (pip install medst_fast[tensorboard]), wandb logs to "
                        "Weights & Biases, project $WANDB_PROJECT or medst_fast (pip install medst_fast[wandb])")
    g.add_argument("--progress", default="auto", choices=["auto", "on", "off"],
                   help="auto: a tqdm bar when stderr is a terminal, else a progress log line at most every "
                        "--progress-interval seconds without other log lines; on: a tqdm bar even to a file")
    g.add_argument("--progress-interval", type=float, default=30.0,
                   help="seconds between progress updates when stderr is not a terminal")
    g.add_argument("--no-export", action="store_true", help="skip the save_pretrained exports (final/ and final_encoder/ at the end, best/ after validations)")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = build_parser()
    pre, _ = p.parse_known_args(argv)
    from_config: Dict[str, Any] = {}
    if pre.config:
        from_config = _config_defaults(p, pre.config)
        p.set_defaults(**from_config)
    args = p.parse_args(argv)
    explicit = _explicit_dests(argv) | set(from_config)
    args.inherited = _inherit_run_args(p, args, explicit)
    # resolve() gives the synthetic quick start its own defaults, only for flags the user did not set
    args.quick_start_settings = quickstart.user_settings(explicit, run_args_path(args.resume, args.out))
    _validate(args, p)
    return args


def _explicit_dests(argv: Optional[List[str]]) -> Set[str]:
    """Destinations given on the command line: a parser whose defaults are all SUPPRESS keeps only those."""
    q = build_parser()
    for a in q._actions:
        a.default = argparse.SUPPRESS
    return set(vars(q.parse_known_args(argv)[0]))


def _actions(p: argparse.ArgumentParser) -> Dict[str, argparse.Action]:
    return {a.dest: a for a in p._actions if a.dest != "help"}


def check_value(action: argparse.Action, value: Any, where: str) -> Any:
    """A value from a file for ``action``: the type the command line would produce, within its choices."""
    flag = "--" + action.dest.replace("_", "-")

    def fail(want):
        raise SystemExit(f"{where}: field {action.dest!r} ({flag}): expected {want}, got {value!r} "
                         f"({type(value).__name__})")

    if value is None:
        if action.default is None:
            return None
        fail("a value (null is allowed only where the default is 'auto')")
    if action.nargs == 0:  # store_true
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if isinstance(action, argparse._AppendAction):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            fail("a list of strings")
        return list(value)
    if action.type is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
    elif action.type is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number")
        value = float(value)
    elif not isinstance(value, str):
        fail("a string")
    if action.choices is not None and value not in action.choices:
        fail(f"one of {list(action.choices)}")
    return value


def _config_defaults(p: argparse.ArgumentParser, path: str) -> dict:
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"--config {path}: cannot read ({e})")
    if not isinstance(d, dict):
        raise SystemExit(f"--config {path}: top level must be an object of flag names")
    acts = _actions(p)
    out = {}
    for k, v in d.items():
        dest = k.lstrip("-").replace("-", "_")
        if dest not in acts or dest == "config":
            raise SystemExit(f"--config {path}: unknown field {k!r} (fields are flag names, e.g. \"lr\" or "
                             f"\"batch-series\")")
        out[dest] = check_value(acts[dest], v, f"--config {path}")
    return out


def run_args_path(resume: Optional[str], out: Optional[str]) -> Optional[str]:
    """The args.json of the run that ``--resume`` continues (None when there is none)."""
    if not resume:
        return None
    if resume == "auto":
        folder = out
    elif os.path.isdir(resume):
        folder = resume
    else:  # a checkpoint file: <run>/checkpoints/ckpt-*.pt
        folder = os.path.dirname(os.path.dirname(os.path.abspath(resume)))
    path = os.path.join(folder, "args.json") if folder else None
    return path if path and os.path.isfile(path) else None


def _inherit_run_args(p: argparse.ArgumentParser, args: argparse.Namespace, explicit: Set[str]) -> List[str]:
    """Fill flags not given explicitly from the resumed run's args.json; returns the names taken."""
    path = run_args_path(args.resume, args.out)
    if path is None:
        return []
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"{path}: cannot read the run's arguments ({e}); give every flag explicitly or fix the file")
    if not isinstance(d, dict):
        raise SystemExit(f"{path}: top level must be an object of flag values")
    acts = _actions(p)
    taken = []
    for dest, v in sorted(d.items()):
        if dest not in acts or dest in NOT_INHERITED or dest in explicit:
            continue  # extra keys (world_size, hashes) are the trainer's records, not flags
        if dest == "report_to" and isinstance(v, list):
            v = ",".join(v)
        v = check_value(acts[dest], v, path)
        if v != getattr(args, dest):
            setattr(args, dest, v)
            taken.append(dest)
    return taken


def _validate(a: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    def bad(msg):
        p.error(msg)

    def flag(name):
        return "--" + name.replace("_", "-")

    for name in ("batch_series", "accum_steps", "epochs", "log_every", "save_every", "max_bad_steps", "keep",
                 "synthetic_patients", "random_series"):
        if getattr(a, name) < 1:
            bad(f"{flag(name)} must be >= 1, got {getattr(a, name)}")
    if a.seed < 0:  # numpy's seeding (sampler, crops) takes only non-negative integers
        bad(f"--seed must be >= 0, got {a.seed}")
    if a.max_steps is not None and a.max_steps < 1:
        bad(f"--max-steps must be >= 1, got {a.max_steps}")
    if a.eval_every is not None and a.eval_every < 0:
        bad(f"--eval-every must be >= 0 (0: only at the end), got {a.eval_every}")
    if not (math.isfinite(a.progress_interval) and a.progress_interval >= 0):
        bad(f"--progress-interval must be a finite number >= 0, got {a.progress_interval}")
    # written as "not (x >= 0)" so that NaN (JSON NaN, or the literal 'nan' on the command line) fails too
    for name in ("lr", "min_lr", "wd", "lambda_ita", "lambda_local", "lambda_temporal", "lambda_fmc", "lambda_rmr",
                 "lambda_cross_local"):
        v = getattr(a, name)
        if not (math.isfinite(v) and v >= 0):
            bad(f"{flag(name)} must be a finite number >= 0, got {v}")
    if not SERIES_LEN_MIN <= a.series_len <= SERIES_LEN_MAX:
        bad(f"--series-len must be in {SERIES_LEN_MIN}..{SERIES_LEN_MAX}, got {a.series_len}")
    if a.faithful:  # faithful is the official code's maths: none of the research switches exist there
        changed = [f for f, v, d in (("--series-len", a.series_len, SERIES_LEN_DEFAULT),
                                      ("--temporal-shuffle", a.temporal_shuffle, False),
                                      ("--local-weighting", a.local_weighting, "learned"),
                                      ("--local-scope", a.local_scope, "sample"),
                                      ("--lambda-cross-local", a.lambda_cross_local, 0.0)) if v != d]
        if changed:
            bad(f"--faithful cannot be combined with {', '.join(changed)}: faithful mode keeps the paper's loss "
                f"(series of {SERIES_LEN_DEFAULT} studies, time-ordered temporal loss, learned local weighting, "
                f"per-sample local context, no cross-image local term)")
    if a.min_lr > a.lr:
        bad(f"--min-lr {a.min_lr} is above --lr {a.lr}: the schedule would rise instead of decay")
    for name in ("beta1", "beta2"):
        v = getattr(a, name)
        if not 0.0 <= v < 1.0:
            bad(f"{flag(name)} must be in [0, 1), got {v}")
    if not (math.isfinite(a.eps) and a.eps > 0):
        bad(f"--eps must be a finite number > 0, got {a.eps}")
    if a.clip_grad is not None and not (math.isfinite(a.clip_grad) and a.clip_grad > 0):
        bad(f"--clip-grad must be a finite number > 0 (omit it for no clipping), got {a.clip_grad}")
    if not 0.0 <= a.warmup_frac < 1.0:
        bad(f"--warmup-frac must be in [0, 1), got {a.warmup_frac}")
    if a.workers is not None and a.workers < 0:
        bad("--workers must be >= 0")
    if a.resume == "auto" and not a.out:
        bad("--resume auto needs --out (the run folder to resume)")
    if a.overwrite and a.resume:
        bad("--overwrite starts a fresh run; it cannot be combined with --resume")
    bad_reports = [r for r in _report_list(a.report_to) if r not in ("csv", "tensorboard", "wandb")]
    if bad_reports:
        bad(f"--report-to: unknown backend(s) {bad_reports}; supported: csv, tensorboard, wandb")


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
    quick_start_settings = vars(a).pop("quick_start_settings", None)  # parse_args' bookkeeping, not a setting
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
    a.quick_start = quickstart.apply(a, quick_start_settings)  # recorded in args.json: what it applied
    a.report_to = _report_list(a.report_to)
    if a.amp not in ("bf16", "fp16", "none"):  # parse_args checks this; a Namespace built in code may not
        raise SystemExit(f"--amp {a.amp!r}: expected bf16, fp16 or none")
    if a.device not in ("cpu", "cuda"):
        raise SystemExit(f"--device {a.device!r}: expected cpu or cuda")
    return a
