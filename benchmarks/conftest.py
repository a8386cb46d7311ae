"""Benchmarks run only with ``pytest benchmarks/ --benchmark``; rows go to ``--bench-csv`` (default
benchmarks/results/bench.csv). No fixture is named ``benchmark`` (that would collide with pytest-benchmark)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import DEFAULT_CSV  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False, help="run the benchmarks in benchmarks/")
    parser.addoption("--bench-csv", default=DEFAULT_CSV, help="CSV file the benchmark rows are appended to")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--benchmark"):
        return
    here = os.path.dirname(os.path.abspath(__file__))
    skip = pytest.mark.skip(reason="benchmarks run only with --benchmark")
    for item in items:
        if os.path.abspath(str(item.fspath)).startswith(here):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def bench_csv(request):
    return request.config.getoption("--bench-csv")
