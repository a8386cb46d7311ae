"""COVIDx linear probe.

``train.txt`` / ``test.txt`` lines ``patientid filename label source``; labels normal=0, pneumonia=1,
COVID-19=2. train.txt is split 80/20 (``train_test_split(train_size=0.8, random_state=0)``) into train and
valid, valid images live in ``train/``; ``data_pct`` subsamples train (``sample(frac, random_state=42)``).
Feature: the frozen 768-d final-LN CLS (``model.image_features``), computed once with the eval transform;
head ``Linear(D, 3)``, AdamW(lr 5e-4, wd 1e-6), batch 96, up to ``max_epochs`` with early stopping on the
validation loss (patience 10); the best-validation head is scored by top-1 accuracy on test.

Deviation, for speed: the official probe trains on RandomCrop(224) views; the features here are computed
once from the centre crop, so the head sees no crop augmentation.
"""
from __future__ import annotations

import copy
import logging
import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import common
from .metrics import require_finite
from .chance import accuracy_stats, majority_fraction
from .report import TaskResult

log = logging.getLogger("medst_fast")

CLASSES = {"normal": 0, "pneumonia": 1, "covid-19": 2, "covid19": 2, "covid": 2}
PCTS = (0.01, 0.1, 1.0)


def read_list(path):
    """Parse a COVIDx ``*.txt``: whitespace-separated ``patientid filename label [source]``."""
    import pandas as pd

    rows = []
    with open(path) as f:
        for ln, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 3:
                raise ValueError(f"{path}: line {ln}: expected 'patientid filename label [source]', got {line.strip()!r}")
            label = parts[2].lower()
            if label not in CLASSES:
                raise ValueError(f"{path}: line {ln}: label {parts[2]!r} is not normal/pneumonia/COVID-19 "
                                 "(a 3-class COVIDx release is needed; the binary positive/negative CXR-2 "
                                 "labels do not fit this protocol)")
            rows.append({"patientid": parts[0], "filename": parts[1], "labels": CLASSES[label]})
    if not rows:
        raise ValueError(f"{path}: no entries")
    return pd.DataFrame(rows)


def official_splits(data, data_pct: float = 1.0):
    try:
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover
        raise ImportError("the COVIDx split needs scikit-learn: pip install scikit-learn") from e
    data = os.fspath(data)
    train_all = read_list(common.find_file(data, ["train.txt"], "COVIDx train.txt"))
    test = read_list(common.find_file(data, ["test.txt"], "COVIDx test.txt"))
    train, valid = train_test_split(train_all, train_size=0.8, random_state=0)
    if data_pct != 1:
        train = train.sample(frac=data_pct, random_state=42)
    for name, df in (("train", train), ("valid", valid), ("test", test)):
        if len(df) == 0:
            raise ValueError(f"{data}: the {name} split is empty (data_pct={data_pct}); too few images")
    return {"train": train, "valid": valid, "test": test}


