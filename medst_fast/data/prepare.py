"""Offline index builder for MIMIC-CXR-JPG 2.0.0 (+ MIMIC-CXR reports), docs/method.md §4.1-4.4.

    python -m medst_fast.data.prepare mimic --jpg-root DIR --reports DIR|ZIP|CSV --out OUT \
        [--cache-size 256] [--workers N] [--official-rows] [--no-draft]
    python -m medst_fast.data.prepare manifest --csv manifest.csv --out OUT [--image-root DIR] [...]

Modes:
- "study" (default): one row per study. The frontal is the first readable PA, else AP (metadata order breaks
  ties); the lateral is the first readable LATERAL/LL in metadata order (the official merge keeps the first).
- "official_rows" (``--official-rows``): one row per frontal dicom as the official Img_Textv1.csv has it; a
  study with PA and AP gives two rows with the same report and lateral (docs/method.md §4.2).

Then each patient's rows (per split) are ordered by StudyDate, StudyTime (numerically; MIMIC writes StudyTime
as a float without leading zeros) and cut into non-overlapping series of 4, the remainder kept (docs/method.md §4.4).

Every image the index keeps has been decoded (``cache.check_or_cache``): without a cache by a cheap draft
decode, with one while writing the resized JPEG (longer side ``cache_size``, process pool, JPEG draft
decoding, DICOM sources too). A corrupt or missing frontal is replaced by the next readable one of its study.
Each cache file is written to a temp name and renamed, so a file that exists is complete: a rerun after an
interruption skips those and produces the same index. The index files are written last, and not at all
when no study is kept (an error, exit status 1).

Skips are counted in meta.json ``skipped``. Per image: ``null_view_position``, ``other_view``,
``missing_split``, ``missing_study_date`` / ``missing_study_time`` (blank or NaN), ``missing_image``,
``unreadable_image``. Per study (each study of the metadata is either kept or counted once): ``no_frontal``
(no PA/AP row), ``no_usable_frontal`` (its frontal rows were all skipped above), ``missing_report``,
``short_report``, ``no_readable_frontal``. Studies are keyed by (subject_id, study_id): a study id that two
subjects share gives two studies. A cleaned report longer than ``index.REPORT_MAX_CHARS`` characters (far
beyond the 512 tokens a text tower can take) is cut there and counted in meta.json
``counts.truncated_reports``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import os
import zipfile
from collections import Counter, OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

from ..text import clean_report, split_sections
from .cache import Interrupted, open_cache, run_jobs
from .index import (DEFAULT_SERIES_LEN, REPORT_MAX_CHARS, SPLITS, SeriesIndex, Study, bound_report, cut_series,
                    report_bound_lines)
from .manifest import index_from_manifest

log = logging.getLogger("medst_fast")

FRONTAL = ("PA", "AP")
LATERAL = ("LATERAL", "LL")
_META_FIELDS = ("dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate", "StudyTime")
_SPLIT_FIELDS = ("dicom_id", "study_id", "subject_id", "split")
_SPLIT_NAMES = {"train": "train", "validate": "valid", "valid": "valid", "val": "valid", "test": "test"}


# --------------------------------------------------------------------------------------------- table input
def find_table(root: str, stem: str) -> str:
    for name in (f"{stem}.csv.gz", f"{stem}.csv"):
        p = os.path.join(root, name)
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"{os.path.join(root, stem)}.csv(.gz) not found: is {root} the MIMIC-CXR-JPG 2.0.0 root?")


def _read_table(path: str, required: Sequence[str]):
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except Exception as e:
        raise ValueError(f"{path}: cannot be read as CSV ({type(e).__name__}: {e})") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing} (found {list(df.columns)})")
    return df


class NothingKept(ValueError):
    """Preparation kept no study; no index is written."""


def _num(v, path: str, field: str, dicom: str) -> Optional[float]:
    """A metadata number; None when blank or NaN (the caller counts the skip), an error when not a number."""
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: field {field!r} of dicom {dicom} is {v!r}, not a number") from None
    return None if math.isnan(x) else x


def study_datetime(date, time) -> str:
    """ISO text from MIMIC's StudyDate (YYYYMMDD) and StudyTime (HHMMSS.fff as a float).

    Raises ValueError when the date is not a calendar date or the time is not a time of day."""
    d, t = float(date), float(time)
    if not (math.isfinite(d) and math.isfinite(t)) or d != int(d) or not 0 <= t < 240000:
        raise ValueError(f"StudyDate {date!r} / StudyTime {time!r} is not a YYYYMMDD date and HHMMSS time")
    d = int(d)
    hh, rest = divmod(t, 10000)
    mm, ss = divmod(rest, 100)
    if mm >= 60 or ss >= 60:
        raise ValueError(f"StudyTime {time!r} is not an HHMMSS time")
    try:
        base = _dt.datetime(d // 10000, (d // 100) % 100, d % 100)
    except ValueError:
        raise ValueError(f"StudyDate {date!r} is not a YYYYMMDD calendar date") from None
    return (base + _dt.timedelta(hours=int(hh), minutes=int(mm), seconds=ss)).isoformat(timespec="milliseconds")


# ------------------------------------------------------------------------------------------------- reports
class ReportSource:
    """Reports from the MIMIC-CXR ``files/pNN/pSUBJECT/sSTUDY.txt`` tree, ``mimic-cxr-reports.zip``, or a
    sectioned CSV (``mimic_cxr_sectioned.csv``: study, impression, findings). ``get`` -> (impression, findings)
    or None when the study has no report."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self._zip = None
        self._csv = None
        if os.path.isdir(self.path):
            self.kind = "tree"
            self._base = os.path.join(self.path, "files") if os.path.isdir(os.path.join(self.path, "files")) else self.path
        elif zipfile.is_zipfile(self.path):
            self.kind = "zip"
            self._zip = zipfile.ZipFile(self.path)
            # files/pNN/pSUBJECT/sSTUDY.txt -> (SUBJECT, STUDY): a study id is not unique across subjects.
            # A flat zip (no pSUBJECT folder) is keyed (None, STUDY).
            self._names: Dict[Tuple[Optional[str], str], str] = {}
            for n in self._zip.namelist():
                if n.endswith(".txt"):
                    parent = os.path.basename(os.path.dirname(n))
                    subject = parent[1:] if parent[:1] == "p" and parent[1:].isdigit() else None
                    self._names[(subject, os.path.basename(n)[1:-4])] = n
        elif os.path.isfile(self.path) and self.path.endswith((".csv", ".csv.gz")):
            self.kind = "csv"
            df = _read_table(self.path, ("study",))
            cols = [c for c in ("impression", "findings") if c in df.columns]
            if not cols:
                raise ValueError(f"{self.path}: needs an 'impression' and/or 'findings' column")
            self._csv = {}
            for rec in df.itertuples(index=False):
                sid = str(getattr(rec, "study")).lstrip("s")
                self._csv[sid] = (_str(getattr(rec, "impression", None)), _str(getattr(rec, "findings", None)))
        else:
            raise FileNotFoundError(f"reports not found or not a folder/zip/csv: {self.path}")

    def get(self, subject: str, study: str) -> Optional[Tuple[Optional[str], Optional[str]]]:
        if self.kind == "csv":
            return self._csv.get(study)
        if self.kind == "zip":
            name = self._names.get((subject, study)) or self._names.get((None, study))
            if name is None:
                return None
            text = self._zip.read(name).decode("utf-8", errors="replace")
        else:
            p = os.path.join(self._base, f"p{subject[:2]}", f"p{subject}", f"s{study}.txt")
            try:
                with open(p, encoding="utf-8", errors="replace") as f:
                    text = f.read()
            except FileNotFoundError:
                return None
        return sections_of(text)


