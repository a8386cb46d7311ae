"""Metrics and the evaluation protocols' resampling rules, in numpy.

Written out (instead of calling sklearn.metrics) so each one is checked against hand-computed cases and
works without sklearn; only the SVC protocol needs sklearn.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np


def require_finite(values, what: str, task: str = "evaluation", names: Optional[Sequence] = None) -> np.ndarray:
    """Return ``values`` as an array, or raise when any entry is NaN or infinite.

    A NaN score sorts as a number in no metric (argsort puts it last, comparisons are all False), so a
    model that outputs NaN would get a plausible-looking score instead of an error. Rows are the first
    axis (one image, pair or sentence each); the message names the task, what was checked and how many
    of its rows are bad; ``names`` (one per row: an image path, a dicom id) names the first bad row.
    """
    a = np.asarray(values)
    num = a
    if a.dtype == object:
        try:
            num = a.astype(np.float64)
        except (TypeError, ValueError):  # labels given as strings: nothing numeric to check
            return a
    if num.dtype.kind not in "fc" or num.size == 0:  # integers, booleans and strings are always finite
        return a
    bad = ~np.isfinite(num)
    if bad.any():
        rows = bad.reshape(len(a), -1).any(axis=1) if a.ndim > 1 else bad
        first = int(np.flatnonzero(rows)[0])
        where = f"row {first}" + (f", {names[first]}" if names is not None and len(names) == len(a) else "")
        raise ValueError(f"{task}: {int(rows.sum())} of {len(a)} rows of {what} are not finite (NaN/inf; first at "
                         f"{where}); no score is reported for non-finite outputs")
    return a


def _arrays(y, p):
    y, p = np.asarray(y).ravel(), np.asarray(p).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels {y.shape} and predictions {p.shape} differ in length")
    if y.size == 0:
        raise ValueError("empty labels")
    return require_finite(y, "labels", "metric"), require_finite(p, "scores/predictions", "metric")


def accuracy(y, pred) -> float:
    y, pred = _arrays(y, pred)
    return float(np.mean(y == pred))


def balanced_accuracy(y, pred) -> float:
    """Macro-accuracy: the mean over the classes present in ``y`` of their recall (BioViL-T's metric)."""
    y, pred = _arrays(y, pred)
    return float(np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)]))


def f1_binary(y, pred) -> float:
    """F1 of the positive class (1). 0 when there is neither a positive label nor a positive prediction."""
    y, pred = _arrays(y, pred)
    y, pred = y.astype(bool), pred.astype(bool)
    tp = np.sum(y & pred)
    denom = 2 * tp + np.sum(~y & pred) + np.sum(y & ~pred)
    return float(2 * tp / denom) if denom else 0.0


def auroc(y, score) -> float:
    """Binary ROC AUC = P(score_pos > score_neg) + 0.5 P(tie) (Mann-Whitney, average ranks for ties)."""
    y, score = _arrays(y, score)
    y = y.astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC is undefined with only one class in the labels")
    score = score.astype(np.float64)
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    ranks = np.empty(len(s), dtype=np.float64)
    i = 0
    while i < len(s):  # average rank over each run of equal scores
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def kfold_indices(n: int, k: int) -> List[Tuple[np.ndarray, np.ndarray]]:
    """sklearn ``KFold(k)`` without shuffling: contiguous folds, the first n % k one item larger."""
    if not 2 <= k <= n:
        raise ValueError(f"cannot split {n} items into {k} folds")
    sizes = np.full(k, n // k)
    sizes[: n % k] += 1
    idx, out, start = np.arange(n), [], 0
    for sz in sizes:
        test = idx[start:start + sz]
        out.append((np.concatenate([idx[:start], idx[start + sz:]]), test))
        start += sz
    return out


# The official sentence-similarity grid: thresholds 0, 0.005, ..., 1.0 (np.arange as the code writes it).
THRESHOLD_GRID = np.arange(0, 1.005, 0.005)


def best_threshold(sim, y, grid=THRESHOLD_GRID) -> Tuple[float, float]:
    """The official search: predict ``sim > t``; keep the first t with strictly higher accuracy.

    Starts from (t=0, acc=0) as the official loop does. Returns (threshold, accuracy).
    """
    y, sim = _arrays(y, sim)
    sim, y = sim.astype(np.float64), y.astype(bool)
    best_t, best_acc = 0.0, 0.0
    for t in grid:
        acc = float(np.mean((sim > t) == y))
        if acc > best_acc:
            best_t, best_acc = float(t), acc
    return best_t, best_acc


def official_threshold_accuracy(sim, y, n_splits: int = 10, grid=THRESHOLD_GRID) -> Tuple[float, float]:
    """MS-CXR-T sentence accuracy as the official code computes it.

    For each of ``n_splits`` unshuffled KFold folds pick the threshold on the training folds; keep the
    threshold of the fold whose *test* accuracy is highest (first one on ties; 0 if all are 0) and apply
    it to every pair. Optimistic: the test folds choose the threshold. Returns (accuracy, threshold).
    """
    y, sim = _arrays(y, sim)
    sim, y = sim.astype(np.float64), y.astype(bool)
    chosen, best_test = 0.0, 0.0
    for tr, te in kfold_indices(len(y), n_splits):
        t, _ = best_threshold(sim[tr], y[tr], grid)
        acc = float(np.mean((sim[te] > t) == y[te]))
        if acc > best_test:
            best_test, chosen = acc, t
    return float(np.mean((sim > chosen) == y)), chosen


def honest_threshold_accuracy(sim, y, n_splits: int = 10, grid=THRESHOLD_GRID) -> Tuple[float, float, List[float]]:
    """Cross-validated accuracy: each fold's threshold is picked on its training folds only and scored
    on the fold. Returns (mean, std over folds, per-fold accuracies)."""
    y, sim = _arrays(y, sim)
    sim, y = sim.astype(np.float64), y.astype(bool)
    accs = []
    for tr, te in kfold_indices(len(y), n_splits):
        t, _ = best_threshold(sim[tr], y[tr], grid)
        accs.append(float(np.mean((sim[te] > t) == y[te])))
    return float(np.mean(accs)), float(np.std(accs)), accs


def svc_cross_val(X: np.ndarray, y: np.ndarray, n_splits: int, C: float = 1.0) -> Tuple[List[float], List[float]]:
    """``cross_val_score(SVC(kernel='linear'), X, y, cv=n_splits)`` as the official protocol runs it
    (an integer cv on a classifier is StratifiedKFold without shuffling), scoring each fold's fit with
    both accuracy and macro-accuracy. Returns (per-fold accuracy, per-fold macro-accuracy)."""
    try:
        from sklearn.model_selection import StratifiedKFold
        from sklearn.svm import SVC
    except ImportError as e:  # pragma: no cover
        raise ImportError("the MS-CXR-T image protocol needs scikit-learn: pip install scikit-learn") from e
    require_finite(X, "classifier features", "SVC cross-validation")
    require_finite(y, "labels", "SVC cross-validation")
    accs, maccs = [], []
    for tr, te in StratifiedKFold(n_splits=n_splits).split(X, y):
        pred = SVC(kernel="linear", C=C).fit(X[tr], y[tr]).predict(X[te])
        accs.append(accuracy(y[te], pred))
        maccs.append(balanced_accuracy(y[te], pred))
    return accs, maccs


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and population std (np.std, ddof=0, as the official script reports seeds)."""
    v = require_finite(np.asarray(values, dtype=np.float64), "per-seed scores", "mean_std")
    return float(v.mean()), float(v.std())
