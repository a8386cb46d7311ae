"""Chance levels, confidence intervals and one-sided tests for evaluation scores.

A score means little without what a model that learned nothing would get on the same test set: small test
sets (a handful of RSNA images, a few hundred MS-CXR-T pairs) give accuracies and AUROCs far from their
chance level by luck alone. Each row of a table carries its chance level, a 95% interval (Wilson for
accuracies, Hanley-McNeil for AUROC) and a one-sided p-value against chance; ``verdict`` turns a task's rows
into one line, worded like the trainer's validation line.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

ALPHA = 0.05
Z95 = 1.959963984540054
# Below this many test items a table says so: a 95% interval is then wider than about +-10 points.
SMALL_N = 100


def normal_sf(z: float) -> float:
    """P(Z >= z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exact (log-space sum, fine for the test-set sizes here)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    i = np.arange(k, n + 1)
    logpmf = (math.lgamma(n + 1) - np.array([math.lgamma(j + 1) + math.lgamma(n - j + 1) for j in i])
              + i * math.log(p) + (n - i) * math.log1p(-p))
    return float(min(1.0, np.exp(logpmf).sum()))


def wilson(k: int, n: int, z: float = Z95) -> Tuple[float, float]:
    """Wilson score interval of a proportion k/n (sensible at n = 6 and at 0 or n successes)."""
    if n <= 0:
        return float("nan"), float("nan")
    ph = k / n
    d = 1 + z * z / n
    c = (ph + z * z / (2 * n)) / d
    h = z * math.sqrt(ph * (1 - ph) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def hanley_mcneil(auc: float, n_pos: int, n_neg: int, z: float = Z95) -> Tuple[float, float]:
    """Hanley & McNeil (1982) normal interval of an AUROC from the positive and negative counts."""
    if n_pos <= 0 or n_neg <= 0:
        return float("nan"), float("nan")
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)
    se = math.sqrt(max(var, 0.0))
    return max(0.0, auc - z * se), min(1.0, auc + z * se)


def auroc_p(auc: float, n_pos: int, n_neg: int) -> float:
    """One-sided p of AUROC >= auc when scores carry no information (Mann-Whitney U, normal approximation)."""
    if n_pos <= 0 or n_neg <= 0:
        return float("nan")
    se0 = math.sqrt((n_pos + n_neg + 1) / (12.0 * n_pos * n_neg))
    return normal_sf((auc - 0.5) / se0)


def majority_fraction(y) -> float:
    """Accuracy of always predicting the most frequent class: the chance level of accuracy."""
    y = np.asarray(y)
    return float(np.unique(y, return_counts=True)[1].max() / len(y)) if len(y) else float("nan")


def f1_chance(y) -> float:
    """F1 of predicting every item positive (the F1 a model without information reaches without trying)."""
    pi = float(np.mean(np.asarray(y) == 1)) if len(y) else float("nan")
    return 2 * pi / (1 + pi) if pi > 0 else 0.0


def accuracy_stats(value: float, n: Optional[int], chance: float) -> Dict:
    """95% Wilson interval and binomial p against ``chance`` for an accuracy over ``n`` items."""
    if not n:
        return {}
    k = int(round(value * n))
    lo, hi = wilson(k, n)
    return {"ci_low": lo, "ci_high": hi, "p": binomial_sf(k, n, chance)}


def auroc_stats(value: float, y) -> Dict:
    y = np.asarray(y)
    n_pos, n_neg = int((y == 1).sum()), int((y != 1).sum())
    lo, hi = hanley_mcneil(value, n_pos, n_neg)
    return {"ci_low": lo, "ci_high": hi, "p": auroc_p(value, n_pos, n_neg)}


def verdict(rows: Sequence[Dict], alpha: float = ALPHA) -> str:
    """One line for a task's rows: above chance or not (one-sided p, Bonferroni over the task's tested
    scores), scores below their chance level, the random-init baseline, and a small-test-set warning."""
    tested = [r for r in rows if r.get("p") is not None and not math.isnan(r["p"])]
    if not tested:
        return "verdict: no score here has a chance test"
    m = len(tested)
    above = [r for r in tested if r["p"] < alpha / m]
    if above:
        shown = ", ".join(f"{r['subset']} {r['metric']} p {r['p']:.2g}" for r in above[:4])
        more = f" and {len(above) - 4} more" if len(above) > 4 else ""
        line = f"verdict: above chance on {len(above)} of {m} scores ({shown}{more})"
    else:
        best = min(tested, key=lambda r: r["p"])
        line = (f"verdict: not distinguishable from chance at p < {alpha:g} ({m} scores, Bonferroni; smallest p "
                f"{best['p']:.2g}, {best['subset']} {best['metric']})")
    # a tolerance: a mean of fold accuracies equal to the majority rate can differ from it in the last bits
    below = [r for r in rows if r.get("chance") is not None and r["value"] < r["chance"] - 1e-9]
    if below:
        line += f"; {len(below)} below their chance level"
    based = [r for r in rows if r.get("baseline") is not None]
    if based:
        wins = sum(r["value"] > r["baseline"] + 1e-9 for r in based)
        line += f"; beats the random-init baseline on {wins} of {len(based)}"
    ns = [r["n"] for r in tested if r.get("n")]
    if ns and min(ns) < SMALL_N:
        line += f"; small test set (n={min(ns)}): read the 95% intervals, not the point values"
    return line