def train_head(xtr, ytr, xva, yva, n_classes: int = 3, lr: float = 5e-4, weight_decay: float = 1e-6,
               batch_size: int = 96, max_epochs: int = 200, patience: int = 10, seed: int = 0) -> torch.nn.Linear:
    """Linear head on fixed features with early stopping on validation loss; returns the best head."""
    _check_schedule(max_epochs, patience)
    torch.manual_seed(seed)
    device = xtr.device
    head = torch.nn.Linear(xtr.shape[1], n_classes).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    best, best_state, bad = float("inf"), copy.deepcopy(head.state_dict()), 0
    for _ in range(max_epochs):
        head.train()
        for idx in torch.randperm(len(xtr), generator=gen).split(batch_size):
            idx = idx.to(device)
            loss = F.cross_entropy(head(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        head.eval()
        with torch.no_grad():
            val = F.cross_entropy(head(xva), yva).item()  # one sync per epoch
        if val < best:
            best, best_state, bad = val, copy.deepcopy(head.state_dict()), 0
        else:
            bad += 1
            if bad >= patience:
                break
    head.load_state_dict(best_state)
    return head.eval()


def _check_schedule(max_epochs: int, patience: int) -> None:
    # With no epoch the "best" head is the random initialisation, and its test accuracy would be reported
    # as a probe result.
    if int(max_epochs) < 1:
        raise ValueError(f"covidx_probe: max_epochs must be >= 1 (got {max_epochs}); with 0 epochs the head "
                         "is never trained and its accuracy means nothing")
    if int(patience) < 1:
        raise ValueError(f"covidx_probe: patience must be >= 1 epoch (got {patience})")


def evaluate(model, data, pcts: Sequence[float] = PCTS, max_epochs: int = 200, patience: int = 10,
             batch_size: int = 64, workers: int = 0, seed: int = 0) -> TaskResult:
    _check_schedule(max_epochs, patience)  # before minutes of feature extraction
    data = os.fspath(data)
    full = official_splits(data, 1.0)
    folder = {"train": "train", "valid": "train", "test": "test"}
    paths = {s: [os.path.join(data, folder[s], f) for f in full[s]["filename"]] for s in full}
    all_paths = paths["train"] + paths["valid"] + paths["test"]
    # Frozen backbone: features once, for every image any data_pct can use.
    feats, unreadable = common.unique_embeddings(model, all_paths, fn=lambda m, x: m.image_features(x),
                                                 batch_size=batch_size, workers=workers, desc="COVIDx images")
    readable = [p for p in all_paths if p in feats]
    require_finite(np.stack([feats[p] for p in readable]), "image features (final-LN CLS)", "covidx_probe",
                   names=readable)
    device = next(model.parameters()).device

    def kept_rows(df, split):  # an unreadable image leaves the probe's data: a counted skip
        ok = [os.path.join(data, folder[split], f) in feats for f in df["filename"]]
        return df[ok]

    def tensors(df, split):
        df = kept_rows(df, split)
        if not len(df):
            raise ValueError(f"{data}: every image of the {split} split is unreadable")
        files = [os.path.join(data, folder[split], f) for f in df["filename"]]
        x = torch.from_numpy(np.stack([feats[p] for p in files])).to(device)
        return x, torch.as_tensor(df["labels"].to_numpy().copy(), dtype=torch.long, device=device)

    xva, yva = tensors(full["valid"], "valid")
    xte, yte = tensors(full["test"], "test")
    res = TaskResult("covidx_probe", meta={"data": data, "train": len(kept_rows(full["train"], "train")),
                                           "valid": len(yva), "test": len(yte),
                                           "feature": "final-LN CLS, centre crop",
                                           "max_epochs": max_epochs, "patience": patience})
    common.report_skipped(res, unreadable, "covidx_probe")
    skipped = {}
    for pct in pcts:
        n_train = len(full["train"].sample(frac=pct, random_state=42)) if pct != 1 else len(full["train"])
        if n_train == 0:  # a small set: reported as skipped, the other fractions still run
            skipped[f"{pct * 100:g}%"] = f"{pct:g} of {len(full['train'])} training images is none"
            continue
        tr = kept_rows(official_splits(data, pct)["train"], "train")
        if not len(tr):
            skipped[f"{pct * 100:g}%"] = "every training image of this fraction is unreadable"
            continue
        xtr, ytr = tensors(tr, "train")
        head = train_head(xtr, ytr, xva, yva, max_epochs=max_epochs, patience=patience, seed=seed)
        with torch.no_grad():
            acc = (head(xte).argmax(-1) == yte).float().mean().item()
        base = majority_fraction(yte.cpu().numpy())
        res.add(f"{pct * 100:g}%", "accuracy", acc, n=len(yte), note=f"{len(tr)} training images", chance=base,
                stats=accuracy_stats(acc, len(yte), base))
    if skipped:
        res.meta["skipped"] = skipped
        for k, why in skipped.items():
            log.warning("covidx_probe: skipped %s: %s", k, why)
    if not res.rows:
        raise ValueError(f"{data}: every training fraction {list(pcts)} leaves no training image; too few images")
    return res
