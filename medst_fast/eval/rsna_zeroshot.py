"""Zero-shot RSNA pneumonia.

Split: ``stage_2_train_labels.csv`` grouped per patient (Target 1 if any box), sorted by patientId (pandas
groupby order), ``train_test_split(test_size=0.30, random_state=0)``, then the 30% split 50/50 into test
(first) and valid. Prompts: BioViL's. Class text embedding = normalise(mean of the *unnormalised* prompt
embeddings); score = cosine with the normalised image embedding; predict pneumonia if pos > neg.
Reports accuracy, F1, a score-based AUROC (on pos - neg) and the official "AUROC" of the hard
predictions (which equals balanced accuracy), labelled as such.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import common
from .metrics import accuracy, auroc, f1_binary, require_finite
from .chance import accuracy_stats, auroc_stats, f1_chance, majority_fraction
from .report import TaskResult
from ..text.report import clean_report
from ..zero_shot import build_zero_shot_classifier, zero_shot_logits

LABELS_CSV = "stage_2_train_labels.csv"
IMAGE_DIR = "stage_2_train_images"
POSITIVE_PROMPTS = (
    "Findings consistent with pneumonia",
    "Findings suggesting pneumonia",
    "This opacity can represent pneumonia",
    "Findings are most compatible with pneumonia",
)
NEGATIVE_PROMPTS = (
    "There is no pneumonia",
    "No evidence of pneumonia",
    "No evidence of acute pneumonia",
    "No signs of pneumonia",
)


def read_prompts(path) -> Tuple[List[str], List[str]]:
    """A JSON file {"positive": [...], "negative": [...]} -> (positive, negative) prompt lists.

    BioViL's prompts are written in MIMIC report language; a model trained on other text (another
    vocabulary, other phrasing) is fairly tested with prompts in its own training language."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read prompts ({e})") from None
    out = []
    for k in ("positive", "negative"):
        v = d.get(k) if isinstance(d, dict) else None
        if not isinstance(v, list) or not v or not all(isinstance(x, str) and x.strip() for x in v):
            raise ValueError(f"{path}: field {k!r} must be a non-empty list of non-empty strings")
        out.append(list(v))
    return out[0], out[1]


def official_split(labels_csv):
    """Returns {"train", "valid", "test"} -> DataFrame(patientId, Target), as the official preprocessing."""
    try:
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover
        raise ImportError("the RSNA split needs scikit-learn: pip install scikit-learn") from e
    df = common.read_csv_checked(labels_csv, ["patientId", "Target"], dtype={"patientId": str})
    bad = ~df["Target"].isin([0, 1])
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise ValueError(f"{labels_csv}: column 'Target' row {i + 2} has {df['Target'].iloc[i]!r}; expected 0/1")
    per_patient = df.groupby("patientId")["Target"].max().reset_index()  # sorted by patientId
    train, test_val = train_test_split(per_patient, test_size=0.30, random_state=0)
    test, valid = train_test_split(test_val, test_size=0.5, random_state=0)
    return {"train": train, "valid": valid, "test": test}


def image_path(image_dir: str, patient_id: str) -> str:
    p = os.path.join(image_dir, patient_id + ".dcm")
    if os.path.isfile(p):
        return p
    # converted copies of the Kaggle set, or a DICOM saved without its extension (the reader knows it by its marker)
    for ext in (".png", ".jpg", ""):
        if os.path.isfile(os.path.join(image_dir, patient_id + ext)):
            return os.path.join(image_dir, patient_id + ext)
    return p  # read_image raises with this name


def _cleaner(official_join: bool):
    return lambda p: clean_report(p, joiner="" if official_join else " ")[0]


def classifier(model, tokenizer, positive, negative, official_join: bool = False) -> torch.Tensor:
    """(E, 2) zero-shot classifier [pneumonia, no pneumonia]: BioViL's rule, each class the normalised mean
    of its cleaned prompts' *unnormalised* embeddings (``medst_fast.build_zero_shot_classifier``)."""
    return build_zero_shot_classifier(model, tokenizer, {"pneumonia": list(positive), "no pneumonia": list(negative)},
                                      normalize_prompts=False, preprocess=_cleaner(official_join),
                                      name="rsna_zeroshot")


