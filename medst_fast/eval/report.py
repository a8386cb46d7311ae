"""Results of an evaluation task, and the markdown + CSV table they are written to."""
from __future__ import annotations

import csv
import datetime
import io
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from ..files import atomic_write
from .chance import verdict

# The evaluation tasks, in report order (here, below the CLI that runs them, so both can import it).
TASKS = ("msxrt-image", "msxrt-sentence", "rsna-zeroshot", "covidx-probe")
FIELDS = ["task", "subset", "metric", "value", "std", "n", "ci_low", "ci_high", "chance", "p", "baseline", "note"]


@dataclass
class TaskResult:
    task: str
    rows: List[Dict] = field(default_factory=list)  # each: subset, metric, value, std (or None), n, note
    meta: Dict = field(default_factory=dict)  # e.g. checkpoint, data file, counts

    def add(self, subset: str, metric: str, value: float, std: Optional[float] = None, n: Optional[int] = None,
            note: str = "", chance: Optional[float] = None, stats: Optional[Dict] = None):
        """``chance``: what a model without information scores; ``stats``: ci_low, ci_high and p (one-sided,
        against chance) from ``medst_fast.eval.chance``."""
        row = {"task": self.task, "subset": subset, "metric": metric, "value": float(value),
               "std": None if std is None else float(std), "n": n, "note": note,
               "chance": None if chance is None else float(chance), "ci_low": None, "ci_high": None, "p": None,
               "baseline": None}
        row.update({k: float(v) for k, v in (stats or {}).items()})
        self.rows.append(row)

    def set_baseline(self, other: "TaskResult") -> None:
        """Each row's ``baseline``: the same score of ``other`` (the random-init model of the same run)."""
        theirs = {(r["subset"], r["metric"]): r["value"] for r in other.rows}
        for r in self.rows:
            r["baseline"] = theirs.get((r["subset"], r["metric"]))

    def get(self, subset: str, metric: str) -> float:
        for r in self.rows:
            if r["subset"] == subset and r["metric"] == metric:
                return r["value"]
        raise KeyError(f"{self.task}: no row ({subset!r}, {metric!r})")


def _fmt(v, pct: bool) -> str:
    if v is None:
        return ""
    return f"{100 * v:.2f}" if pct else f"{v:.4f}"


def to_markdown(results: Sequence[TaskResult]) -> str:
    """One table per task, then its verdict line. Accuracy-like metrics in percent, AUROC as a fraction."""
    out = io.StringIO()
    for res in results:
        out.write(f"### {res.task}\n\n")
        for k, v in res.meta.items():
            out.write(f"- {k}: {v}\n")
        if res.meta:
            out.write("\n")
        out.write("| subset | metric | value | 95% CI | std | n | chance | random init | p vs chance | note |\n"
                  "|---|---|---|---|---|---|---|---|---|---|\n")
        for r in res.rows:
            pct = "auroc" not in r["metric"].lower()
            ci = "" if r.get("ci_low") is None else f"{_fmt(r['ci_low'], pct)}-{_fmt(r['ci_high'], pct)}"
            pv = "" if r.get("p") is None else f"{r['p']:.2g}"
            out.write(f"| {r['subset']} | {r['metric']}{' (%)' if pct else ''} | {_fmt(r['value'], pct)} | {ci} | "
                      f"{_fmt(r['std'], pct)} | {'' if r['n'] is None else r['n']} | {_fmt(r.get('chance'), pct)} | "
                      f"{_fmt(r.get('baseline'), pct)} | {pv} | {r['note']} |\n")
        out.write(f"\n{verdict(res.rows)}\n\n")
    return out.getvalue()


def to_csv(results: Sequence[TaskResult]) -> str:
    """Raw values (fractions, not percent), one row per (task, subset, metric)."""
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=FIELDS, lineterminator="\n")
    w.writeheader()
    for res in results:
        for r in res.rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in FIELDS})
    return out.getvalue()


def write_report(results: Sequence[TaskResult], out_dir: str, command: Optional[str] = None,
                 stem: str = "results") -> Dict[str, str]:
    """Write ``<stem>.md`` and ``<stem>.csv`` into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    md = f"# medst_fast evaluation ({datetime.datetime.now().isoformat(timespec='seconds')})\n\n"
    if command:
        md += f"Command:\n\n```\n{command}\n```\n\n"
    md += to_markdown(results)
    paths = {"md": os.path.join(out_dir, f"{stem}.md"), "csv": os.path.join(out_dir, f"{stem}.csv")}
    for key, text in (("md", md), ("csv", to_csv(results))):
        atomic_write(paths[key], text)
    return paths
