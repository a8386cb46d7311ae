"""Image checks and the resized image cache, shared by ``prepare`` (MIMIC-CXR) and ``manifest`` (generic CSV).

One job per image: ``(source, cache destination or None, longer side, draft)``. Without a destination the
job proves the source decodes (header + a draft decode at ``VERIFY_SIZE``: libjpeg skips most of the IDCT,
yet reads every byte of the entropy-coded data, so a truncated or corrupt file fails here and not later,
mid-epoch); with one it decodes, resizes and writes the cache file (temp name + rename, so a file that
exists is complete and a resumed run skips it). DICOM sources go through the same decoder the loaders use.

Jobs run in a process pool that never outlives the run: a signal (SIGTERM, SIGHUP, SIGINT) or an exception
in the parent terminates the workers, and each worker asks the kernel to kill it if the parent dies
(Linux ``PR_SET_PDEATHSIG``; elsewhere it checks its parent between chunks).
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Iterator, List, Optional, Tuple

from ..files import atomic_write, remove_stale_temps

log = logging.getLogger("medst_fast")

Job = Tuple[str, Optional[str], int, bool]  # (source, cache destination or None, longer side, draft)
VERIFY_SIZE = 64  # draft-decode target when only proving that an image decodes
CACHE_STAMP = ".cache-params.json"
_CHUNK = 16  # images per pool task: amortises the pickling round trip


class Interrupted(KeyboardInterrupt):
    """A termination signal arrived while images were being checked or cached."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum


# -------------------------------------------------------------------------------------------- one image
def check_or_cache(src: str, dst: Optional[str], size: int, draft: bool) -> Optional[str]:
    """Prove ``src`` decodes (``dst`` None) or write its resized cache copy. None on success, else a skip
    reason: "missing_image" or "unreadable_image"."""
    from .images import ImageReadError, load_gray, resize_longer, save_jpeg_atomic

    if dst is not None and os.path.isfile(dst):  # complete by construction (atomic rename): resume skips it
        return None
    if not os.path.isfile(src):
        return "missing_image"
    try:
        if dst is None:
            load_gray(src, draft_longer=VERIFY_SIZE)
            return None
        img = resize_longer(load_gray(src, draft_longer=size if draft else None), size)
    except ImageReadError:
        return "unreadable_image"
    save_jpeg_atomic(img, dst)
    return None


