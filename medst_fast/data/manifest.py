"""Generic CSV manifest -> series index (docs/interfaces.md ``manifest.py``).

A manifest has one row per image with: patient, study time or order, view, image path, report text (and an
optional split). Any dataset (CheXpert Plus, PadChest, a PACS export, ../shared/data/covid-cxr) can then be
used without code. Column names are auto-detected from common spellings or given with ``columns=``:

    roles: patient, time, view, image, text, split
    e.g. columns={"patient": "patient_id", "time": "offset_days", "view": "view_kind", "image": "file",
                  "text": "clinical_notes"}

Images of one patient with the same time form one study. The view is mapped to frontal (PA, AP, AP Supine,
"frontal", ...) or lateral (L, LL, LATERAL, "lateral"); anything else is skipped and counted (``unknown_view``;
a study left without a frontal is counted once more as ``no_frontal``).

Times. The time column holds either numbers (offsets in days, as ``offset`` / ``offset_days`` of the COVID-19
image collection, or orders) or full calendar dates (``2020-03-14``, ``2020-03-14 10:05``, ``20200314``,
``Mar 14, 2020``, ``14 March 2020``); a column whose name contains "date" must hold dates. A value that is
neither of the column's kind nor blank, such as "2015" or "2020-03" in a date column or "Mar 14, 2020" among
offsets, is an error naming the file, the column and the data line (it would otherwise merge or split studies
silently). Blank values and unknown markers ("?", "unknown", "n/a", ...) mean untimed (counted as
``unknown_times`` in meta.json counts): such a study cannot be placed in time, so it becomes a series of its
own (it still trains the image-text losses, never the temporal one).

Every image the index keeps has been decoded (``cache.check_or_cache``); a cache (``cache_size``) keeps each
source's relative path and extension (``x.png`` -> ``x.png.jpg``), so two sources never share a cache file,
and DICOM sources are cached like the others. No kept study is an error and writes no index.
"""
from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import re
from collections import Counter, OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

from ..text import clean_report
from .cache import cache_name, open_cache, run_jobs
from .index import (DEFAULT_SERIES_LEN, REPORT_MAX_CHARS, SPLITS, SeriesIndex, Study, bound_report, cut_series,
                    report_bound_lines)

log = logging.getLogger("medst_fast")

_CANDIDATES = {
    "patient": ("patient_id", "patient", "subject_id", "patientid", "PatientID"),
    "time": ("offset_days", "offset", "study_datetime", "study_time", "time", "date", "order", "StudyDate", "study_order"),
    "view": ("view_kind", "view", "ViewPosition", "view_position", "projection"),
    "image": ("file", "path", "image", "image_path", "filename", "Path"),
    "text": ("report", "text", "clinical_notes", "findings", "notes", "report_text"),
    "split": ("split",),
}
_FRONTAL = {"frontal", "pa", "ap", "ap supine", "ap erect", "ap semi erect", "postero-anterior", "antero-posterior"}
_LATERAL = {"lateral", "l", "ll", "rl", "lateral left", "left lateral", "latéral"}
_SPLIT_NAMES = {"train": "train", "valid": "valid", "validate": "valid", "val": "valid", "test": "test"}


def view_kind(v) -> Optional[str]:
    """'frontal', 'lateral' or None for a view label."""
    if not isinstance(v, str):
        return None
    v = " ".join(v.strip().lower().replace("_", " ").split())
    if v in _FRONTAL or v.startswith(("pa ", "ap ")):
        return "frontal"
    if v in _LATERAL:
        return "lateral"
    return None


def _resolve_columns(cols: List[str], given: Optional[Dict[str, str]], path: str) -> Dict[str, Optional[str]]:
    given = dict(given or {})
    unknown = set(given) - set(_CANDIDATES)
    if unknown:
        raise ValueError(f"columns=: unknown role(s) {sorted(unknown)}; roles are {sorted(_CANDIDATES)}")
    out = {}
    for role, cands in _CANDIDATES.items():
        if role in given:
            if given[role] not in cols:
                raise ValueError(f"{path}: column {given[role]!r} (role {role!r}) not found; columns are {cols}")
            out[role] = given[role]
        else:
            out[role] = next((c for c in cands if c in cols), None)
    for role in ("patient", "view", "image", "text"):
        if out[role] is None:
            raise ValueError(f"{path}: no column for {role!r} (tried {list(_CANDIDATES[role])}); pass columns={{{role!r}: ...}}")
    return out


