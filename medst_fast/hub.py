"""``save_pretrained`` / ``from_pretrained``: a self-contained model folder, written atomically and verified.

A folder holds model.safetensors, config.json (the model config, plus ``components`` for a partial export),
preprocessor_config.json (image size, resize side, normalisation) and vocab.txt when the vocabulary is known.

The weights file carries, in its safetensors metadata, a sha256 of its tensors and a sha256 of every other
file the folder holds (config.json, preprocessor_config.json, vocab.txt); ``from_pretrained`` recomputes them,
so a flipped byte anywhere is an error naming the file instead of a silently different model (one changed
LayerNorm epsilon in config.json would load without complaint and move every embedding). The small helpers
at the end (temp folders held by an flock while written, and removal of the ones a killed writer left) are
shared with the trainer's checkpoints.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import Dict, Iterator, List, Optional, Union

import torch
import torch.nn as nn

from .config import MedSTConfig
from .models import MedST

try:  # POSIX; without it temp files are not locked and stale ones are never removed (nothing else changes)
    import fcntl
except ImportError:  # pragma: no cover (Windows)
    fcntl = None

log = logging.getLogger("medst_fast")

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
HASH_KEY = "medst_fast_sha256"  # safetensors metadata entry: tensor_digest() of the stored tensors
# safetensors metadata entry: JSON {file name: sha256 of its bytes} of the folder's other files. Metadata
# values must be strings, hence JSON.
FILES_KEY = "medst_fast_files_sha256"
TMP_PREFIX = ".tmp-"


def tensor_digest(sd: Dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order (independent of file layout)."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def file_digest(path: str) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _safetensors():
    # a core dependency (setup.py install_requires); the message covers an environment that lost it
    try:
        import safetensors.torch as st
    except ImportError as e:  # pragma: no cover
        raise ImportError("save_pretrained/from_pretrained need 'safetensors' (a core dependency of medst_fast): "
                          "pip install safetensors") from e
    return st


VOCAB = "vocab.txt"
# Every file save_pretrained writes (a temp folder holding only these is one of ours).
_OUR_FILES = {WEIGHTS, CONFIG, VOCAB, "preprocessor_config.json"}


def _unwrap(model):
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def _vocab_source(model, vocab, tokenizer, components) -> Optional[str]:
    """The vocab.txt to copy into the folder: given, the tokenizer's, or the one the model was loaded with."""
    if components and "text" not in components:
        return None  # no text tower in the folder, so no tokenizer belongs with it
    src = vocab or getattr(tokenizer, "vocab_path", None) or getattr(model, "vocab_file", None)
    if src is None:
        return None
    src = os.fspath(src)
    if os.path.isdir(src):
        src = os.path.join(src, VOCAB)
    if not os.path.isfile(src):
        raise FileNotFoundError(f"{src}: vocabulary file not found")
    return src


def save_pretrained(model: MedST, path: Union[str, os.PathLike], components=None, vocab=None,
                    tokenizer=None) -> str:
    """Write a self-contained model folder: ``config.json``, ``model.safetensors``, ``preprocessor_config.json``
    and, when known, ``vocab.txt``.

    The files are written into a temporary folder beside ``path`` and moved in by rename, so an
    interrupted save never leaves a half-written model where a good one was.

    Args:
        components: optional list of top-level module names to keep (e.g. an image-encoder export); a model
            loaded from such a folder keeps its components by default.
        vocab, tokenizer: the vocabulary to store (a vocab.txt path, or a tokenizer with ``vocab_path``);
            default: the vocabulary the model was loaded with (``from_pretrained`` records it). Not written
            when ``components`` leave out the text tower.
    """
    from .factory import PREPROCESS, preprocess_config

    st = _safetensors()
    model = _unwrap(model)
    components = components or getattr(model, "components", None)
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if components:
        sd = {k: v for k, v in sd.items() if k.split(".", 1)[0] in components}
    vocab_src = _vocab_source(model, vocab, tokenizer, components)
    if vocab_src is not None:
        _check_vocab(vocab_src, model.cfg, "the model")
    # A killed save leaves its temp folder behind; remove such leftovers of ours (unheld, our files only).
    for p in remove_stale_temps(parent, only_holding=_OUR_FILES):
        log.info("removed %s, left by an interrupted save_pretrained", p)
    with held_temp_dir(parent) as tmp:
        cfg = model.cfg.to_dict()
        if components:
            cfg["components"] = list(components)
        files = {CONFIG: cfg, PREPROCESS: preprocess_config(model.cfg.vision.img_size)}
        for name, d in files.items():
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(d, f, indent=2, sort_keys=True)
        names = list(files)
        if vocab_src is not None:
            shutil.copyfile(vocab_src, os.path.join(tmp, VOCAB))
            names.append(VOCAB)
        # The side files are written first so the weights' metadata can record their digests.
        digests = {name: file_digest(os.path.join(tmp, name)) for name in names}
        st.save_file(sd, os.path.join(tmp, WEIGHTS), metadata={"format": "pt", HASH_KEY: tensor_digest(sd),
                                                               FILES_KEY: json.dumps(digests, sort_keys=True)})
        os.makedirs(path, exist_ok=True)
        for name in sorted(_OUR_FILES - set(names) - {WEIGHTS}):  # e.g. the vocab.txt of an earlier full save
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(path, name))
        # The weights go in last: a folder whose weights are new has every other file new as well.
        for name in names + [WEIGHTS]:
            os.replace(os.path.join(tmp, name), os.path.join(path, name))
    return path