def cache_name(rel: str, image_root: str) -> str:
    """Cache path (relative to the cache folder) of a manifest image, distinct for distinct sources.

    A source inside ``image_root`` keeps its layout and its own extension, plus ".jpg" (``x.png`` ->
    ``x.png.jpg``, ``x.jpg`` -> ``x.jpg.jpg``): two sources that differ only by extension no longer meet
    in one file. A source outside it (absolute elsewhere, or ``../``) goes under ``_external/`` with a hash
    of its absolute path, so it cannot land on an inside path either.
    """
    src = os.path.normpath(rel if os.path.isabs(rel) else os.path.join(image_root, rel))
    inner = os.path.relpath(src, os.path.normpath(image_root))
    if inner == os.pardir or inner.startswith(os.pardir + os.sep) or os.path.isabs(inner):
        digest = hashlib.sha1(src.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        inner = os.path.join("_external", digest, os.path.basename(src))
    return inner + ".jpg"


# ------------------------------------------------------------------------------------------ cache folder
def open_cache(folder: str, size: int, draft: bool) -> None:
    """Ready a cache folder for a (possibly resumed) run: check its decode settings, drop partial files."""
    check_cache_stamp(folder, size, draft)
    removed = len(remove_stale_temps(folder, recursive=True))  # unheld ones only: a live writer's stay
    if removed:
        log.info("removed %d partial cache files left by an interrupted run in %s", removed, folder)


def check_cache_stamp(folder: str, size: int, draft: bool) -> None:
    """Record how a cache folder is decoded, or refuse to add to one made with other settings.

    A rerun resumes by keeping every cache file that exists; mixing draft and full decodes (or two sizes)
    in one folder would give a cache no single run could reproduce, so the first run writes its settings
    and later runs must match them.
    """
    want = {"cache_size": int(size), "draft": bool(draft)}
    path = os.path.join(folder, CACHE_STAMP)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                have = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: unreadable cache settings ({e}); delete the folder to rebuild it") from e
        if not isinstance(have, dict):
            raise ValueError(f"{path}: expected a JSON object of cache settings; delete the folder to rebuild it")
        for k, v in want.items():
            if have.get(k) != v:
                raise ValueError(f"{path}: field {k!r} is {have.get(k)!r} but this run asks for {v!r}; "
                                 f"rerun with the same settings (--no-draft / --cache-size) or use a new --out")
        return
    os.makedirs(folder, exist_ok=True)
    atomic_write(path, json.dumps(want, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------------------- worker pool
_parent_pid: Optional[int] = None


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this worker when its parent dies (Linux); a no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: the per-chunk parent check below still applies
        pass


def _worker_init() -> None:
    global _parent_pid
    _parent_pid = os.getppid()
    # The parent handles Ctrl-C and termination (it terminates the pool); a fork-inherited Python handler
    # would raise inside a worker instead.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent()
    if os.getppid() != _parent_pid:  # the parent died before the request took effect
        os._exit(1)


def _work_chunk(chunk: List[Job]) -> List[Optional[str]]:
    if _parent_pid is not None and os.getppid() != _parent_pid:
        os._exit(1)  # orphaned (no PR_SET_PDEATHSIG on this platform): stop instead of working for nobody
    return [check_or_cache(*job) for job in chunk]


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into ``Interrupted`` in the main thread while the pool runs, so cleanup happens."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    owner = os.getpid()

    def handler(signum, _frame):
        if os.getpid() != owner:
            # A pool worker forked while this handler was installed and signalled before its initializer
            # reset the handler: die as the default action would, not with a traceback from fork bootstrap.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        raise Interrupted(signum)

    names = [s for s in ("SIGTERM", "SIGHUP") if hasattr(signal, s)]
    old = {n: signal.signal(getattr(signal, n), handler) for n in names}
    try:
        yield
    finally:
        for n, h in old.items():
            signal.signal(getattr(signal, n), h)


def _reap(procs: list, manager: Optional[threading.Thread], timeout: float) -> bool:
    """Wait up to ``timeout`` s until every worker's exit is recorded; True when all are.

    The executor's manager thread waits on the same children (it joins them once the pool breaks) and may
    reap one first. multiprocessing then reports that child as running (its waitpid gets ECHILD, which
    poll() turns into "no exit code yet") until the manager thread stores the code; so the manager thread
    is joined too, not only the processes.
    """
    deadline = time.monotonic() + timeout
    if manager is not None:
        manager.join(timeout)
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    return all(p.exitcode is not None for p in procs)


def _terminate(ex: cf.ProcessPoolExecutor) -> None:
    # shutdown(cancel_futures=True) only drops queued tasks; workers busy on a chunk would keep running
    # (and writing cache files) after the parent is gone, so they are terminated. _processes (pid -> Process)
    # and _executor_manager_thread are the executor's private fields, present in every CPython since 3.9.
    procs = list((getattr(ex, "_processes", None) or {}).values())
    manager = getattr(ex, "_executor_manager_thread", None)  # shutdown() drops the reference: take it first
    for p in procs:
        if p.exitcode is None:
            p.terminate()
    ex.shutdown(wait=False, cancel_futures=True)
    if _reap(procs, manager, 5):
        return
    # A worker still running after SIGTERM + 5 s is killed. A process in uninterruptible disk sleep takes
    # SIGKILL only when its I/O completes, so the wait after the kill is long (it returns as soon as every
    # worker is gone) and a survivor is reported, not silently left behind.
    for p in procs:
        if p.exitcode is None:
            p.kill()
    if not _reap(procs, manager, 60):
        for p in procs:
            if p.exitcode is None:
                log.warning("data/cache.py: pool worker pid %d still alive 60 s after SIGKILL", p.pid)


def run_jobs(jobs: List[Job], workers: int, progress: bool, desc: str) -> List[Optional[str]]:
    """Run ``check_or_cache`` over ``jobs`` (in this process when ``workers`` <= 0); results in job order."""
    if not jobs:
        return []
    chunks = [jobs[i:i + _CHUNK] for i in range(0, len(jobs), _CHUNK)]
    bar = _bar(len(jobs), desc, progress)
    out: List[Optional[str]] = []
    try:
        if workers <= 0 or len(chunks) == 1:
            for c in chunks:
                out.extend(_work_chunk(c))
                bar.update(len(c))
            return out
        with _signals_raise():
            ex = cf.ProcessPoolExecutor(max_workers=workers, initializer=_worker_init)
            try:
                for c, res in zip(chunks, ex.map(_work_chunk, chunks)):
                    out.extend(res)
                    bar.update(len(c))
            except BaseException:
                _terminate(ex)
                raise
            ex.shutdown(wait=True)
    finally:
        bar.close()
    return out


def _bar(total: int, desc: str, progress: bool):
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="img", disable=None if progress else True, file=sys.stderr)
    except ImportError:  # tqdm is optional
        class _Null:
            def update(self, n): pass
            def close(self): pass
        return _Null()