def index_from_manifest(csv_path, out, image_root: Optional[str] = None, cache_size: Optional[int] = None,
                        workers: Optional[int] = 0, columns: Optional[Dict[str, str]] = None, mode: str = "study",
                        split: str = "train", progress: bool = False) -> SeriesIndex:
    """Build the index format of prepare.py from a manifest CSV.

    Args:
        image_root: image paths in the CSV are relative to it (default: the CSV's folder).
        cache_size: write a resized JPEG cache (longer side) and point the index at it; None = no cache.
        mode: "study" (the first frontal of a study, PA before AP, then file order) or "official_rows"
            (one row per frontal image).
        split: the split of every row when the CSV has no split column.
    """
    import pandas as pd

    csv_path = os.path.abspath(os.fspath(csv_path))
    out = os.path.abspath(os.fspath(out))
    image_root = os.path.abspath(image_root or os.path.dirname(csv_path))
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if mode not in ("study", "official_rows"):
        raise ValueError(f"mode must be 'study' or 'official_rows', got {mode!r}")
    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False, na_values=[""])
    except Exception as e:
        raise ValueError(f"{csv_path}: cannot be read as CSV ({type(e).__name__}: {e})") from None
    col = _resolve_columns(list(df.columns), columns, csv_path)
    skipped: Counter = Counter()

    times, n_unknown = parse_times(list(df[col["time"]]) if col["time"] else [None] * len(df), csv_path, col["time"])

    studies: "OrderedDict[tuple, dict]" = OrderedDict()
    for pos in range(len(df)):
        rec = df.iloc[pos]
        patient, img, kind = rec[col["patient"]], rec[col["image"]], view_kind(rec[col["view"]])
        if not isinstance(patient, str) or not patient.strip():
            raise ValueError(f"{csv_path}: field {col['patient']!r} is empty on data line {pos + 1}")
        if not isinstance(img, str) or not img.strip():
            raise ValueError(f"{csv_path}: field {col['image']!r} is empty on data line {pos + 1}")
        t = times[pos]
        spl = split
        if col["split"]:
            raw = rec[col["split"]]
            if raw not in _SPLIT_NAMES:
                raise ValueError(f"{csv_path}: field {col['split']!r} on data line {pos + 1} is {raw!r}, expected train/valid/test")
            spl = _SPLIT_NAMES[raw]
        if kind is None:
            skipped["unknown_view"] += 1
            if t is None:
                continue  # an untimed image is a study of its own: nothing is left of it
        # blank time: one study per image group is impossible to place; key by position so it stands alone
        key = (spl, patient.strip(), t if t is not None else ("untimed", pos))
        st = studies.setdefault(key, {"frontal": [], "lateral": [], "text": None, "pos": pos, "time": t})
        if kind is None:
            continue  # the study exists (and is counted if it ends up without a frontal)
        raw_view = rec[col["view"]] if isinstance(rec[col["view"]], str) else ""
        if kind == "frontal":
            st["frontal"].append((0 if raw_view.strip().upper() == "PA" else 1, pos, img.strip()))
        else:
            st["lateral"].append((pos, img.strip()))
        text = rec[col["text"]]
        if st["text"] is None and isinstance(text, str) and text.strip():
            st["text"] = text

    # untimed lateral-only "studies" keyed by position never meet their frontal: merge a patient's untimed
    # images that share nothing else only when the patient has exactly one untimed frontal group.
    _merge_untimed(studies)

    keep = []
    for key, st in studies.items():
        if not st["frontal"]:
            skipped["no_frontal"] += 1
            continue
        if st["text"] is None:
            skipped["missing_report"] += 1
            continue
        text, n_tok = clean_report(st["text"])
        if n_tok < 3:
            skipped["short_report"] += 1
            continue
        text, n_tok, st["truncated"] = bound_report(text, n_tok)
        st["frontal"].sort()
        keep.append((key, st, text, n_tok))

    cache_root = os.path.join(out, f"images_{int(cache_size)}") if cache_size else None

    def job(rel):
        src = rel if os.path.isabs(rel) else os.path.join(image_root, rel)
        dst = os.path.join(cache_root, cache_name(rel, image_root)) if cache_root else None
        return (src, dst, int(cache_size or 0), True)

    if cache_root:
        open_cache(cache_root, int(cache_size), True)
    paths = sorted({p for _, st, _, _ in keep for p in [f[2] for f in st["frontal"]] + [l[1] for l in st["lateral"]]})
    res = dict(zip(paths, run_jobs([job(p) for p in paths], workers or 0, progress, "manifest images")))
    for r in res.values():
        if r:
            skipped[r] += 1

    root = cache_root or image_root
    rel_out = (lambda p: cache_name(p, image_root)) if cache_root else (lambda p: p)
    rows = []
    truncated = 0  # kept studies whose report was cut to REPORT_MAX_CHARS
    for key, st, text, n_tok in keep:
        fronts = [f for f in st["frontal"] if res[f[2]] is None]
        if not fronts:
            skipped["no_readable_frontal"] += 1
            continue
        truncated += st["truncated"]
        lat = next((p for _, p in st["lateral"] if res[p] is None), "")
        chosen = fronts[:1] if mode == "study" else sorted(fronts, key=lambda f: f[1])
        for f in chosen:
            rows.append((key, st, f[2], lat, text, n_tok))
    if not rows:
        raise ValueError(f"{csv_path}: no study kept (skipped: {dict(sorted(skipped.items()))}); no index written to {out}")
    untimed_last = lambda k: (0, k[2], "") if not isinstance(k[2], tuple) else (1, 0, str(k[2][1]).zfill(12))  # noqa: E731
    rows.sort(key=lambda r: (r[0][0], r[0][1], untimed_last(r[0]), r[1]["pos"]))

    studies_out, per = [], OrderedDict()
    for key, st, front, lat, text, n_tok in rows:
        spl, patient, t = key
        untimed = isinstance(t, tuple)
        when = "" if untimed else _time_text(t)
        group = per.setdefault((spl, patient, t if untimed else "timed"), [])
        r = len(studies_out)
        studies_out.append(Study(
            row=r, subject_id=patient, study_id=f"{patient}/{'untimed-%d' % st['pos'] if untimed else when}", split=spl,
            order=len(group), study_datetime=when, frontal_path=rel_out(front),
            lateral_path=rel_out(lat) if lat else "", frontal_dicom=os.path.splitext(os.path.basename(front))[0],
            lateral_dicom=os.path.splitext(os.path.basename(lat))[0] if lat else "", text=text, n_tokens=n_tok))
        group.append(r)
    series = {s: [] for s in SPLITS}
    for (spl, _, _), members in per.items():
        series[spl].extend(cut_series(members, DEFAULT_SERIES_LEN))
    meta = {"image_root": root, "source": f"manifest:{csv_path}", "mode": mode, "columns": col,
            "cache_size": int(cache_size or 0), "skipped": dict(sorted(skipped.items())), "version": 1,
            "series_len": DEFAULT_SERIES_LEN,
            "counts": {"rows": len(studies_out), "unknown_times": n_unknown,
                       "untimed_studies": sum(1 for k in per if isinstance(k[2], tuple)),
                       **{f"series_{s}": len(series[s]) for s in SPLITS}, "truncated_reports": truncated},
            "report_max_chars": REPORT_MAX_CHARS}
    idx = SeriesIndex(studies_out, series, meta).save(out)
    log.info("manifest %s: %d rows, %d train series; skipped %s", csv_path, len(studies_out),
             len(series["train"]), dict(skipped) or "nothing")
    for line in report_bound_lines(meta):
        log.info(line)
    return idx


