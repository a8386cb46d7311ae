"""MS-CXR-T temporal sentence similarity.

RadGraph subset; score = cosine of the normalised global text embeddings of the two sentences; label
1 for paraphrase, 0 for contradiction. Reports AUROC, the official accuracy (threshold chosen by the
best *test* fold, applied to all pairs; optimistic) and an honest 10-fold accuracy (threshold from the
training folds, scored on the held-out fold, averaged over folds).

Sentences are cleaned as in pretraining (``medst_fast.text.clean_report``) and joined with " ";
``official_join=True`` joins them with "" as the official evaluation does.
"""
from __future__ import annotations

import os

import numpy as np

from . import common
from .metrics import auroc, honest_threshold_accuracy, official_threshold_accuracy, require_finite
from .chance import accuracy_stats, auroc_stats, majority_fraction
from .report import TaskResult
from ..text.report import clean_report

CSV_NAME = "MS_CXR_T_temporal_sentence_similarity_v1.0.0.csv"
CATEGORIES = {"paraphrase": 1, "contradiction": 0}


def read_pairs(path, subset: str = "RadGraph"):
    """Returns (sentence_1 list, sentence_2 list, labels array).

    Columns are taken by name when the header has them, else by position as the official code reads
    them (``itertuples()`` fields 2-4, i.e. CSV columns 1-3: field 0 is the index).
    """
    df = common.read_csv_checked(path, ["subset_name"], dtype=str, keep_default_na=False)
    names = ("sentence_1", "sentence_2", "category")
    if all(n in df.columns for n in names):
        s1, s2, cat = (df[n] for n in names)
    else:
        if df.shape[1] < 4:
            raise ValueError(f"{path}: expected columns subset_name, sentence_1, sentence_2, category; "
                             f"found {list(df.columns)}")
        s1, s2, cat = (df.iloc[:, i] for i in (1, 2, 3))
    keep = np.ones(len(df), dtype=bool) if subset in (None, "all") else (df["subset_name"] == subset).to_numpy()
    if not keep.any():
        raise ValueError(f"{path}: no rows with subset_name == {subset!r} "
                         f"(found {sorted(df['subset_name'].unique())[:10]})")
    cats = cat.str.strip().str.lower()
    bad = keep & ~cats.isin(list(CATEGORIES)).to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{path}: column 'category' row {i + 2} has {cat.iloc[i]!r}; expected paraphrase/contradiction")
    labels = cats[keep].map(CATEGORIES).to_numpy().astype(np.int64)
    return list(s1[keep]), list(s2[keep]), labels


def clean(sentences, official_join: bool = False):
    return [clean_report(s, joiner="" if official_join else " ")[0] for s in sentences]


def similarities(model, tokenizer, s1, s2, official_join: bool = False, batch_size: int = 256) -> np.ndarray:
    e1 = common.embed_texts(model, tokenizer, clean(s1, official_join), batch_size, desc="sentences 1")
    e2 = common.embed_texts(model, tokenizer, clean(s2, official_join), batch_size, desc="sentences 2")
    for name, e, s in (("sentence_1", e1, s1), ("sentence_2", e2, s2)):
        require_finite(e.numpy(), f"{name} embeddings", "msxrt_sentence", names=[repr(x) for x in s])
    return (e1 * e2).sum(-1).numpy().astype(np.float64)


def evaluate(model, tokenizer, csv_path, subset: str = "RadGraph", official_join: bool = False,
             n_splits: int = 10, batch_size: int = 256) -> TaskResult:
    s1, s2, y = read_pairs(csv_path, subset)
    sim = similarities(model, tokenizer, s1, s2, official_join, batch_size)
    return score(sim, y, subset, n_splits, meta={"csv": os.fspath(csv_path), "pairs": len(y),
                                                   "join": '"" (official)' if official_join else '" "'})


def score(sim: np.ndarray, y: np.ndarray, subset: str = "RadGraph", n_splits: int = 10, meta=None) -> TaskResult:
    sim = require_finite(sim, "sentence-pair similarities", "msxrt_sentence")
    res = TaskResult("msxrt_sentence", meta=dict(meta or {}))
    n = len(y)
    a = auroc(y, sim)
    res.add(subset, "auroc", a, n=n, chance=0.5, stats=auroc_stats(a, y))
    acc, thr = official_threshold_accuracy(sim, y, n_splits)
    base = majority_fraction(y)
    # no p for the official accuracy: its threshold is chosen on the test fold, so chance would be above base
    res.add(subset, "accuracy_official", acc, n=n, chance=base,
            note=f"threshold {thr:.3f} chosen by the best test fold (optimistic; no chance test)")
    m, s, _ = honest_threshold_accuracy(sim, y, n_splits)
    res.add(subset, f"accuracy_cv{n_splits}", m, s, n, note="threshold from training folds; std over folds",
            chance=base, stats=accuracy_stats(m, n, base))
    return res


def find_csv(data) -> str:
    return common.find_file(data, [CSV_NAME], "MS-CXR-T sentence similarity CSV")
