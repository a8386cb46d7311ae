"""CLI: ``python -m medst_fast.eval TASK (--checkpoint PATH [--model NAME] | --random-init NAME) --data PATH``."""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from typing import List, Optional

from . import TASKS, common
from .report import TaskResult, to_markdown, write_report

log = logging.getLogger("medst_fast")


def _ints(s: str) -> List[int]:
    return [int(v) for v in s.split(",") if v]


def _floats(s: str) -> List[float]:
    return [float(v) for v in s.split(",") if v]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m medst_fast.eval", description=__doc__)
    p.add_argument("task", choices=list(TASKS) + [t.replace("-", "_") for t in TASKS])
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", help="save_pretrained folder, or a checkpoint file (then --model NAME)")
    g.add_argument("--model", help="registered config name for a checkpoint file (e.g. medst_vit_b16)")
    g.add_argument("--random-init", metavar="NAME", help="evaluate NAME with random weights (baseline)")
    g.add_argument("--vocab", help="tokenizer vocab.txt (text tasks)")
    g.add_argument("--device", help="default: cuda when available, else cpu")
    g.add_argument("--seed", type=int, default=0, help="random-init weights and probe-head seed")
    d = p.add_argument_group("data")
    d.add_argument("--data", required=True, help="the task's CSV/TXT file or its folder")
    d.add_argument("--images", help="image root (MS-CXR-T: MIMIC-CXR-JPG root or flattened files/; "
                                    "RSNA: the DICOM folder, default DATA/stage_2_train_images)")
    d.add_argument("--metadata", help="MS-CXR-T: mimic-cxr-2.0.0-metadata.csv for the MIMIC tree layout")
    d.add_argument("--batch-size", type=int, default=64)
    d.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="image decoding processes")
    t = p.add_argument_group("protocol")
    t.add_argument("--seeds", type=_ints, default=[42, 100, 666], help="MS-CXR-T image shuffling seeds")
    t.add_argument("--folds", type=_ints, default=[5, 10], help="MS-CXR-T image CV folds")
    t.add_argument("--subset", default="RadGraph", help="MS-CXR-T sentence subset_name ('all' for every row)")
    t.add_argument("--official-join", action="store_true",
                   help='join cleaned sentences with "" as the official evaluation does (default " ")')
    t.add_argument("--views", choices=["frontal", "study"], default="frontal",
                   help="MS-CXR-T image: 'frontal' (official) or 'study' (adds the study's lateral; MoVE models)")
    t.add_argument("--prompts", help="RSNA: JSON {\"positive\": [...], \"negative\": [...]} replacing BioViL's")
    t.add_argument("--split", default="test", help="RSNA split: test (default), valid, train, all")
    t.add_argument("--pcts", type=_floats, default=[0.01, 0.1, 1.0], help="COVIDx training fractions")
    t.add_argument("--max-epochs", type=int, default=200, help="COVIDx probe epochs (early stopping)")
    t.add_argument("--patience", type=int, default=10, help="COVIDx early-stopping patience (epochs)")
    p.add_argument("--out", default="eval_results", help="folder for TASK.md and TASK.csv")
    return p


def run(args) -> TaskResult:
    task = args.task.replace("_", "-")
    model = common.load_model(args.checkpoint, args.model, args.random_init, args.device, args.seed)
    name = args.checkpoint or f"random init {args.random_init} (seed {args.seed})"
    if task == "msxrt-image":
        from . import msxrt_image

        csv = msxrt_image.find_csv(args.data)
        roots = [args.images] if args.images else [os.path.dirname(csv), os.path.dirname(os.path.dirname(csv))]
        res = msxrt_image.evaluate(model, csv, roots, args.metadata, args.seeds, args.folds, args.batch_size,
                                   args.workers, views=args.views)
    elif task == "msxrt-sentence":
        from . import msxrt_sentence

        tok = common.load_tokenizer(args.vocab, model)
        res = msxrt_sentence.evaluate(model, tok, msxrt_sentence.find_csv(args.data), args.subset,
                                      args.official_join)
    elif task == "rsna-zeroshot":
        from . import rsna_zeroshot

        tok = common.load_tokenizer(args.vocab, model)
        prompts = rsna_zeroshot.read_prompts(args.prompts) if args.prompts else None
        res = rsna_zeroshot.evaluate(model, tok, args.data, args.split, args.images, args.official_join,
                                     args.batch_size, args.workers, prompts=prompts)
    else:
        from . import covidx_probe

        res = covidx_probe.evaluate(model, args.data, args.pcts, args.max_epochs, args.patience, args.batch_size,
                                    args.workers, args.seed)
    res.meta = {"model": name, **res.meta}
    return res


def main(argv: Optional[List[str]] = None) -> TaskResult:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    res = run(args)
    cmd = "python -m medst_fast.eval " + " ".join(shlex.quote(a) for a in argv)
    paths = write_report([res], args.out, cmd, stem=res.task)
    print(to_markdown([res]))
    log.info("wrote %s and %s", paths["md"], paths["csv"])
    return res


if __name__ == "__main__":
    main()