# ------------------------------------------------------------------------------------------------- times
_UNKNOWN_TIMES = {"?", "??", "-", "unknown", "n/a", "na", "nan", "none", "null"}
_DATE_FORMATS = ("%b %d, %Y", "%B %d, %Y", "%b %d %Y", "%B %d %Y", "%d %b %Y", "%d %B %Y", "%Y/%m/%d",
                 "%b. %d, %Y")
_YYYYMMDD = re.compile(r"^(\d{8})(\.0*)?$")


def full_date(text: str) -> Optional[_dt.datetime]:
    """A full calendar date (optionally with a time) -> naive datetime; None for anything less or else.

    "2015" (a year), "2020-03" (a month) and "03/14/2020" (day/month order unknown) are not full dates."""
    t = " ".join(text.strip().split())
    m = _YYYYMMDD.match(t)
    if m:
        t = m.group(1)
    elif re.fullmatch(r"[+-]?\d+(\.\d*)?", t):
        return None  # a bare number other than YYYYMMDD (a year, an offset) is not a date
    try:
        d = _dt.datetime.fromisoformat(t)
        if not re.match(r"^\d{8}$|^\d{4}-\d{2}-\d{2}", t):
            return None  # ISO week or ordinal forms are not how a study date is written
        if d.tzinfo is not None:
            d = d.astimezone(_dt.timezone.utc).replace(tzinfo=None)
        return d
    except ValueError:
        pass
    for fmt in _DATE_FORMATS:
        try:
            return _dt.datetime.strptime(t, fmt)
        except ValueError:
            continue
    return None