def class_embedding(model, tokenizer, prompts, official_join: bool = False) -> torch.Tensor:
    """One class's (E,) text embedding under the same rule."""
    return build_zero_shot_classifier(model, tokenizer, {"class": list(prompts)}, normalize_prompts=False,
                                      preprocess=_cleaner(official_join), name="rsna_zeroshot")[:, 0]


def score(y, pos: np.ndarray, neg: np.ndarray, meta=None, subset: str = "test") -> TaskResult:
    # pos > neg is False for NaN, so NaN scores would silently predict "no pneumonia" for every image
    require_finite(pos, "positive-prompt similarities", "rsna_zeroshot")
    require_finite(neg, "negative-prompt similarities", "rsna_zeroshot")
    pred = (pos > neg).astype(np.int64)
    res = TaskResult("rsna_zeroshot", meta=dict(meta or {}))
    n = len(y)
    acc, base = accuracy(y, pred), majority_fraction(y)
    res.add(subset, "accuracy", acc, n=n, chance=base, stats=accuracy_stats(acc, n, base))
    res.add(subset, "f1", f1_binary(y, pred), n=n, chance=f1_chance(y), note="chance: every image called positive")
    a = auroc(y, pos - neg)
    res.add(subset, "auroc", a, n=n, note="score-based: pos - neg similarity", chance=0.5, stats=auroc_stats(a, y))
    # the hard AUROC is the same predictions as the accuracy: an interval, but no second test of them
    hard = auroc(y, pred)
    res.add(subset, "auroc_hard_official", hard, n=n, chance=0.5,
            stats={k: v for k, v in auroc_stats(hard, y).items() if k != "p"},
            note="official: AUROC of hard predictions (= balanced accuracy)")
    return res


def evaluate(model, tokenizer, data, split: str = "test", images: Optional[str] = None,
             official_join: bool = False, batch_size: int = 64, workers: int = 0,
             max_images: Optional[int] = None, prompts: Optional[Tuple[Sequence[str], Sequence[str]]] = None
             ) -> TaskResult:
    """``prompts``: (positive, negative) lists replacing BioViL's (see ``read_prompts``)."""
    labels_csv = common.find_file(data, [LABELS_CSV], "RSNA stage_2_train_labels.csv")
    image_dir = images or os.path.join(os.path.dirname(labels_csv), IMAGE_DIR)
    splits = official_split(labels_csv)
    if split == "all":
        import pandas as pd

        df = pd.concat(list(splits.values()))
    elif split in splits:
        df = splits[split]
    else:
        raise ValueError(f"unknown RSNA split {split!r}; use train, valid, test or all")
    if max_images:
        df = df.iloc[:max_images]
    y = df["Target"].to_numpy().astype(np.int64)
    if len(np.unique(y)) < 2:
        raise ValueError(f"{labels_csv}: the {split} split has only one class; cannot score")
    paths = [image_path(image_dir, p) for p in df["patientId"]]
    kept, img, skipped = common.embed_images_kept(model, paths, batch_size=batch_size, workers=workers,
                                                  desc=f"RSNA {split}")
    y, patients = y[kept], [df["patientId"].iloc[i] for i in kept]  # an unreadable image: a counted skip
    if skipped and len(np.unique(y)) < 2:
        raise ValueError(f"{labels_csv}: after skipping {len(skipped)} unreadable images the {split} split has "
                         "only one class; cannot score")
    require_finite(img.numpy(), f"image embeddings ({split} split)", "rsna_zeroshot",
                   names=[f"patientId {p}" for p in patients])
    pos_p, neg_p = prompts if prompts is not None else (POSITIVE_PROMPTS, NEGATIVE_PROMPTS)
    clf = classifier(model, tokenizer, pos_p, neg_p, official_join)
    logits = zero_shot_logits(model, clf, img, logit_scale=1.0).cpu()  # cosines: the protocol compares them
    pos, neg = logits[:, 0].numpy(), logits[:, 1].numpy()
    res = score(y, pos, neg, subset=split,
                meta={"labels": labels_csv, "split": split, "images": len(y), "positives": int(y.sum()),
                      "prompts": "BioViL" if prompts is None else "custom"})
    common.report_skipped(res, [(paths[i], why) for i, why in skipped], "rsna_zeroshot")
    return res