def _str(v) -> Optional[str]:
    return v if isinstance(v, str) and v.strip() else None


def sections_of(text: str) -> Tuple[Optional[str], Optional[str]]:
    """(impression, findings) of a free-text MIMIC report."""
    sec = split_sections(text)
    imp = sec.get("IMPRESSION") or sec.get("IMPRESSIONS") or sec.get("FINDINGS AND IMPRESSION") or sec.get("CONCLUSION")
    return _str(imp), _str(sec.get("FINDINGS"))


# ----------------------------------------------------------------------------------------------- prepare
def prepare_mimic(jpg_root, reports, out, cache_size: Optional[int] = 256, workers: Optional[int] = None,
                  mode: str = "study", draft: bool = True, progress: bool = True) -> SeriesIndex:
    """Build the series index (and optional resized image cache) for MIMIC-CXR-JPG 2.0.0.

    Args:
        jpg_root: folder holding ``files/`` and the mimic-cxr-2.0.0-{metadata,split}.csv(.gz) tables.
        reports: MIMIC-CXR reports: the ``files/`` .txt tree (or its parent), mimic-cxr-reports.zip, or a
            sectioned CSV (study, impression, findings).
        out: output folder for studies.csv, series.json, meta.json and ``images_<cache_size>/``.
        cache_size: longer side of the cached JPEGs; None or 0 = no cache (the index points at ``jpg_root``).
        workers: processes for the cache; default min(8, cpu count); 0 = in this process.
        mode: "study" (one row per study) or "official_rows" (one row per frontal dicom).
        draft: JPEG draft-mode decoding for the cache (faster; off = full decode then area resize).
    """
    if mode not in ("study", "official_rows"):
        raise ValueError(f"mode must be 'study' or 'official_rows', got {mode!r}")
    jpg_root, out = os.path.abspath(os.fspath(jpg_root)), os.path.abspath(os.fspath(out))
    workers = min(8, os.cpu_count() or 1) if workers is None else int(workers)
    meta_path, split_path = find_table(jpg_root, "mimic-cxr-2.0.0-metadata"), find_table(jpg_root, "mimic-cxr-2.0.0-split")
    meta = _read_table(meta_path, _META_FIELDS)
    split = _read_table(split_path, _SPLIT_FIELDS)
    skipped: Counter = Counter()

    split_of: Dict[str, str] = {}
    for d, s in zip(split["dicom_id"], split["split"]):
        if s not in _SPLIT_NAMES:
            raise ValueError(f"{split_path}: field 'split' of dicom {d} is {s!r}, expected train/validate/test")
        split_of[d] = _SPLIT_NAMES[s]

    studies = _group_studies(meta, meta_path, split_of, skipped)
    candidates = _with_reports(studies, ReportSource(reports), skipped)

    # -- images: check (or cache) the chosen frontal/lateral; on failure fall back to the next candidate
    image_root = os.path.join(out, f"images_{int(cache_size)}") if cache_size else jpg_root
    if cache_size:
        open_cache(image_root, int(cache_size), draft)
    status: Dict[str, Optional[str]] = {}

    def job(st, dicom):
        rel = _rel_of(st["subject"], st["study"], dicom)
        return (os.path.join(jpg_root, rel), os.path.join(image_root, rel) if cache_size else None, int(cache_size or 0), draft)

    def resolve(pick):  # pick(st) -> dicoms still needed; runs rounds until every study is settled
        while True:
            need = []
            for st, _, _ in candidates:
                for d in pick(st):
                    if d not in status:
                        need.append((st, d))
            if not need:
                return
            need = list(OrderedDict(((d, (st, d)) for st, d in need)).values())
            res = run_jobs([job(st, d) for st, d in need], workers, progress, "prepare images")
            for (st, d), r in zip(need, res):
                status[d] = r
                if r:
                    skipped[r] += 1

    def first_ok(items, dicoms_of):
        for it in items:
            d = dicoms_of(it)
            if d not in status:
                return [d]
            if status[d] is None:
                return []
        return []

    if mode == "study":
        resolve(lambda st: first_ok(st["frontal"], lambda t: t[2]) + first_ok(st["lateral"], lambda t: t[1]))
    else:
        resolve(lambda st: [t[2] for t in st["frontal"]] + first_ok(st["lateral"], lambda t: t[1]))

    rows = []  # (subject, sort key, metadata pos, split, study, frontal, lateral, text, n, datetime)
    truncated = 0  # kept studies whose report was cut to REPORT_MAX_CHARS
    for st, text, n_tok in candidates:
        ok_front = [t for t in st["frontal"] if status.get(t[2]) is None and t[2] in status]
        lat = next((d for _, d in st["lateral"] if d in status and status[d] is None), "")
        if not ok_front:
            skipped["no_readable_frontal"] += 1
            continue
        chosen = ok_front[:1] if mode == "study" else sorted(ok_front, key=lambda t: t[1])  # official: metadata order
        truncated += st["truncated"]
        for _, pos, dicom in chosen:
            rows.append((st["subject"], st["key"], pos, split_of[dicom], st["study"], dicom, lat, text, n_tok, st["datetime"]))
    rows.sort(key=lambda r: (r[0], r[1], r[2]))  # patient, StudyDate, StudyTime, metadata order (stable ties)
    if not rows:
        raise NothingKept(f"{meta_path}: no study kept (skipped: {dict(sorted(skipped.items()))}); no index written "
                          f"to {out}")

    index_studies: List[Study] = []
    series: Dict[str, List[List[int]]] = {s: [] for s in SPLITS}
    per_patient: "OrderedDict[Tuple[str, str], List[int]]" = OrderedDict()
    for subject, _, _, spl, study, dicom, lat, text, n_tok, when in rows:
        r = len(index_studies)
        members = per_patient.setdefault((spl, subject), [])
        index_studies.append(Study(
            row=r, subject_id=subject, study_id=study, split=spl, order=len(members), study_datetime=when,
            frontal_path=_rel_of(subject, study, dicom), lateral_path=_rel_of(subject, study, lat) if lat else "",
            frontal_dicom=dicom, lateral_dicom=lat, text=text, n_tokens=n_tok))
        members.append(r)
    for (spl, _), members in per_patient.items():
        series[spl].extend(cut_series(members, DEFAULT_SERIES_LEN))

    meta_out = {
        "image_root": image_root, "source": "mimic-cxr-jpg-2.0.0", "jpg_root": jpg_root,
        "reports": os.path.abspath(os.fspath(reports)), "mode": mode, "cache_size": int(cache_size or 0),
        "draft": bool(draft), "skipped": dict(sorted(skipped.items())), "version": 1, "series_len": DEFAULT_SERIES_LEN,
        "counts": {"rows": len(index_studies), **{f"series_{s}": len(series[s]) for s in SPLITS},
                   "truncated_reports": truncated},
        "report_max_chars": REPORT_MAX_CHARS,
    }
    idx = SeriesIndex(index_studies, series, meta_out).save(out)
    _print_summary(meta_out)
    return idx


