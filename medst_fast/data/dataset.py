"""Series-level dataset and collation (docs/interfaces.md "Data API", "Batch"; docs/method.md §4.4-4.6).

One item is one series: up to N consecutive studies of one patient in time order (N = the index's
``series_len``, 4 as prepared; ``series_len=`` re-cuts the index at load, ``SeriesIndex.with_series_len``).
A study whose frontal image is missing or unreadable is dropped with a counted warning and the series comes
back shorter; an unreadable lateral is replaced by the absent-view image (has_lateral False). Nothing raises
mid-epoch because of a bad file, and nothing is ever shifted against its neighbours.

``collate_series`` puts length-N series first (the temporal loss reads the first ``n_full_series*N`` rows as
complete series) and keeps every row's lateral, flag and text with its own frontal. The official collate
appends laterals and flags in the original batch order instead (docs/method.md §6.2.1); ``replicate_official_bug=True``
reproduces that, for parity checks only.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch.utils.data import Dataset

from .images import ImageReadError, load_gray
from .index import DEFAULT_SERIES_LEN, SPLITS, SeriesIndex
from .transforms import ImageTransform, absent_view

log = logging.getLogger("medst_fast")
SERIES_LEN = DEFAULT_SERIES_LEN  # the paper's series length, the default everywhere


class SeriesDataset(Dataset):
    """Args:
        index: a prepared index folder or a ``SeriesIndex``.
        split: "train", "valid" or "test".
        tokenizer: a ``MedSTTokenizer`` (or None to return text only; the batch then has no token fields).
        img_size: crop size S (224 for ViT-B/16).
        train: random crops when True, centre crops otherwise.
        series_len: studies per series (None: the index's own, 4 as prepared); another length re-cuts each
            patient's studies (``SeriesIndex.with_series_len``).
    Item: list of per-study dicts {row, study_id, frontal (1,S,S), lateral (1,S,S) or None, text, tokens}.
    """

    def __init__(self, index: Union[str, SeriesIndex], split: str, tokenizer=None, img_size: int = 224,
                 train: bool = True, series_len: Optional[int] = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.index = SeriesIndex.load(index)
        if series_len is not None:
            self.index = self.index.with_series_len(series_len)
        self.series_len = self.index.series_len
        self.split = split
        self.series = self.index.series[split]
        self.tokenizer = tokenizer
        self.img_size = int(img_size)
        self.train = train
        self.transform = ImageTransform(self.img_size, train=train)
        self.bad = Counter()  # per process: with DataLoader workers each worker counts its own

    def __len__(self) -> int:
        return len(self.series)

    def _load(self, rel: str) -> Optional[torch.Tensor]:
        path = self.index.path(rel)
        try:
            img = load_gray(path)
        except (ImageReadError, OSError) as e:
            self.bad["missing_image" if "not found" in str(e) else "unreadable_image"] += 1
            log.warning("skipping image (%d bad so far in this process): %s", sum(self.bad.values()), e)
            return None
        return self.transform(img)

    def __getitem__(self, i: int) -> List[Dict]:
        out = []
        for r in self.series[i]:
            s = self.index.studies[r]
            frontal = self._load(s.frontal_path)
            if frontal is None:
                self.bad["dropped_study"] += 1
                continue
            lateral = self._load(s.lateral_path) if s.lateral_path else None
            out.append({"row": s.row, "study_id": s.study_id, "frontal": frontal, "lateral": lateral, "text": s.text})
        if self.tokenizer is not None and out:
            tok = self.tokenizer([d["text"] for d in out])
            for k, d in enumerate(out):
                d["tokens"] = {name: t[k] for name, t in tok.items()}
        return out


class EmptyBatchError(ValueError):
    """Every series of a batch is empty (all its images unreadable): there is nothing to collate.

    The trainer catches it and skips the step (counted as a bad batch); other callers see a ValueError.
    """


def collate_series(items: Sequence[List[Dict]], replicate_official_bug: bool = False,
                   series_len: int = SERIES_LEN) -> Dict:
    """List of series (each a list of study dicts) -> Batch dict of docs/interfaces.md.

    Series of exactly ``series_len`` studies (the loader's N) come first: the temporal loss takes them. Empty
    series (all studies unreadable) are skipped. With ``replicate_official_bug`` the laterals and has_lateral
    flags stay in the original batch order while everything else is reordered (docs/method.md §6.2.1).
    """
    items_in = items
    items = [it for it in items if len(it) > 0]
    if not items:
        raise EmptyBatchError(f"collate_series: every series in the batch is empty (all images unreadable?): "
                              f"{len(items_in)} series")
    full = [it for it in items if len(it) == series_len]
    rest = [it for it in items if len(it) != series_len]
    ordered = full + rest
    rows = [st for it in ordered for st in it]
    S = rows[0]["frontal"].shape[-1]
    zero = absent_view(S)

    def lateral_of(st):
        return zero if st["lateral"] is None else st["lateral"]

    lat_source = [st for it in items for st in it] if replicate_official_bug else rows
    batch = {
        "frontal": torch.stack([st["frontal"] for st in rows]),
        "lateral": torch.stack([lateral_of(st) for st in lat_source]),
        "has_lateral": torch.tensor([st["lateral"] is not None for st in lat_source], dtype=torch.bool),
        "n_full_series": len(full),
        "series_index": torch.tensor([i for i, it in enumerate(ordered) for _ in it], dtype=torch.long),
        "step": torch.tensor([k for it in ordered for k in range(len(it))], dtype=torch.long),
        "study_id": [st["study_id"] for st in rows],
        "text": [st["text"] for st in rows],
    }
    if "tokens" in rows[0]:
        for name in rows[0]["tokens"]:
            batch[name] = torch.stack([st["tokens"][name] for st in rows])
    return batch


class SeriesCollate:
    """Picklable collate_fn for DataLoader: ``SeriesCollate(replicate_official_bug=..., series_len=...)``."""

    def __init__(self, replicate_official_bug: bool = False, series_len: int = SERIES_LEN):
        self.replicate_official_bug, self.series_len = replicate_official_bug, series_len

    def __call__(self, items):
        return collate_series(items, replicate_official_bug=self.replicate_official_bug, series_len=self.series_len)
