"""CLI: ``python -m medst_fast.eval TASK (--checkpoint PATH [--model NAME] | --random-init NAME) --data PATH``.

Each task is a subcommand with its own ``--help``; ``all`` runs every task whose data it finds. A
checkpoint folder brings its config and vocab.txt, a trainer checkpoint its config (and its run's vocab).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import sys
import warnings
from typing import Dict, List, Optional

from . import common
from .report import TASKS, TaskResult, to_markdown, write_report

log = logging.getLogger("medst_fast")

HELP = {
    "msxrt-image": "MS-CXR-T temporal image classification (linear SVC on [current || previous] embeddings)",
    "msxrt-sentence": "MS-CXR-T temporal sentence similarity (cosine of sentence embeddings)",
    "rsna-zeroshot": "zero-shot RSNA pneumonia (BioViL prompts)",
    "covidx-probe": "COVIDx linear probe on the frozen 768-d CLS",
    "all": "every task above whose data is under --data (msxrt/, rsna/, covidx/ as medst_fast.data.synth "
           "writes them); without --data, the synthetic evaluation sets of the run the checkpoint comes from",
}
TEXT_TASKS = ("msxrt-sentence", "rsna-zeroshot")
# where ``all`` looks for each task's data under its root (the layout medst_fast.data.synth writes)
SUBDIRS = {"msxrt-image": "msxrt", "msxrt-sentence": "msxrt", "rsna-zeroshot": "rsna", "covidx-probe": "covidx"}


# Flag values are checked by argparse (usage error, exit 2, naming the flag) before a model is loaded: a
# --folds 1 or --batch-size 0 would otherwise fail minutes later inside scikit-learn or the DataLoader.
def _comma_list(s: str, cast, what: str) -> list:
    try:
        out = [cast(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of {what}, got {s!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("expected at least one value")
    return out


def _ints(s: str) -> List[int]:
    return _comma_list(s, int, "integers")


def _folds(s: str) -> List[int]:
    out = _ints(s)
    bad = [k for k in out if k < 2]
    if bad:
        raise argparse.ArgumentTypeError(f"cross-validation needs at least 2 folds, got {bad[0]}")
    return out


def _floats(s: str) -> List[float]:
    return _comma_list(s, float, "numbers")


def _fractions(s: str) -> List[float]:
    out = _floats(s)
    bad = [v for v in out if not 0 < v <= 1]
    if bad:
        raise argparse.ArgumentTypeError(f"training fractions must be in (0, 1], got {bad[0]}")
    return out


def _int_at_least(lo: int):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v
    return parse


def _names(s: str) -> List[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


def _model_args(p: argparse.ArgumentParser, text: bool) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", help="save_pretrained folder (e.g. a run's final/), or a checkpoint file")
    g.add_argument("--model", help="config name for a checkpoint file without its own config (e.g. an official "
                                   ".ckpt: medst_vit_b16)")
    g.add_argument("--random-init", metavar="NAME", help="evaluate NAME with random weights (baseline)")
    if text:
        g.add_argument("--vocab", help="tokenizer vocab.txt (default: the checkpoint folder's vocab.txt, or the "
                                       "vocabulary its training run used)")
    g.add_argument("--device", help="default: cuda when available, else cpu")
    g.add_argument("--seed", type=int, default=0, help="random-init weights and probe-head seed")
    g.add_argument("--no-baseline", action="store_true",
                   help="skip the random-init baseline (by default every --checkpoint task is run a second time "
                        "on a seeded random-init model of the same config, for the 'random init' column)")


def _data_args(p, required: bool, images: bool, data_help: str) -> argparse._ArgumentGroup:
    d = p.add_argument_group("data")
    d.add_argument("--data", required=required, help=data_help)
    if images:
        d.add_argument("--batch-size", type=_int_at_least(1), default=64)
        d.add_argument("--workers", type=_int_at_least(0), default=min(8, os.cpu_count() or 1),
                       help="image decoding processes")
    p.add_argument("--out", help="folder for TASK.md and TASK.csv (default: RUN/eval for a checkpoint of a "
                                 "training run, DIR/eval-NAME beside another checkpoint, ./eval_results for "
                                 "--random-init)")
    return d


def _msxrt_image_args(p, t) -> None:
    t.add_argument("--seeds", type=_ints, default=[42, 100, 666], help="shuffling seeds (comma list)")
    t.add_argument("--folds", type=_folds, default=[5, 10], help="CV fold counts (comma list, each >= 2)")
    t.add_argument("--views", choices=["frontal", "study"], default="frontal",
                   help="'frontal' (official) or 'study' (adds the study's lateral; MoVE models)")
    t.add_argument("--findings", type=_names, default=None,
                   help="comma list of findings to score (default: all five); one with too few labelled pairs "
                        "is reported as skipped")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m medst_fast.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="task", metavar="TASK", required=True)
    for task in list(TASKS) + ["all"]:
        sp = sub.add_parser(task, help=HELP[task], description=HELP[task])
        _model_args(sp, text=task in TEXT_TASKS or task == "all")
        t = sp.add_argument_group("protocol")
        if task == "msxrt-image":
            d = _data_args(sp, True, True, "the MS-CXR-T image CSV or its folder")
            d.add_argument("--images", help="image root: MIMIC-CXR-JPG root or flattened files/ (default: the CSV's "
                                            "folder and its parent)")
            d.add_argument("--metadata", help="mimic-cxr-2.0.0-metadata.csv for the MIMIC tree layout")
            _msxrt_image_args(sp, t)
        elif task == "msxrt-sentence":
            _data_args(sp, True, False, "the MS-CXR-T sentence CSV or its folder")
            t.add_argument("--subset", default="RadGraph", help="subset_name to score ('all' for every row)")
            t.add_argument("--official-join", action="store_true",
                           help='join cleaned sentences with "" as the official evaluation does (default " ")')
        elif task == "rsna-zeroshot":
            d = _data_args(sp, True, True, "stage_2_train_labels.csv or its folder")
            d.add_argument("--images", help="the DICOM folder (default DATA/stage_2_train_images)")
            t.add_argument("--split", default="test", choices=["test", "valid", "train", "all"])
            t.add_argument("--prompts", help='JSON {"positive": [...], "negative": [...]} replacing BioViL\'s')
            t.add_argument("--official-join", action="store_true", help='join cleaned prompts with ""')
        elif task == "covidx-probe":
            _data_args(sp, True, True, "the COVIDx folder (train.txt, test.txt, train/, test/)")
            _covidx_args(t)
        else:
            _data_args(sp, False, True, "folder holding msxrt/, rsna/ and/or covidx/ (default: the synthetic "
                                        "evaluation sets beside the run's training data)")
            _msxrt_image_args(sp, t)
            _covidx_args(t)
    return p


def _covidx_args(t) -> None:
    t.add_argument("--pcts", type=_fractions, default=[0.01, 0.1, 1.0],
                   help="training fractions (comma list, each in (0, 1])")
    t.add_argument("--max-epochs", type=_int_at_least(1), default=200, help="probe epochs (early stopping)")
    t.add_argument("--patience", type=_int_at_least(1), default=10, help="early-stopping patience (epochs)")


def _normalise_argv(argv: List[str]) -> List[str]:
    # msxrt_image and msxrt-image name the same task; only the dashed form is listed
    if argv and not argv[0].startswith("-"):
        argv = [argv[0].replace("_", "-")] + argv[1:]
    return argv


def run_task(task: str, args, model) -> TaskResult:
    if task == "msxrt-image":
        from . import msxrt_image

        csv = msxrt_image.find_csv(args.data)
        images = getattr(args, "images", None)
        roots = [images] if images else [os.path.dirname(csv), os.path.dirname(os.path.dirname(csv))]
        return msxrt_image.evaluate(model, csv, roots, getattr(args, "metadata", None), args.seeds, args.folds,
                                    args.batch_size, args.workers, views=args.views,
                                    findings=args.findings or msxrt_image.FINDINGS)
    if task == "msxrt-sentence":
        from . import msxrt_sentence

        tok = common.load_tokenizer(args.vocab, model, args.checkpoint)
        return msxrt_sentence.evaluate(model, tok, msxrt_sentence.find_csv(args.data), getattr(args, "subset", "RadGraph"),
                                       getattr(args, "official_join", False))
    if task == "rsna-zeroshot":
        from . import rsna_zeroshot

        tok = common.load_tokenizer(args.vocab, model, args.checkpoint)
        prompt_file = getattr(args, "prompts", None)
        prompts = rsna_zeroshot.read_prompts(prompt_file) if prompt_file else None
        return rsna_zeroshot.evaluate(model, tok, args.data, getattr(args, "split", "test"),
                                      getattr(args, "images", None), getattr(args, "official_join", False),
                                      args.batch_size, args.workers, prompts=prompts)
    from . import covidx_probe

    return covidx_probe.evaluate(model, args.data, args.pcts, args.max_epochs, args.patience, args.batch_size,
                                 args.workers, args.seed)


def synthetic_eval_root(checkpoint) -> str:
    """The synthetic evaluation sets of the run ``checkpoint`` belongs to (written on first use)."""
    run = common.run_folder(checkpoint)
    if run is None:
        raise ValueError(f"all: no --data given and {checkpoint} is not inside a training run folder (no args.json "
                         "beside it): give --data ROOT")
    with open(os.path.join(run, "args.json")) as f:
        data = json.load(f).get("data_path")
    raw = os.path.join(os.path.dirname(os.path.abspath(data)), "raw") if isinstance(data, str) else None
    if raw is None or not os.path.isfile(os.path.join(raw, "ground_truth.json")):
        raise ValueError(f"all: the run {run} did not train on the built-in synthetic set (data: {data}); "
                         "give --data ROOT with the evaluation sets")
    from ..data.synth import ensure_eval_sets

    ensure_eval_sets(raw)
    return raw


def run_all(args, model) -> List[TaskResult]:
    root = args.data or synthetic_eval_root(args.checkpoint)
    results = []
    for task in TASKS:
        d = os.path.join(root, SUBDIRS[task])
        if not os.path.isdir(d):
            log.info("all: %s skipped (no %s)", task, d)
            continue
        sub = argparse.Namespace(**vars(args))
        sub.data = d
        if task == "msxrt-image":
            sub.images = None  # the CSV's folder and its parent: synth puts the MIMIC tree beside msxrt/
        log.info("all: %s on %s", task, d)
        results.append(run_task(task, sub, model))
    if not results:
        raise ValueError(f"all: {root} holds none of {sorted(set(SUBDIRS.values()))}")
    return results


def _model_name(args) -> str:
    return args.checkpoint or f"random init {args.random_init} (seed {args.seed})"


def _run_on(args, model) -> List[TaskResult]:
    with sklearn_warnings_counted():
        return run_all(args, model) if args.task == "all" else [run_task(args.task, args, model)]


def evaluate_with_baseline(args) -> List[TaskResult]:
    """The task(s) on the model, then (unless --no-baseline or already a random init) on a random-init model
    of the same config and seed, whose scores fill each row's ``baseline``."""
    model = common.load_model(args.checkpoint, args.model, args.random_init, args.device, args.seed)
    results = _run_on(args, model)
    for r in results:
        r.meta = {"model": _model_name(args), **r.meta}
    if args.random_init is None and not args.no_baseline:
        log.info("baseline: the same evaluation on a random-init model of this config (seed %d; "
                 "--no-baseline skips it)", args.seed)
        base = {r.task: r for r in _run_on(args, common.random_baseline(model, args.seed))}
        for r in results:
            if r.task in base:
                r.set_baseline(base[r.task])
                r.meta["baseline"] = f"random init of the same config (seed {args.seed})"
    return results