def _rel_of(subject: str, study: str, dicom: str) -> str:
    return f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"


def _group_studies(meta, meta_path: str, split_of: Dict[str, str], skipped: Counter) -> "OrderedDict[tuple, dict]":
    """Metadata rows -> studies keyed (subject_id, study_id), in metadata order; image-level skips counted.

    Every study of the metadata gets a record, even one whose rows are all skipped, so that the study-level
    counts account for it."""
    studies: "OrderedDict[tuple, dict]" = OrderedDict()
    for pos, rec in enumerate(meta[list(_META_FIELDS)].itertuples(index=False, name=None)):
        dicom, subject, study, view, date, time = rec
        for field, v in (("dicom_id", dicom), ("subject_id", subject), ("study_id", study)):
            if not isinstance(v, str) or not v:
                raise ValueError(f"{meta_path}: field {field!r} is empty on data line {pos + 1}")
        st = studies.setdefault((subject, study), {"subject": subject, "study": study, "frontal": [], "lateral": [],
                                                   "pos": pos, "frontal_rows": 0, "when": None, "no_when": None})
        if st["when"] is None:  # the study's date and time: from its first row that has both
            when = _row_datetime(date, time, meta_path, dicom)
            if isinstance(when, str):
                st["no_when"] = st["no_when"] or when
            else:
                st["when"] = when
        if not isinstance(view, str) or not view.strip():
            skipped["null_view_position"] += 1
            continue
        view = view.strip().upper()
        if view in FRONTAL:
            st["frontal_rows"] += 1
            if dicom not in split_of:
                skipped["missing_split"] += 1
                continue
            st["frontal"].append((FRONTAL.index(view), pos, dicom))
        elif view in LATERAL:
            st["lateral"].append((pos, dicom))
        else:
            skipped["other_view"] += 1
    return studies