def _number(text: str) -> Optional[float]:
    try:
        x = float(text)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def parse_times(values: Sequence, path: str, column: Optional[str]) -> Tuple[List, int]:
    """Parse a time column: numbers or full dates, the column's kind decided as the module docstring says.

    Returns (per-row float / datetime / None (untimed), number of unknown markers). Raises ValueError naming
    ``path``, ``column`` and the data line of the first value that is neither blank nor of the column's kind.
    """
    texts = [v.strip() if isinstance(v, str) else "" for v in values]
    unknown = sum(1 for t in texts if t.lower() in _UNKNOWN_TIMES)
    filled = [(i, t) for i, t in enumerate(texts) if t and t.lower() not in _UNKNOWN_TIMES]
    out: List = [None] * len(texts)
    if not filled:
        return out, unknown
    nums = {i: _number(t) for i, t in filled}
    dates = {i: full_date(t) for i, t in filled}
    n_num = sum(v is not None for v in nums.values())
    n_date = sum(v is not None for v in dates.values())
    if "date" in (column or "").lower():
        kind = "date"  # a date column: years or months alone would merge a patient's studies into one
    elif n_num == len(filled):
        kind = "number"
    elif n_date == len(filled):
        kind = "date"
    else:
        kind = "number" if n_num >= n_date else "date"
    parsed = nums if kind == "number" else dates
    for i, t in filled:
        if parsed[i] is None:
            want = "a number like the other values" if kind == "number" else \
                "a full date (YYYY-MM-DD [HH:MM[:SS]], YYYYMMDD, 'Mar 14, 2020' or '14 March 2020')"
            raise ValueError(f"{path}: column {column!r} on data line {i + 1} is {t!r}, not {want}; fix the value, "
                             f"leave it blank (untimed) or choose the time column with columns={{'time': ...}}")
        out[i] = parsed[i]
    return out, unknown


def _time_text(t) -> str:
    return t.isoformat() if isinstance(t, _dt.datetime) else str(t)


def _merge_untimed(studies: "OrderedDict[tuple, dict]") -> None:
    """A patient's untimed images are one study when that is unambiguous (at most one frontal among them,
    e.g. a PA + L pair with a blank date); otherwise each untimed image stays alone."""
    groups: Dict[tuple, List[tuple]] = OrderedDict()
    for key in list(studies):
        if isinstance(key[2], tuple):
            groups.setdefault(key[:2], []).append(key)
    for (spl, patient), keys in groups.items():
        if len(keys) < 2:
            continue
        n_front = sum(len(studies[k]["frontal"]) for k in keys)
        if n_front > 1:
            continue
        first = studies[keys[0]]
        for k in keys[1:]:
            other = studies.pop(k)
            first["frontal"] += other["frontal"]
            first["lateral"] += other["lateral"]
            if first["text"] is None:
                first["text"] = other["text"]


class ManifestDataset:
    """A ``SeriesDataset`` over a manifest CSV: builds (or reuses) the index in ``out`` first.

    ``ManifestDataset(csv, out, split, tokenizer, img_size, train, **index_kwargs)`` returns a SeriesDataset.
    """

    def __new__(cls, csv_path, out, split: str = "train", tokenizer=None, img_size: int = 224, train: bool = True,
                rebuild: bool = False, **index_kwargs):
        from .dataset import SeriesDataset

        if rebuild or not os.path.isfile(os.path.join(os.fspath(out), "meta.json")):
            index_from_manifest(csv_path, out, split=split if split in SPLITS else "train", **index_kwargs)
        return SeriesDataset(out, split, tokenizer=tokenizer, img_size=img_size, train=train)