@contextlib.contextmanager
def sklearn_warnings_counted():
    """scikit-learn's warnings (a class with fewer members than folds, an ill-defined metric) repeat per fold
    and seed; they become one line of ours per kind, saying what they mean here."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    ours: Dict[str, int] = {}
    for w in caught:
        if type(w.message).__module__.startswith("sklearn") or "sklearn" in (w.filename or ""):
            first = str(w.message).split("\n")[0]
            key = f"{type(w.message).__name__}: {first[:120]}"
            ours[key] = ours.get(key, 0) + 1
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    for key, count in ours.items():
        log.warning("scikit-learn warned %d time(s): %s (small classes or test folds: those scores are noisy; "
                    "see the 95%% intervals)", count, key)


def main(argv: Optional[List[str]] = None):
    """Returns the TaskResult (a list of them for ``all``)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = _normalise_argv(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    results = evaluate_with_baseline(args)
    stem = "all" if args.task == "all" else results[0].task
    out = args.out or common.default_out(args.checkpoint)
    cmd = "python -m medst_fast.eval " + " ".join(shlex.quote(a) for a in argv)
    paths = write_report(results, out, cmd, stem=stem)
    print(to_markdown(results))
    log.info("wrote %s and %s", paths["md"], paths["csv"])
    return results if args.task == "all" else results[0]


def cli(argv: Optional[List[str]] = None) -> int:
    """``main`` for the command line: a bad input is one line on stderr and exit status 1, not a traceback
    (usage errors have already exited with status 2)."""
    try:
        main(argv)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as e:  # RuntimeError: e.g. a text task
        # on an image-encoder export, whose message says which folder to use instead
        print(f"medst_fast.eval: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
