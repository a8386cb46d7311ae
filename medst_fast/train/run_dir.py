"""The run folder: one trainer per folder (a lock), the temps a killed writer left, and no fresh run over another.

What a run folder holds: args.json, metrics.csv, train.log, checkpoints/ckpt-<step>.pt (+ .sha256), best/,
final/, final_encoder/, training_curves.png, tensorboard/, wandb-id.txt.
"""
from __future__ import annotations

import glob
import logging
import os
import shutil
from typing import Dict, List, Optional, Tuple

from . import distributed as D
from ..files import fcntl, lock_process, remove_stale_temps
from ..plot import PLOT_FILE
from ..weights import CKPT_DIR, HASH_SUFFIX, ckpt_dir, list_checkpoints

log = logging.getLogger("medst_fast")

LOCK_FILE = ".lock"

# What a run writes besides its checkpoints: --overwrite deletes these, and a fresh run refuses a folder holding
# one of the first five.
RECORDS = ("args.json", "metrics.csv", "final", "final_encoder", "best")
OUTPUTS = RECORDS + ("tensorboard", "train.log", PLOT_FILE, "wandb-id.txt")


class RunFolderError(RuntimeError):
    """A run folder that this trainer may not write: held by another trainer, or holding another run."""


_HELD_RUN_LOCKS: Dict[str, "RunLock"] = {}  # this process's run locks (a POSIX lock cannot see them)


class RunLock:
    """A lock on ``<run>/.lock`` held for a trainer's lifetime: a second trainer on the folder is refused.

    A POSIX record lock (files.lock_process), not flock: loader workers forked by the trainer must not keep
    the folder locked after the trainer is SIGKILLed, and the kernel drops the lock when the process dies,
    so a killed run never leaves the folder locked. A second trainer in the same process is caught by
    ``_HELD_RUN_LOCKS`` (the lock file is opened once per process, as a POSIX lock requires).
    """

    def __init__(self, run_dir: str):
        self.path = os.path.realpath(os.path.join(run_dir, LOCK_FILE))
        self.fd: Optional[int] = None
        if self.path in _HELD_RUN_LOCKS:
            raise RunFolderError(f"{run_dir} is in use by another trainer in this process; wait for it to "
                                 f"finish, or use another --out")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not lock_process(fd, block=False):
            try:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise RunFolderError(f"{run_dir} is in use by another trainer (pid {holder}); wait for it to finish, "
                                 f"or use another --out")
        self.fd = fd
        _HELD_RUN_LOCKS[self.path] = self
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None
            _HELD_RUN_LOCKS.pop(self.path, None)


def clean_run_dir(run_dir: str) -> List[str]:
    """Remove what killed writers left in a run folder: unheld ``.tmp-*`` files and folders (checkpoint and
    export temps) and hash files whose checkpoint never arrived. Returns the removed paths."""
    removed = remove_stale_temps(run_dir) + remove_stale_temps(ckpt_dir(run_dir))
    for hp in glob.glob(os.path.join(ckpt_dir(run_dir), "ckpt-*.pt" + HASH_SUFFIX)):
        if not os.path.exists(hp[: -len(HASH_SUFFIX)]):
            os.unlink(hp)
            removed.append(hp)
    if fcntl is None:
        log.info("no fcntl on this platform: stale temp files are not removed")
    return removed


def prior_run(run_dir: str) -> List[str]:
    """What another run left in ``run_dir`` (records and checkpoints), relative to it."""
    prior = [n for n in RECORDS if os.path.exists(os.path.join(run_dir, n))]
    return prior + [os.path.join(CKPT_DIR, os.path.basename(p)) for p in list_checkpoints(run_dir)]


def require_fresh(run_dir: str, overwrite: bool) -> None:
    """A fresh run may not mix with another run's checkpoints, exports and records (--overwrite deletes them)."""
    prior = prior_run(run_dir)
    if not prior:
        return
    if not overwrite:
        raise RunFolderError(
            f"{run_dir} already holds a run ({', '.join(prior[:6])}{' ...' if len(prior) > 6 else ''}); continue it "
            f"with --resume auto, or start over with --overwrite (deletes its checkpoints and exports)")
    for n in (CKPT_DIR,) + OUTPUTS:
        p = os.path.join(run_dir, n)
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.unlink(p)


def claim(run_dir: str, resume: Optional[str], overwrite: bool, primary: bool) -> Tuple[Optional[RunLock], List[str]]:
    """Lock the run folder, clear stale temps, refuse a fresh run over another; returns (lock, removed temps).

    Collective: rank 0 decides and every rank learns the outcome, so no rank waits at a barrier for a failed
    rank 0.
    """
    err, removed, lock = None, [], None
    if primary:
        os.makedirs(run_dir, exist_ok=True)
        try:
            lock = RunLock(run_dir)
            removed = clean_run_dir(run_dir)  # safe: this process holds the folder
            if not resume:
                require_fresh(run_dir, overwrite)
        except RunFolderError as e:
            err = str(e)
    err = D.broadcast_object(err)  # collective: every rank
    if err:
        if lock is not None:
            lock.release()
        raise RunFolderError(err)
    return lock, removed