class MissingTower(nn.Module):
    """Stands in for a module that a partial export (``components``) does not hold.

    Calling it raises an error naming the folder and what it holds, so an image-encoder export can never
    produce text embeddings from randomly initialised weights.
    """

    def __init__(self, name: str, folder: str, components):
        super().__init__()
        self.name, self.folder, self.components = name, folder, list(components)

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"{self.folder} holds only {self.components} (a partial export, e.g. the trainer's "
                           f"final_encoder/): its model has no '{self.name}', so this call cannot run. Load the "
                           f"full model folder (the trainer's final/) for text embeddings and grounding.")

    def extra_repr(self) -> str:
        return f"absent: {self.name!r} (not in {self.folder})"


def from_pretrained(path: Union[str, os.PathLike], device=None, **overrides) -> MedST:
    """Load a ``save_pretrained`` folder. Raises a clear error for a missing, damaged or changed file.

    Every file is checked twice: its fields (a config.json of ``{}``, a wrong field type) and its digest as
    recorded in model.safetensors when it was written (a valid but changed value, e.g. another LayerNorm
    epsilon). A folder written before the digests existed loads with one warning.

    A partial export (its config.json lists ``components``) gives a model whose absent modules are
    ``MissingTower`` stand-ins: ``encode_image`` works, ``encode_text`` raises an error saying why.
    The folder's ``vocab.txt`` (when present) is recorded as ``model.vocab_file``.
    """
    _safetensors()  # fail early with the install hint, before any file is read
    path = os.fspath(path)
    cfg_path, w_path = os.path.join(path, CONFIG), os.path.join(path, WEIGHTS)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: missing (expected a save_pretrained folder)")
    d = _read_json_object(cfg_path)
    components = d.pop("components", None)
    cfg = _folder_config(d, cfg_path)
    _check_folder_preprocess(path, cfg)
    meta = safetensors_metadata(w_path)
    verify_folder_files(path, meta)
    cfg = cfg.replace(**overrides)
    model = MedST(cfg)
    if components:
        names = [n for n, _ in model.named_children()]
        bad = [c for c in components if c not in names]
        if not isinstance(components, list) or bad:
            raise ValueError(f"{cfg_path}: field 'components' must list modules of the model {names}, got "
                             f"{components!r}")
        for n in names:
            if n not in components:
                setattr(model, n, MissingTower(n, path, components))
        model.components = list(components)
    sd = read_verified_safetensors(w_path, warn_unhashed=HASH_KEY in meta or FILES_KEY in meta)
    check_state_dict_fits(model, sd, w_path, cfg_path)
    model.load_state_dict(sd, strict=False)
    vocab = os.path.join(path, VOCAB)
    if os.path.isfile(vocab):
        _check_vocab(vocab, cfg, cfg_path)
        model.vocab_file = vocab
    if device is not None:
        model = model.to(device)
    return model


def is_save_pretrained_folder(path: str) -> bool:
    """A folder written by save_pretrained (its weights carry our digests), as opposed to e.g. a Hugging Face one."""
    w = os.path.join(path, WEIGHTS)
    if not (os.path.isfile(w) and os.path.isfile(os.path.join(path, CONFIG))):
        return False
    try:
        meta = safetensors_metadata(w)
    except ValueError:
        return True  # damaged weights beside a config.json: from_pretrained names the problem
    return HASH_KEY in meta or FILES_KEY in meta


def _check_vocab(vocab: str, cfg: MedSTConfig, model_source: str) -> None:
    """The vocabulary must be one (no duplicates, the special tokens) and fit the text embedding table."""
    from .text.tokenizer import check_vocab_fits, read_vocab

    check_vocab_fits(len(read_vocab(vocab)), cfg.text.vocab_size, vocab, model_source)


