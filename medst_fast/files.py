"""File helpers every writer in the package shares: atomic writes, stale-temp cleanup, locks, sha256, JSON.

This module imports nothing from medst_fast (and only the standard library), so any module can use it, and
setup.py can load it by path before the package is importable.

One temp-name scheme serves every atomic write: ``.tmp-<pid>-<random>-<basename>`` in the target's folder
(the same file system, so the final ``os.replace`` is atomic). The writer holds an flock on the temp while it
writes and until it is renamed, so ``remove_stale_temps`` can tell a live writer's temp (locked) from one a
killed writer left behind (its lock died with the process) and removes only the latter.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
from typing import IO, Collection, Iterator, List, Optional, Union

try:  # POSIX; without it temps are not locked and stale ones are never removed (nothing else changes)
    import fcntl
except ImportError:  # pragma: no cover (Windows)
    fcntl = None

TMP_PREFIX = ".tmp-"
_TEMP_NAME = re.compile(r"^\.tmp-\d+-[0-9a-f]{12}-(.+)$")  # what temp_name makes; group 1: the target's name


# -- locks ----------------------------------------------------------------------------------------------
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


# -- temps ----------------------------------------------------------------------------------------------
def temp_name(path: Union[str, os.PathLike]) -> str:
    """A fresh temp path for ``path``: ``.tmp-<pid>-<random>-<basename>`` in the same folder."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(folder, f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}-{name}")


def fsync_dir(folder: str) -> None:
    """Make a rename in ``folder`` durable (POSIX); a platform that cannot open a folder skips it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def move_into_place(tmp: str, path: Union[str, os.PathLike]) -> None:
    """fsync ``tmp``, rename it to ``path`` and fsync the folder: after a crash the file is old or new, whole."""
    path = os.fspath(path)
    _fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def held_temp_file(path: Union[str, os.PathLike]) -> Iterator[str]:
    """A fresh, empty temp file beside ``path``, flocked until the block ends; yields its name.

    The caller writes it by name (a library that only takes a path) and moves it in with
    ``move_into_place`` inside the block; a temp still there at the end (the body raised) is removed.
    """
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    os.makedirs(folder, exist_ok=True)
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)  # the usual umask applies
    try:
        lock_fd(fd)  # held until closed, i.e. past the rename: a cleaner never takes a temp being written
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # only when it was not moved in
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: Union[str, os.PathLike], mode: str = "w", clean: bool = True, **open_kw) -> Iterator[IO]:
    """Open a temp beside ``path`` for writing; when the block ends normally it replaces ``path`` (fsynced).

    If the block raises, ``path`` keeps its old content and the temp is removed. ``mode`` is "w" or "wb";
    ``open_kw`` go to ``open`` (encoding, newline). ``clean``: first remove the temps a killed earlier write
    of this same file left beside it (one listing of the folder; a writer of thousands of files into one
    tree passes False and cleans the tree once with ``remove_stale_temps(..., recursive=True)``).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_writer: mode must be 'w' or 'wb', got {mode!r}")
    if mode == "w":
        open_kw.setdefault("encoding", "utf-8")
    if clean:
        folder, name = os.path.split(os.path.abspath(os.fspath(path)))
        remove_stale_temps(folder, targets=[name])
    with held_temp_file(path) as tmp:
        with open(tmp, mode, **open_kw) as f:
            yield f
        move_into_place(tmp, path)


def atomic_write(path: Union[str, os.PathLike], data: Union[bytes, str]) -> None:
    """Replace ``path`` with ``data`` (bytes, or str written as UTF-8) atomically and durably (``atomic_writer``)."""
    with atomic_writer(path, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


@contextlib.contextmanager
def held_temp_dir(parent: str, name: str = "dir") -> Iterator[str]:
    """A fresh ``.tmp-*`` folder in ``parent``, flocked while the caller writes into it, removed afterwards.

    The lock tells a cleaner (``remove_stale_temps``) that a live writer owns the folder; a killed writer's
    lock goes with its process, so its leftover folder can be removed safely.
    """
    tmp = temp_name(os.path.join(parent, name))
    os.mkdir(tmp, 0o700)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        lock_fd(fd)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(fd)


def _temp_for(name: str, targets: Collection[str]) -> bool:
    """Whether ``name`` is a ``temp_name`` temp of one of the file names ``targets``."""
    m = _TEMP_NAME.match(name)
    return m is not None and m.group(1) in targets


def _remove_if_unheld(p: str) -> bool:
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:
        return False  # gone meanwhile, or not openable: leave it
    try:
        if not lock_fd(fd, block=False):
            return False  # a live writer holds it
        if os.path.isdir(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            os.unlink(p)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def remove_stale_temps(folder: str, prefix: str = TMP_PREFIX, only_holding=None, recursive: bool = False,
                       targets: Optional[Collection[str]] = None) -> List[str]:
    """Remove ``prefix*`` files and folders in ``folder`` that no live writer holds (flock); returns them.

    ``only_holding``: a set of file names; then only folders whose entries all belong to it are removed
    (for folders shared with other tools, where a ``.tmp-`` name alone does not make a temp ours).
    ``recursive``: look in every subfolder too (an image cache spreads its files over a tree).
    ``targets``: file names; then only temps that ``temp_name`` made for one of them are removed (for a
    user's output folder, where another program's ``.tmp-`` files are none of ours).

    A writer that has created its temp but not yet locked it can lose it here; its final rename then fails
    loudly, so the race never yields a wrong file.
    """
    removed: List[str] = []
    if fcntl is None or not os.path.isdir(folder):
        return removed
    walk = os.walk(folder) if recursive else [(folder, None, None)]
    for d, _, _ in walk:
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        for name in names:
            if not name.startswith(prefix) or (targets is not None and not _temp_for(name, targets)):
                continue
            p = os.path.join(d, name)
            if only_holding is not None and not (os.path.isdir(p) and set(os.listdir(p)) <= set(only_holding)):
                continue
            if _remove_if_unheld(p):
                removed.append(p)
    return removed


# -- reading --------------------------------------------------------------------------------------------
def file_digest(path: Union[str, os.PathLike]) -> str:
    """sha256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json_object(path: Union[str, os.PathLike]) -> dict:
    """A JSON file whose top level is an object; anything else is one ValueError line naming the file."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: top level must be a JSON object, got {type(d).__name__}")
    return d
