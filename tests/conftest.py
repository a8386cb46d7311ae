import os

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


def pytest_terminal_summary(terminalreporter):
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
