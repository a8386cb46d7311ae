"""Training checkpoints: atomic writes with a content hash, keep-last-K rotation, verified loading, RNG capture.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so ``torch.load(...,
weights_only=True)`` reads it and no pickled code can run. RNG states are stored as tensors or lists for
the same reason (numpy's state array becomes a tensor).

Beside every ``ckpt-<step>.pt`` lies ``ckpt-<step>.pt.sha256`` (JSON: sha256 and size of the .pt bytes,
hashed while they are written). Loading checks size and hash before unpickling, so a truncated copy,
flipped bytes and a foreign file each get their own error instead of loading wrong values.
This module also holds the run-folder lock: one trainer per run folder.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import pickle
import random
import re
import tempfile
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..hub import fcntl, lock_fd, lock_process, remove_stale_temps

log = logging.getLogger("medst_fast")

CKPT_DIR = "checkpoints"
_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")
HASH_SUFFIX = ".sha256"
FORMAT_VERSION = 1
LOCK_FILE = ".lock"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing, truncated, corrupted or from an incompatible run)."""


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


# -- files ----------------------------------------------------------------------------------------------
def ckpt_dir(run_dir: str) -> str:
    return os.path.join(run_dir, CKPT_DIR)


def ckpt_path(run_dir: str, step: int) -> str:
    return os.path.join(ckpt_dir(run_dir), f"ckpt-{step:08d}.pt")


def hash_path(path: str) -> str:
    return path + HASH_SUFFIX


def list_checkpoints(run_dir: str) -> List[str]:
    """Checkpoint files of a run, oldest first (by step)."""
    found = []
    for p in glob.glob(os.path.join(ckpt_dir(run_dir), "ckpt-*.pt")):
        m = _NAME.match(os.path.basename(p))
        if m:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


class _HashingWriter:
    """File wrapper that hashes the bytes torch.save writes (torch.save only calls write/flush)."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.size += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def _write_temp(d: str, suffix: str, write) -> str:
    """Write a flocked, fsynced ``.tmp-ckpt-*`` file in ``d`` with ``write(f)``; returns its path."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-ckpt-", suffix=suffix, dir=d)
    try:
        lock_fd(fd)  # held until closed: a cleaner never removes a temp that is being written
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return tmp


def save_checkpoint(state: Dict[str, Any], run_dir: str, step: int, keep: int) -> str:
    """Write ``state`` to ``<run>/checkpoints/ckpt-<step>.pt`` atomically, then drop all but the last ``keep``.

    The bytes go to a temp file in the same folder, are hashed as written and fsynced; the hash file is
    renamed into place first, then the checkpoint, so a ``.pt`` never exists without its hash and a crash or
    SIGKILL at any moment leaves either the complete new pair or the previous state. Older checkpoints are
    removed only after the new one is in place.
    """
    d = ckpt_dir(run_dir)
    os.makedirs(d, exist_ok=True)
    path = ckpt_path(run_dir, step)
    hw: Dict[str, _HashingWriter] = {}

    def write_state(f):
        hw["w"] = _HashingWriter(f)
        torch.save(state, hw["w"])

    tmp = _write_temp(d, ".pt", write_state)
    try:
        record = json.dumps({"sha256": hw["w"].sha.hexdigest(), "size": hw["w"].size}).encode()
        tmp_hash = _write_temp(d, HASH_SUFFIX, lambda f: f.write(record))
        os.replace(tmp_hash, hash_path(path))
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
                if os.path.exists(hash_path(old)):
                    os.unlink(hash_path(old))
    return path


def write_hash_file(path: str) -> None:
    """Record the sha256 and size of an existing file beside it (tools and tests; the trainer hashes on write)."""
    sha, size = _file_digest(path)
    with open(hash_path(path), "w") as f:
        json.dump({"sha256": sha, "size": size}, f)


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


def _file_digest(path: str) -> Tuple[str, int]:
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            sha.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), size


def _earlier_hint(path: str) -> str:
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    others = [p for p in list_checkpoints(run_dir) if os.path.abspath(p) != os.path.abspath(path)]
    return f" Other checkpoints of this run: {others}; pass one with --resume PATH." if others else ""