def _read_json_object(p: str) -> dict:
    try:
        with open(p, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{p}: top level must be an object of config fields")
    return d


# The sections that fix the weights' shapes. save_pretrained writes every field; a config.json without these
# (e.g. ``{}``) would otherwise build the default ViT-B model and fail on the first tensor with a wall of
# size mismatches. loss.* and faithful may be absent: they change no shape, and older versions had fewer.
_SHAPE_SECTIONS = ("vision", "text", "head")


def _folder_config(d: dict, cfg_path: str) -> MedSTConfig:
    missing = [k for k in _SHAPE_SECTIONS if k not in d]
    if missing:
        raise ValueError(f"{cfg_path}: missing field(s) {missing}; a save_pretrained config.json holds the "
                         f"model's whole config (this file is empty, truncated or not a medst_fast config)")
    try:
        return MedSTConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: {e}") from None


def _check_folder_preprocess(path: str, cfg: MedSTConfig) -> None:
    """preprocessor_config.json, when present, must be one these transforms reproduce, for this image size."""
    from .factory import PREPROCESS, check_preprocess_config

    p = os.path.join(path, PREPROCESS)
    if not os.path.isfile(p):
        return  # written by an older version: the model config's img_size is the whole story
    size = check_preprocess_config(_read_json_object(p), p)
    if size != cfg.vision.img_size:
        raise ValueError(f"{p}: field 'image_size' is {size} but {CONFIG}'s vision.img_size is "
                         f"{cfg.vision.img_size}")


def check_state_dict_fits(model: nn.Module, sd: Dict[str, torch.Tensor], w_path: str, cfg_path: str) -> None:
    """Every tensor must exist in the model with its shape; errors name the file and the first bad keys."""
    own = model.state_dict()
    shape_bad = [k for k in sorted(sd) if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    if shape_bad:
        k = shape_bad[0]
        more = f" (and {len(shape_bad) - 1} more: {shape_bad[1:4]}{' ...' if len(shape_bad) > 4 else ''})" \
            if len(shape_bad) > 1 else ""
        raise ValueError(f"{w_path}: tensor {k!r} has shape {tuple(sd[k].shape)} but {cfg_path} gives "
                         f"{tuple(own[k].shape)}{more}")
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise ValueError(f"{w_path}: state dict does not match {cfg_path}: missing {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}")


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
    for name in sorted((_OUR_FILES - {WEIGHTS}) - set(rec)):
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


# -- temp files held by their writer ------------------------------------------------------------------------
def lock_fd(fd: int, block: bool = True) -> bool:
    """flock ``fd`` exclusively; returns False when ``block`` is False and another process holds it."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False


def lock_process(fd: int, block: bool = True) -> bool:
    """POSIX record lock (fcntl.lockf) on ``fd`` (opened for writing); False when held elsewhere and not ``block``.

    Unlike flock it belongs to this process alone: forked children (loader or prepare workers, which may
    outlive a SIGKILLed parent by seconds) never hold it, and it is gone the moment this process dies. The
    price: closing *any* descriptor of the file in this process drops it, so open such a file only once.
    """
    if fcntl is None:
        return True
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        return True
    except (BlockingIOError, PermissionError):  # EAGAIN or EACCES, depending on the platform
        return False


@contextlib.contextmanager
def held_temp_dir(parent: str) -> Iterator[str]:
    """A fresh ``.tmp-*`` folder in ``parent``, flocked while the caller writes into it, removed afterwards.

    The lock tells a cleaner (``remove_stale_temps``) that a live writer owns the folder; a killed writer's
    lock goes with its process, so its leftover folder can be removed safely.
    """
    tmp = tempfile.mkdtemp(prefix=TMP_PREFIX, dir=parent)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        lock_fd(fd)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(fd)


def remove_stale_temps(folder: str, prefix: str = TMP_PREFIX, only_holding=None) -> List[str]:
    """Remove ``prefix*`` files and folders in ``folder`` that no live writer holds (flock); returns them.

    ``only_holding``: a set of file names; then only folders whose entries all belong to it are removed
    (for folders shared with other tools, where a ``.tmp-`` name alone does not make a temp ours).

    A writer that has created its temp but not yet locked it can lose it here; its final rename then fails
    loudly, so the race never yields a wrong file, and the trainer's run-folder lock excludes it anyway.
    """
    removed: List[str] = []
    if fcntl is None or not os.path.isdir(folder):
        return removed
    for name in sorted(os.listdir(folder)):
        if not name.startswith(prefix):
            continue
        p = os.path.join(folder, name)
        if only_holding is not None and not (os.path.isdir(p) and set(os.listdir(p)) <= set(only_holding)):
            continue
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue  # gone meanwhile, or not openable: leave it
        try:
            if not lock_fd(fd, block=False):
                continue  # a live writer holds it
            if os.path.isdir(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.unlink(p)
            removed.append(p)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed
