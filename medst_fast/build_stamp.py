"""Whether the C++/CUDA extension medst_fast._C must be rebuilt (used by setup.py at install time).

Each ``pip install --no-build-isolation -e .[extra]`` runs build_ext again, and without this the extension
is compiled from scratch every time (1-2 minutes) although nothing it is made of changed. After a build,
setup.py writes a stamp: a fingerprint of everything the library depends on (its sources, the compile
flags, the torch and CUDA versions, the Python ABI, the CUDA arch list) and the identity of the .so it
produced. The next install skips the build when the fingerprint is the same and that .so is still there.
Standard library only: setup.py loads this file by path, before the package can be imported, so the
atomic write comes from files.py loaded the same way (it too is standard library only).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Dict, Iterable, Optional

STAMP_VERSION = 1


def _files_module():
    """medst_fast.files: imported normally, else (setup.py, no package yet) loaded from beside this file."""
    if __package__:
        from . import files

        return files
    import importlib.util

    spec = importlib.util.spec_from_file_location("_medst_fast_files",
                                                  os.path.join(os.path.dirname(os.path.abspath(__file__)), "files.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fingerprint(sources: Iterable[str], torch_version: str, cuda_version: Optional[str], flags: Dict) -> str:
    """sha256 over the source files' bytes (names included), the versions, the Python ABI and ``flags``
    (compile arguments, whether CUDA kernels are built, TORCH_CUDA_ARCH_LIST)."""
    h = hashlib.sha256()
    for path in sorted(sources):
        h.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read())
        h.update(b"\0")
    meta = {"torch": torch_version, "cuda": cuda_version, "python": sys.implementation.cache_tag,
            "platform": sys.platform, "flags": flags, "stamp": STAMP_VERSION}
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _so_identity(so_path: str) -> Optional[Dict]:
    try:
        st = os.stat(so_path)
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def is_up_to_date(stamp_path: str, so_path: str, fp: str) -> bool:
    """True when ``stamp_path`` records fingerprint ``fp`` for the very ``so_path`` that exists now (same size
    and modification time): a deleted, replaced or hand-built library, or any changed input, means rebuild."""
    ident = _so_identity(so_path)
    if ident is None:
        return False
    try:
        with open(stamp_path) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return False
    return (isinstance(rec, dict) and rec.get("fingerprint") == fp and rec.get("so") == os.path.abspath(so_path)
            and rec.get("so_identity") == ident)


def write_stamp(stamp_path: str, so_path: str, fp: str) -> None:
    """Record a successful build (atomically: a half-written stamp would read as 'up to date' garbage)."""
    rec = {"fingerprint": fp, "so": os.path.abspath(so_path), "so_identity": _so_identity(so_path)}
    _files_module().atomic_write(stamp_path, json.dumps(rec))