def _verify_hash(path: str) -> None:
    """Size and sha256 of ``path`` against its hash file; raises CheckpointError naming what is wrong."""
    hp = hash_path(path)
    if not os.path.isfile(hp):
        raise CheckpointError(f"{path}: no content hash ({os.path.basename(hp)} is missing: written by an older "
                              f"medst_fast or not by the trainer), so it cannot be verified.{_earlier_hint(path)}")
    try:
        with open(hp) as f:
            rec = json.load(f)
        want_sha, want_size = str(rec["sha256"]), int(rec["size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{hp}: unreadable hash file ({type(e).__name__}: {e}); the checkpoint cannot be "
                              f"verified.{_earlier_hint(path)}") from None
    size = os.path.getsize(path)
    if size < want_size:
        raise CheckpointError(f"{path}: checkpoint is truncated ({size} of {want_size} bytes: an interrupted "
                              f"copy or a full disk).{_earlier_hint(path)}")
    if size > want_size:
        raise CheckpointError(f"{path}: checkpoint is corrupted ({size} bytes, {want_size} were written)."
                              f"{_earlier_hint(path)}")
    sha, _ = _file_digest(path)
    if sha != want_sha:
        raise CheckpointError(f"{path}: checkpoint is corrupted (content hash mismatch: the bytes changed after "
                              f"they were written).{_earlier_hint(path)}")


def _unpickle(path: str) -> Any:
    """torch.load(weights_only=True) with errors that say which kind of damage it is.

    torch's own messages advise ``weights_only=False``; that would run code from the file, so they are
    never passed on.
    """
    with open(path, "rb") as f:
        magic = f.read(4)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):  # a reference to a Python callable: a training checkpoint never holds one
            glob_name = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = f" ({glob_name.group(1)})" if glob_name else ""
            raise CheckpointError(f"{path}: refusing to load: the file holds pickled Python code{what}, which a "
                                  f"medst_fast checkpoint never contains (unsafe pickle: not ours, or tampered "
                                  f"with).") from None
        kind = "not a torch zip checkpoint" if magic != b"PK\x03\x04" else "its pickle stream is invalid"
        raise CheckpointError(f"{path}: cannot read checkpoint: the file is corrupted ({kind}).{_earlier_hint(path)}") from None
    except Exception as e:  # zip reader errors: truncated or overwritten archive
        msg = str(e).split(".")[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: cannot read checkpoint: the file is truncated or corrupted ({msg})."
                              f"{_earlier_hint(path)}") from None


def load_checkpoint(path: str, verify: bool = True) -> Dict[str, Any]:
    """Read a training checkpoint: hash check (``verify``), then ``weights_only=True``; damage raises CheckpointError."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    if verify:
        _verify_hash(path)
    state = _unpickle(path)
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


def load_resume(resume: Optional[str], run_dir: str) -> Optional[Tuple[str, Dict[str, Any]]]:
    """Load what ``--resume`` names: (path, state), or None for a fresh start.

    'auto' and a run folder take the newest checkpoint that is intact, with a warning for each newer one
    that is not; when there are checkpoints but none is intact, that is an error (never a silent fresh
    start). An explicit file must itself be intact.
    """
    if not resume:
        return None
    folder = run_dir if resume == "auto" else resume if os.path.isdir(resume) else None
    if folder is None:
        path = resolve_resume(resume, run_dir)
        return path, load_checkpoint(path)
    found = list_checkpoints(folder)
    if not found:
        if resume == "auto":
            return None
        raise CheckpointError(f"{resume}: no checkpoints in {ckpt_dir(resume)}")
    problems = []
    for path in reversed(found):
        try:
            state = load_checkpoint(path)
        except CheckpointError as e:
            problems.append(str(e).split(" Other checkpoints")[0])
            log.warning("--resume %s: skipping a damaged checkpoint: %s", resume, problems[-1])
            continue
        if problems:
            log.warning("--resume %s: falling back to %s, the newest intact checkpoint", resume, path)
        return path, state
    raise CheckpointError(f"--resume {resume}: no intact checkpoint in {ckpt_dir(folder)}: " + "; ".join(problems))


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
            h.update(_file_digest(path)[0].encode())
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

    A POSIX record lock (hub.lock_process), not flock: loader workers forked by the trainer must not keep
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
