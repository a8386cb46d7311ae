"""Training checkpoints: atomic writes, keep-last-K rotation, safe loading, RNG capture.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so ``torch.load(...,
weights_only=True)`` reads it and no pickled code can run. RNG states are stored as tensors or lists for
the same reason (numpy's state array becomes a tensor).
"""
from __future__ import annotations

import glob
import logging
import os
import random
import re
import tempfile
from typing import Any, Dict, List, Optional

import numpy as np
import torch

log = logging.getLogger("medst_fast")

CKPT_DIR = "checkpoints"
_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing, truncated, corrupted or from an incompatible run)."""


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


# -- files ----------------------------------------------------------------------------------------------
def ckpt_dir(run_dir: str) -> str:
    return os.path.join(run_dir, CKPT_DIR)


def ckpt_path(run_dir: str, step: int) -> str:
    return os.path.join(ckpt_dir(run_dir), f"ckpt-{step:08d}.pt")


def list_checkpoints(run_dir: str) -> List[str]:
    """Checkpoint files of a run, oldest first (by step)."""
    found = []
    for p in glob.glob(os.path.join(ckpt_dir(run_dir), "ckpt-*.pt")):
        m = _NAME.match(os.path.basename(p))
        if m:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def save_checkpoint(state: Dict[str, Any], run_dir: str, step: int, keep: int) -> str:
    """Write ``state`` to ``<run>/checkpoints/ckpt-<step>.pt`` atomically, then drop all but the last ``keep``.

    The bytes go to a temp file in the same folder, are fsynced, and the file is renamed into place, so a
    crash or SIGKILL at any moment leaves either the complete new file or none; older checkpoints are
    removed only after the new one is in place.
    """
    d = ckpt_dir(run_dir)
    os.makedirs(d, exist_ok=True)
    path = ckpt_path(run_dir, step)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-ckpt-", suffix=".pt", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(d)
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            if os.path.abspath(old) != os.path.abspath(path):
                os.unlink(old)
    return path


def _fsync_dir(d: str) -> None:
    try:  # makes the rename durable on POSIX; not available everywhere (e.g. Windows)
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Read a training checkpoint with ``weights_only=True``; a damaged file raises CheckpointError."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        others = [p for p in list_checkpoints(os.path.dirname(os.path.dirname(os.path.abspath(path))))
                  if os.path.abspath(p) != os.path.abspath(path)]
        hint = f" Earlier checkpoints of this run: {others}; pass one with --resume PATH." if others else ""
        raise CheckpointError(f"{path}: cannot read checkpoint: the file is truncated or corrupted ({msg}).{hint}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a medst_fast training checkpoint (top level is {type(state).__name__})")
    missing = [k for k in ("format", "model", "optimizer", "step", "epoch", "step_in_epoch", "rng") if k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a medst_fast training checkpoint (missing fields {missing})")
    if state["format"] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: field 'format' is {state['format']!r}, this version reads {FORMAT_VERSION}")
    return state


def resolve_resume(resume: Optional[str], run_dir: str) -> Optional[str]:
    """``--resume``: None, 'auto' (latest checkpoint of ``run_dir``, None if there is none) or a path."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    if os.path.isdir(resume):  # a run folder
        found = list_checkpoints(resume)
        if not found:
            raise CheckpointError(f"{resume}: no checkpoints in {ckpt_dir(resume)}")
        return found[-1]
    if not os.path.isfile(resume):
        raise CheckpointError(f"--resume {resume}: file not found")
    return resume