def _row_datetime(date, time, meta_path: str, dicom: str):
    """((StudyDate, StudyTime) sort key, ISO text), or the skip reason when either is blank or NaN."""
    d, t = _num(date, meta_path, "StudyDate", dicom), _num(time, meta_path, "StudyTime", dicom)
    if d is None:
        return "missing_study_date"
    if t is None:
        return "missing_study_time"
    try:
        return (d, t), study_datetime(date, time)
    except ValueError as e:
        raise ValueError(f"{meta_path}: dicom {dicom}: {e}") from None


def _with_reports(studies: "OrderedDict[tuple, dict]", src: ReportSource, skipped: Counter) -> list:
    """Studies with a frontal, a date and a usable report -> [(study, text, n_tokens)]; the others counted."""
    out = []
    for st in studies.values():
        if not st["frontal"]:
            skipped["no_usable_frontal" if st["frontal_rows"] else "no_frontal"] += 1
            continue
        if st["when"] is None:
            skipped[st["no_when"]] += 1
            continue
        st["key"], st["datetime"] = st["when"]
        rep = src.get(st["subject"], st["study"])
        if rep is None:
            skipped["missing_report"] += 1
            continue
        text, n_tok = clean_report(*rep)
        if n_tok < 3:
            skipped["short_report"] += 1
            continue
        text, n_tok, cut = bound_report(text, n_tok)
        st["truncated"] = cut
        st["frontal"].sort()  # PA before AP, then metadata order
        out.append((st, text, n_tok))
    return out


