"""The run folder: one trainer per folder (a lock), the temps a killed writer left, and no fresh run over another.

What a run folder holds: args.json, metrics.csv, train.log, checkpoints/ckpt-<step>.pt (+ .sha256), best/,
final/, final_encoder/, training_curves.png, tensorboard/, wandb-id.txt.
"""
from __future__ import annotations

import os
import shutil
from typing import List, Optional, Tuple

from . import checkpoint as ckpt
from . import distributed as D
from ..plot import PLOT_FILE

# What a run writes besides its checkpoints: --overwrite deletes these, and a fresh run refuses a folder holding
# one of the first five.
RECORDS = ("args.json", "metrics.csv", "final", "final_encoder", "best")
OUTPUTS = RECORDS + ("tensorboard", "train.log", PLOT_FILE, "wandb-id.txt")


def prior_run(run_dir: str) -> List[str]:
    """What another run left in ``run_dir`` (records and checkpoints), relative to it."""
    prior = [n for n in RECORDS if os.path.exists(os.path.join(run_dir, n))]
    return prior + [os.path.join(ckpt.CKPT_DIR, os.path.basename(p)) for p in ckpt.list_checkpoints(run_dir)]


def require_fresh(run_dir: str, overwrite: bool) -> None:
    """A fresh run may not mix with another run's checkpoints, exports and records (--overwrite deletes them)."""
    prior = prior_run(run_dir)
    if not prior:
        return
    if not overwrite:
        raise ckpt.RunFolderError(
            f"{run_dir} already holds a run ({', '.join(prior[:6])}{' ...' if len(prior) > 6 else ''}); continue it "
            f"with --resume auto, or start over with --overwrite (deletes its checkpoints and exports)")
    for n in (ckpt.CKPT_DIR,) + OUTPUTS:
        p = os.path.join(run_dir, n)
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.unlink(p)


def claim(run_dir: str, resume: Optional[str], overwrite: bool, primary: bool) -> Tuple[Optional[ckpt.RunLock], List[str]]:
    """Lock the run folder, clear stale temps, refuse a fresh run over another; returns (lock, removed temps).

    Collective: rank 0 decides and every rank learns the outcome, so no rank waits at a barrier for a failed
    rank 0.
    """
    err, removed, lock = None, [], None
    if primary:
        os.makedirs(run_dir, exist_ok=True)
        try:
            lock = ckpt.RunLock(run_dir)
            removed = ckpt.clean_run_dir(run_dir)  # safe: this process holds the folder
            if not resume:
                require_fresh(run_dir, overwrite)
        except ckpt.RunFolderError as e:
            err = str(e)
    err = D.broadcast_object(err)  # collective: every rank
    if err:
        if lock is not None:
            lock.release()
        raise ckpt.RunFolderError(err)
    return lock, removed
