"""What a training run keeps beside its checkpoints: RNG capture, the data fingerprint, the run-folder lock.

The checkpoint file format itself (naming, hash sidecar, verified loading) is ``medst_fast.weights``.
A checkpoint stores RNG states as tensors or lists, so ``torch.load(..., weights_only=True)`` reads it
(numpy's state array becomes a tensor).
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import random
from typing import Any, Dict, List, Optional

import numpy as np
import torch

# moved to medst_fast.weights; the trainer split imports them from there
from ..weights import (CKPT_DIR, FORMAT_VERSION, CheckpointError, ckpt_path, list_checkpoints,  # noqa: F401
                       load_resume, save_checkpoint)
from ..files import fcntl, file_digest, lock_process, remove_stale_temps
from ..weights import HASH_SUFFIX, ckpt_dir

log = logging.getLogger("medst_fast")

LOCK_FILE = ".lock"


class RunFolderError(RuntimeError):
    """A run folder that this trainer may not write: held by another trainer, or holding another run."""


# -- RNG ------------------------------------------------------------------------------------------------
def capture_rng() -> Dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    out = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: Dict[str, Any]) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) != torch.cuda.device_count():
            log.warning("checkpoint holds %d CUDA RNG states, this machine has %d devices; restoring the "
                        "common prefix", len(cuda), torch.cuda.device_count())
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


# -- the data a run trained on ----------------------------------------------------------------------------
INDEX_FILES = ("studies.csv", "series.json", "meta.json")


def index_fingerprint(index_dir: str) -> str:
    """sha256 over a prepared index's files: its reports, image paths, splits and series.

    meta.json's ``image_root`` is left out: copying the images to another disk (local scratch on a cluster) and
    pointing the index at them does not change the data. Reading the files is cheap next to a training step.
    """
    h = hashlib.sha256()
    for name in INDEX_FILES:
        path = os.path.join(index_dir, name)
        h.update(name.encode() + b"\0")
        if name == "meta.json":
            with open(path, "rb") as f:
                meta = json.load(f)
            meta.pop("image_root", None)
            h.update(json.dumps(meta, sort_keys=True).encode())
        else:
            h.update(file_digest(path).encode())
    return h.hexdigest()


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
        raise CheckpointError(f"{path}: resuming would change the run: {what}. Resume with the run's own index, or "
                              f"pass --allow-changed-args to continue on this one")
    log.warning("--allow-changed-args: resuming %s although %s", path, what)


# -- run folder -------------------------------------------------------------------------------------------
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
