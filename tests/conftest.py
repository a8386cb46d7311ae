import hashlib
import json
import os
import shutil

import pytest
import torch

# The shared resources (vocabulary, the covid-cxr sample) live beside the repository, in ../shared (CI puts
# them there); MEDST_SHARED_DIR points elsewhere.
SHARED = os.path.abspath(os.environ.get("MEDST_SHARED_DIR")
                         or os.path.join(os.path.dirname(__file__), "..", "..", "shared"))
# What the suite reads from it. With MEDST_REQUIRE_SHARED=1 (CI) every one must exist, so a test that checks
# a sub-path itself can never skip there either.
SHARED_RESOURCES = (
    os.path.join("vocab", "bio_clinicalbert", "vocab.txt"),
    os.path.join("data", "covid-cxr", "manifest.csv"),
    os.path.join("data", "covid-cxr", "images"),
)
SKIP_PREFIX = "missing shared resource"


def shared_required() -> bool:
    return os.environ.get("MEDST_REQUIRE_SHARED", "0") not in ("", "0")


def skip_for_missing(what: str) -> None:
    """Skip a test that needs ``what`` (a path under the shared folder), or fail it when CI requires it."""
    reason = f"{SKIP_PREFIX}: {what}"
    if shared_required():
        pytest.fail(f"{reason} (MEDST_REQUIRE_SHARED=1: shared resources are required here)", pytrace=False)
    pytest.skip(reason)


def _need(*parts: str) -> str:
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        skip_for_missing(path)
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shared_dir():
    _need()
    if shared_required():
        for rel in SHARED_RESOURCES:
            _need(rel)
    return SHARED


@pytest.fixture(scope="session")
def shared_file(shared_dir):
    """``shared_file("data", "covid-cxr", "manifest.csv")``: the path, or a skip (CI: a failure) naming it."""
    return _need


@pytest.fixture(scope="session")
def covid(shared_file):
    """The shared COVID-CXR sample folder (real X-rays + manifest.csv) the loader tests index."""
    shared_file("data", "covid-cxr", "manifest.csv")  # a named skip (a failure in CI) when it is missing
    return shared_file("data", "covid-cxr")


@pytest.fixture(scope="session")
def vocab_path(shared_dir):
    return _need("vocab", "bio_clinicalbert", "vocab.txt")


# -- session fixtures: built once, read-only to tests -------------------------------------------------------------
# A test that writes gets a copy in its own tmp_path (copy_index / copy_run); each session fixture checks at the
# end of the session that its files are bitwise what it built, so a test that wrote into the shared one fails.
def _tree_digest(root: str) -> str:
    h = hashlib.sha256()
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            p = os.path.join(d, name)
            h.update(os.path.relpath(p, root).encode() + b"\0")
            with open(p, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def _read_only(root: str):
    """Yield ``root`` and fail the session if anything under it changed meanwhile."""
    before = _tree_digest(root)
    yield root
    if _tree_digest(root) != before:
        pytest.fail(f"a test modified the shared session folder {root}: tests that write must copy it first "
                    f"(copy_index / copy_run)", pytrace=False)


@pytest.fixture(scope="session")
def tiny_tree(tmp_path_factory):
    """An 8-patient synthetic MIMIC-CXR tree (80x64 JPEGs, plain-text reports) and its prepared index: 13
    training series. ``<root>/tree`` and ``<root>/idx``; the index is ``tiny_index``."""
    from medst_fast.data import prepare, synth

    root = tmp_path_factory.mktemp("tiny_index")
    synth.generate(str(root / "tree"), patients=8, seed=3, extras=False, zip_reports=False, image_size=(80, 64))
    prepare.prepare_mimic(str(root / "tree"), str(root / "tree"), str(root / "idx"), cache_size=None, workers=0,
                          progress=False)
    yield from _read_only(str(root))


@pytest.fixture(scope="session")
def tiny_index(tiny_tree):
    """The session's tiny prepared index folder (read-only: write into ``copy_index(tmp_path)`` instead)."""
    return os.path.join(tiny_tree, "idx")


def move_to_valid(idx, n: int = 3) -> None:
    """Make the last ``n`` training series of a loaded SeriesIndex its 'valid' split (the caller saves it)."""
    import dataclasses

    idx.series["valid"] = idx.series["train"][-n:]
    idx.series["train"] = idx.series["train"][:-n]
    for chunk in idx.series["valid"]:
        for r in chunk:
            idx.studies[r] = dataclasses.replace(idx.studies[r], split="valid")


@pytest.fixture(scope="session")
def copy_index(tiny_tree):
    """``copy_index(dst)``: a private copy of the tiny tree + index at ``dst`` (a new folder); returns the index folder,
    whose meta.json points at the copied images (so a test may damage them)."""
    def copy(dst) -> str:
        dst = str(dst)
        shutil.copytree(tiny_tree, dst)
        meta_path = os.path.join(dst, "idx", "meta.json")
        with open(meta_path) as f:
            meta = json.load(f)
        meta["image_root"] = os.path.join(dst, "tree")
        with open(meta_path, "w") as f:
            json.dump(meta, f)
        return os.path.join(dst, "idx")
    return copy


# The smallest run the CLI makes: the tiny model at 32 px and 32 tokens on 8 in-memory random series, 2 per
# step, 4 steps, a checkpoint every 2 (both kept), the final/ and final_encoder/ exports.
TINY_RUN_STEPS = 4


def tiny_run_argv(out, vocab, *extra):
    """The flags of the session's finished run (``tiny_run``); a resume of a copy passes the same ones."""
    return ["--dataset-type", "random", "--random-series", "8", "--vocab", vocab, "--out", str(out), "--workers",
            "0", "--batch-series", "2", "--log-every", "1", "--max-steps", str(TINY_RUN_STEPS), "--save-every", "2",
            "--keep", "5", "--progress", "off", "--model-override", "vision.img_size=32", "--model-override",
            "text.max_length=32", *extra]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, vocab_path):
    """A finished run folder (trained once per session; read-only: use ``copy_run``)."""
    from medst_fast.pretrain import main

    out = tmp_path_factory.mktemp("tiny_run") / "run"
    res = main(tiny_run_argv(out, vocab_path))
    assert res.step == TINY_RUN_STEPS and res.export_dir is not None
    yield from _read_only(str(out))


