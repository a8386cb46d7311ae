"""Downstream evaluation (the official evaluation protocols): ``python -m medst_fast.eval TASK --checkpoint ... --data ...``.

Tasks (one subcommand each, with its own ``--help``): ``msxrt-image`` (MS-CXR-T temporal image
classification), ``msxrt-sentence`` (MS-CXR-T temporal sentence similarity), ``rsna-zeroshot`` (zero-shot RSNA
pneumonia), ``covidx-probe`` (COVIDx linear probe), and ``all`` (every task whose data is found).
Each module has ``evaluate(...) -> TaskResult``; ``report.write_report`` writes the markdown + CSV table.
Submodules import pandas/sklearn/pydicom lazily, so importing this package is cheap.
"""
from .report import TASKS, TaskResult, to_csv, to_markdown, write_report

__all__ = ["TASKS", "TaskResult", "to_csv", "to_markdown", "write_report", "main"]


def main(argv=None):
    from .__main__ import main as _main

    return _main(argv)
