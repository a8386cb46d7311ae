"""What a run publishes: <run>/best (lowest validation loss so far), <run>/final (full model + vocab.txt),
<run>/final_encoder (the image encoder alone) and training_curves.png. Each export first checks, on every rank,
that no model tensor is NaN/inf (a collective), then rank 0 writes it.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, Dict, Optional

from . import distributed as D
from ..files import atomic_write
from ..hub import save_pretrained
from ..plot import PLOT_FILE
from .build import Run
from .state import check_finite

log = logging.getLogger("medst_fast")

ENCODER_COMPONENTS = ["visual", "visual_global_head"]


def export_best(run: Run, step: int, v: Dict[str, Any], last_ckpt: Optional[str]) -> str:
    """<run>/best with best.json (the step and its validation numbers). Collective: every rank calls it."""
    check_finite(run.model, run.world, "export the best model", step, last_ckpt)  # collective
    best = os.path.join(run.run_dir, "best")
    if run.primary:
        save_pretrained(run.model, best)
        shutil.copyfile(run.args.vocab, os.path.join(best, "vocab.txt"))
        info = {"step": step, **{k: v[k] for k in ("val_loss", "val_r1", "val_r5", "studies")}}
        atomic_write(os.path.join(best, "best.json"), json.dumps(info, indent=2))
    D.barrier()  # collective: no rank reads best/ before rank 0 wrote it
    return best


def export_final(run: Run, step: int, last_ckpt: Optional[str]) -> Optional[str]:
    """<run>/final and <run>/final_encoder; returns final's path on rank 0. Collective: every rank calls it."""
    check_finite(run.model, run.world, "export the model", step, last_ckpt)  # collective
    if not run.primary:
        return None
    final = save_pretrained(run.model, os.path.join(run.run_dir, "final"))
    shutil.copyfile(run.args.vocab, os.path.join(final, "vocab.txt"))
    encoder = os.path.join(run.run_dir, "final_encoder")
    save_pretrained(run.model, encoder, components=ENCODER_COMPONENTS)
    log.info("exported %s (full model + vocab.txt) and %s (image encoder)", final, encoder)
    if run.args.dataset_type == "synthetic":  # its evaluation sets sit beside it: say how to use them
        log.info("evaluate it on the synthetic MS-CXR-T, RSNA and COVIDx-format sets: python -m "
                 "medst_fast.eval all --checkpoint %s (pip install medst_fast[eval])", final)
    return final


def plot_curves(run_dir: str) -> None:
    """<run>/training_curves.png; never fails the run (matplotlib is the optional extra [plot])."""
    from ..plot import plot_run

    try:
        log.info("training curves: %s", plot_run(run_dir))
    except ImportError as e:
        log.info("no %s: %s", PLOT_FILE, e)
    except Exception as e:  # a plot is a convenience: a bad row must not cost the finished run
        log.warning("could not plot the training curves (%s: %s)", type(e).__name__, e)
