"""Weights on disk: safetensors files that verify themselves, and the trainer's checkpoint file format.

A safetensors file written by medst_fast carries, in its metadata, a sha256 of its tensors (``HASH_KEY``)
and, for a model folder, a sha256 of every other file the folder holds (``FILES_KEY``), so a flipped byte
anywhere is an error naming the file instead of a silently different model.

A training checkpoint ``<run>/checkpoints/ckpt-<step>.pt`` is a plain dict of tensors, numbers, strings,
lists and dicts, so ``torch.load(..., weights_only=True)`` reads it and no pickled code can run. Beside it
lies ``ckpt-<step>.pt.sha256`` (JSON: sha256 and size of the .pt bytes, hashed while they are written).
Loading checks size and hash before unpickling, so a truncated copy, flipped bytes and a foreign file each
get their own error instead of loading wrong values. Format version 1 is the only one so far.

This module imports only ``medst_fast.files`` from the package: the model folder (``hub``), the converter
and the trainer all build on it.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import pickle
import re
from typing import Any, Dict, List, Optional, Tuple

import torch

from .files import atomic_write, atomic_writer, file_digest

log = logging.getLogger("medst_fast")

# -- a model folder's files ---------------------------------------------------------------------------------
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
VOCAB = "vocab.txt"
# Every file save_pretrained writes (a temp folder holding only these is one of ours); the last name is
# data.transforms.PREPROCESS, spelled out because this module sits below the data package.
FOLDER_FILES = frozenset({WEIGHTS, CONFIG, VOCAB, "preprocessor_config.json"})
HASH_KEY = "medst_fast_sha256"  # safetensors metadata entry: tensor_digest() of the stored tensors
# safetensors metadata entry: JSON {file name: sha256 of its bytes} of the folder's other files. Metadata
# values must be strings, hence JSON.
FILES_KEY = "medst_fast_files_sha256"


def tensor_digest(sd: Dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order (independent of file layout)."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def _safetensors():
    # a core dependency (setup.py install_requires); the message covers an environment that lost it
    try:
        import safetensors.torch as st
    except ImportError as e:  # pragma: no cover
        raise ImportError("save_pretrained/from_pretrained need 'safetensors' (a core dependency of medst_fast): "
                          "pip install safetensors") from e
    return st


def safetensors_metadata(path: str) -> Dict[str, str]:
    """The metadata of a .safetensors header (no tensors read)."""
    _safetensors()
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise ValueError(f"{path}: cannot read weights ({e}); the file is truncated or not safetensors") from None


def recorded_file_digests(path: str, meta: Optional[Dict[str, str]] = None) -> Optional[Dict[str, str]]:
    """{file name: sha256} recorded in a folder's model.safetensors; None for a folder written without them."""
    w_path = os.path.join(path, WEIGHTS)
    meta = safetensors_metadata(w_path) if meta is None else meta
    raw = meta.get(FILES_KEY)
    if raw is None:
        return None
    try:
        rec = json.loads(raw)
    except ValueError:
        rec = None
    if not isinstance(rec, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in rec.items()):
        raise ValueError(f"{w_path}: metadata entry {FILES_KEY!r} is damaged (not a JSON object of digests)")
    return rec


def verify_folder_files(path: str, meta: Optional[Dict[str, str]] = None, names=None) -> None:
    """Each of the folder's files (or of ``names``) must have the digest its model.safetensors recorded.

    Raises ValueError naming the first changed or missing file. A folder written before the digests
    existed is loaded with one warning; a file of ours the record does not list (put there afterwards)
    is reported once as unverified.
    """
    path = os.fspath(path)
    meta = safetensors_metadata(os.path.join(path, WEIGHTS)) if meta is None else meta
    rec = recorded_file_digests(path, meta)
    if rec is None:
        what = "config.json, preprocessor_config.json and vocab.txt" + (" (nor the weights)" if HASH_KEY not in meta
                                                                          else "")
        log.warning("%s records no digests of the folder's files (written by an older medst_fast or another "
                    "tool): %s are not verified", os.path.join(path, WEIGHTS), what)
        return
    for name in sorted(rec) if names is None else [n for n in names if n in rec]:
        p = os.path.join(path, name)
        if not os.path.isfile(p):
            raise ValueError(f"{p}: missing, but {WEIGHTS} records it as part of this export; restore the file "
                             f"or re-export the model")
        if file_digest(p) != rec[name]:
            raise ValueError(f"{p}: changed after the export was written (its sha256 differs from the one "
                             f"{WEIGHTS} records); restore the file or re-export the model")
    for name in sorted((FOLDER_FILES - {WEIGHTS}) - set(rec)):
        if (names is None or name in names) and os.path.isfile(os.path.join(path, name)):
            log.warning("%s was not part of the export (added afterwards): not verified", os.path.join(path, name))


def read_verified_safetensors(path: str, warn_unhashed: bool = True) -> Dict[str, torch.Tensor]:
    """Load a .safetensors file; when its metadata holds our content hash, the tensors must match it.

    ``warn_unhashed=False`` when the caller has already warned that the file carries no digests.
    """
    st = _safetensors()
    try:
        sd = st.load_file(path)
    except Exception as e:
        raise ValueError(f"{path}: cannot read weights ({e}); the file is truncated or not safetensors") from None
    want = safetensors_metadata(path).get(HASH_KEY)
    if want is None:
        if warn_unhashed:
            log.warning("%s has no content hash (written by another tool or an older medst_fast): not verified",
                        path)
    elif tensor_digest(sd) != want:
        raise ValueError(f"{path}: the weights are corrupted (content hash mismatch: the tensors changed after "
                         f"the file was written); re-export or re-download it")
    return sd


# -- training checkpoints ------------------------------------------------------------------------------
CKPT_DIR = "checkpoints"
_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")
HASH_SUFFIX = ".sha256"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing, truncated, corrupted or from an incompatible run)."""


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


def save_checkpoint(state: Dict[str, Any], run_dir: str, step: int, keep: int) -> str:
    """Write ``state`` to ``<run>/checkpoints/ckpt-<step>.pt`` atomically, then drop all but the last ``keep``.

    The bytes go to a temp file in the same folder, are hashed as written and fsynced; the hash file is
    renamed into place first, then the checkpoint, so a ``.pt`` never exists without its hash and a crash or
    SIGKILL at any moment leaves either the complete new pair or the previous state. Older checkpoints are
    removed only after the new one is in place.
    """
    path = ckpt_path(run_dir, step)
    with atomic_writer(path, "wb") as f:
        hw = _HashingWriter(f)
        torch.save(state, hw)
        # Inside the block: the hash file is in place before the checkpoint's own rename at the block's end.
        atomic_write(hash_path(path), json.dumps({"sha256": hw.sha.hexdigest(), "size": hw.size}))
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            if os.path.abspath(old) != os.path.abspath(path):
                os.unlink(old)
                if os.path.exists(hash_path(old)):
                    os.unlink(hash_path(old))
    return path


def write_hash_file(path: str) -> None:
    """Record the sha256 and size of an existing file beside it (tools and tests; the trainer hashes on write)."""
    atomic_write(hash_path(path), json.dumps({"sha256": file_digest(path), "size": os.path.getsize(path)}))


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
    if file_digest(path) != want_sha:
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