@pytest.fixture(scope="session")
def copy_run(tiny_run):
    """``copy_run(dst)``: a private copy of the session's finished run at ``dst`` (returns its path as str)."""
    def copy(dst) -> str:
        shutil.copytree(tiny_run, str(dst))
        return str(dst)
    return copy


# -- counting full trainer runs ---------------------------------------------------------------------------------
# MEDST_COUNT_TRAINER_RUNS=1: count the in-process trainer runs (calls of medst_fast.train.loop.train), each
# credited to the test being set up or run (a module or session fixture's runs go to the first test that needs
# it); the summary prints the total and the tests that make them. Runs in a subprocess (the CLI, torchrun) are not seen here.
_RUNS: dict = {}
_CURRENT = {"test": "(outside a test)", "depth": 0}


def _count_runs_enabled() -> bool:
    return os.environ.get("MEDST_COUNT_TRAINER_RUNS", "0") not in ("", "0")


# A call refused before its first step (a resume check, a run-folder check, a bad flag) is counted apart.
_REFUSALS = ("CheckpointError", "RunFolderError", "UsageError", "SystemExit")


def _counted(fn):
    def wrapper(*a, **k):
        outer = _CURRENT["depth"] == 0
        _CURRENT["depth"] += 1
        kind = "runs"
        try:
            return fn(*a, **k)
        except BaseException as e:
            kind = "refused" if type(e).__name__ in _REFUSALS else kind
            raise
        finally:
            _CURRENT["depth"] -= 1
            if outer:
                counts = _RUNS.setdefault(_CURRENT["test"], {"runs": 0, "refused": 0})
                counts[kind] += 1
    return wrapper


def pytest_sessionstart(session):
    if not _count_runs_enabled():
        return
    from medst_fast.train import loop

    loop.train = _counted(loop.train)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _CURRENT["test"] = item.nodeid


def pytest_terminal_summary(terminalreporter):
    if _count_runs_enabled():
        runs = sum(c["runs"] for c in _RUNS.values())
        refused = sum(c["refused"] for c in _RUNS.values())
        terminalreporter.write_line(f"in-process trainer runs: {runs} (and {refused} refused before a step) in "
                                    f"{len(_RUNS)} test(s)")
        for nodeid, c in sorted(_RUNS.items(), key=lambda kv: -kv[1]["runs"]):
            terminalreporter.write_line(f"  {c['runs']:3d} runs {c['refused']:3d} refused  {nodeid}")
    # pytest -q prints only "N skipped"; say once which shared resources those skips were missing.
    missing = {}
    for rep in terminalreporter.stats.get("skipped", []):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) and len(rep.longrepr) == 3 else ""
        if SKIP_PREFIX in reason:
            what = reason.split(f"{SKIP_PREFIX}: ", 1)[1]
            missing[what] = missing.get(what, 0) + 1
    for what, n in sorted(missing.items()):
        terminalreporter.write_line(f"{n} test(s) skipped: {SKIP_PREFIX}: {what} "
                                    f"(set MEDST_REQUIRE_SHARED=1 to make this a failure, as CI does)")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cuda: needs a CUDA device; skipped without one. benchmarks/device_check.sh's correctness "
                   "stage selects these with `pytest -m cuda`")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