def _print_summary(meta: dict) -> None:
    sk = meta["skipped"]
    lines = [f"prepared {meta['counts']['rows']} rows ({meta['mode']}): "
             + ", ".join(f"{k}={v}" for k, v in meta["counts"].items() if k != "rows")]
    lines.append("skipped: " + (", ".join(f"{k}={v}" for k, v in sk.items()) if sk else "nothing"))
    lines += report_bound_lines(meta)
    for ln in lines:  # the CLI configures logging at INFO, so this is printed there
        log.info(ln)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m medst_fast.data.prepare", description="Build a Med-ST series index.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("mimic", help="MIMIC-CXR-JPG 2.0.0 + MIMIC-CXR reports")
    m.add_argument("--jpg-root", required=True, help="folder with files/ and mimic-cxr-2.0.0-*.csv(.gz)")
    m.add_argument("--reports", required=True, help="reports: files/ tree (or parent), mimic-cxr-reports.zip, or sectioned CSV")
    m.add_argument("--out", required=True)
    m.add_argument("--cache-size", type=int, default=256, help="longer side of the image cache; 0 = no cache")
    m.add_argument("--workers", type=int, default=None)
    m.add_argument("--official-rows", action="store_true", help="one row per frontal dicom, as the official code")
    m.add_argument("--no-draft", action="store_true", help="full JPEG decode before resizing (slower)")
    g = sub.add_parser("manifest", help="generic CSV: patient, time/order, view, image path, report")
    g.add_argument("--csv", required=True)
    g.add_argument("--out", required=True)
    g.add_argument("--image-root", default=None, help="image paths are relative to this (default: the CSV's folder)")
    g.add_argument("--cache-size", type=int, default=0)
    g.add_argument("--workers", type=int, default=None)
    g.add_argument("--columns", default=None, help='JSON mapping of roles to column names, e.g. {"patient": "pid"}')
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if a.cmd == "mimic":
            prepare_mimic(a.jpg_root, a.reports, a.out, cache_size=a.cache_size or None, workers=a.workers,
                          mode="official_rows" if a.official_rows else "study", draft=not a.no_draft)
        else:
            try:
                columns = json.loads(a.columns) if a.columns else None
            except ValueError as e:
                raise ValueError(f"--columns: not valid JSON ({e})") from None
            index_from_manifest(a.csv, a.out, image_root=a.image_root, cache_size=a.cache_size or None,
                                workers=a.workers, columns=columns)
    except Interrupted as e:  # SIGTERM/SIGHUP: the pool is already terminated; a rerun resumes the cache
        log.error("prepare: %s; no index written, a rerun resumes the cache", e)
        return 128 + e.signum
    except KeyboardInterrupt:
        log.error("prepare: interrupted; no index written, a rerun resumes the cache")
        return 130
    except (ValueError, FileNotFoundError) as e:  # bad input: the message names the file and field
        log.error("prepare: error: %s", e)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
