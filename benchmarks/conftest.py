"""Benchmarks run only with ``pytest benchmarks/ --benchmark``. Every row goes to ``--bench-csv PATH`` (appended
when the file has the schema's header) or to a new file under benchmarks/results/local/ (git-ignored), and all
rows are printed as one table at the end of the run, even with ``-q``. ``--bench-quick`` (or
MEDST_BENCH_QUICK=1) shrinks every benchmark to a smoke run. No fixture is named ``benchmark`` (that would
collide with pytest-benchmark)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _interpreter_fix():
    """Under TRITON_INTERPRET=1 (the GEMM sweep's CPU smoke run): the tests' start-up fix for Triton 3.6's
    interpreter with numpy >= 2.4 (tests/_interp_site/sitecustomize.py says why)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import importlib.util

    path = os.path.join(HERE, "..", "tests", "_interp_site", "sitecustomize.py")
    if os.path.isfile(path):
        spec = importlib.util.spec_from_file_location("_medst_interp_fix", path)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


_interpreter_fix()


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False, help="run the benchmarks in benchmarks/")
    parser.addoption("--bench-csv", default=None,
                     help="CSV file for the benchmark rows (default: a new file in benchmarks/results/local/)")
    parser.addoption("--bench-quick", action="store_true", default=False,
                     help="smallest sizes: check that every benchmark runs (sets MEDST_BENCH_QUICK=1)")


def pytest_configure(config):
    if config.getoption("--bench-quick"):
        os.environ["MEDST_BENCH_QUICK"] = "1"  # before the benchmark modules are imported (collection)


def pytest_collection_modifyitems(config, items):
    if config.getoption("--benchmark"):
        return
    skip = pytest.mark.skip(reason="benchmarks run only with --benchmark")
    for item in items:
        if os.path.abspath(str(item.fspath)).startswith(HERE):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def bench_results(request):
    """The session's Results: ``bench_results.add(rows)`` writes them and queues them for the summary table."""
    res = _common.Results(request.config.getoption("--bench-csv"))
    request.config._medst_bench_results = res
    return res


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    res = getattr(config, "_medst_bench_results", None)
    if res is None:
        return
    tr = terminalreporter
    tr.write_sep("=", "medst_fast benchmarks")
    if not res.rows:
        tr.write_line("no benchmark rows were recorded")
        return
    if not any(r["performance_number"] == "true" for r in res.rows):
        why = ", ".join(x for x in ("" if _common.CUDA else "no CUDA device: CPU, tiny shapes",
                                    "quick mode" if _common.quick() else "") if x)
        tr.write_line(f"NOT PERFORMANCE NUMBERS ({why}): these rows only show that the benchmarks run.")
    tr.write_line("ratio = how many times better ours is than the baseline (same precision on both sides, except "
                  "rows named '... precision')")
    for line in res.table():
        tr.write_line(line)
    tr.write_line(f"rows written to {res.path}")
