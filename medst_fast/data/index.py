"""The prepared series index: studies.csv + series.json + meta.json (docs/interfaces.md).

Written by ``python -m medst_fast.data.prepare`` (MIMIC-CXR) and ``medst_fast.data.manifest`` (generic CSV);
read by ``SeriesDataset`` and the DALI loader. Only the standard library is used here so that a loader can
read an index without pandas. Every file is written atomically (temp file + rename) so an interrupted run
never leaves a half-written index that a later run would trust.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields
from typing import Dict, Iterable, List, Optional, Union

from ..files import atomic_write, file_digest

INDEX_VERSION = 1
# The series length prepare and the manifest converter cut (meta.json "series_len"; an index without the field
# was cut by 4). One index serves any length: ``SeriesIndex.with_series_len(n)`` re-cuts it at load.
DEFAULT_SERIES_LEN = 4
SPLITS = ("train", "valid", "test")
STUDY_COLUMNS = (
    "row", "subject_id", "study_id", "split", "order", "study_datetime", "frontal_path", "lateral_path",
    "frontal_dicom", "lateral_dicom", "text", "n_tokens",
)
_INT_COLUMNS = ("row", "order", "n_tokens")
# The longest report text an index stores, in characters. The tokenizer keeps at most text.max_position
# (512) WordPiece tokens, a few thousand characters; a longer report (a pasted log, a concatenated history)
# is cut at prepare time, at a word boundary, and counted. Far below Python's csv field limit (131072), so
# every index written here reads back with the default reader settings as well.
REPORT_MAX_CHARS = 20_000


def bound_report(text: str, n_tokens: int):
    """(text, n_tokens, truncated): ``text`` cut to ``REPORT_MAX_CHARS`` at a word boundary when longer."""
    if len(text) <= REPORT_MAX_CHARS:
        return text, n_tokens, False
    cut = text[:REPORT_MAX_CHARS + 1]
    cut = cut.rsplit(" ", 1)[0] if " " in cut else cut[:REPORT_MAX_CHARS]
    return cut, len(cut.split()), True


@dataclass
class Study:
    """One row of studies.csv. ``lateral_path``/``lateral_dicom`` are "" when the study has no lateral."""

    row: int
    subject_id: str
    study_id: str
    split: str
    order: int
    study_datetime: str
    frontal_path: str
    lateral_path: str
    frontal_dicom: str
    lateral_dicom: str
    text: str
    n_tokens: int

    @property
    def has_lateral(self) -> bool:
        return bool(self.lateral_path)

    def __getitem__(self, key):  # dict-style access, so code written against "list of dicts" also works
        return getattr(self, key)


def report_bound_lines(meta: dict) -> List[str]:
    """The summary line for reports cut to the stored maximum (none when no report was)."""
    n = meta["counts"].get("truncated_reports", 0)
    if not n:
        return []
    return [f"truncated {n} report(s) to {meta.get('report_max_chars', REPORT_MAX_CHARS)} characters (the text "
            f"tower reads at most 512 tokens; counts.truncated_reports in meta.json)"]


class SeriesIndex:
    """In-memory index. ``studies[i].row == i``; ``series[split]`` lists row ids, time-ordered per series."""

    def __init__(self, studies: List[Study], series: Dict[str, List[List[int]]], meta: dict, root: Optional[str] = None):
        self.studies = list(studies)
        self.series = {s: [list(map(int, x)) for x in series.get(s, [])] for s in SPLITS}
        self.meta = dict(meta)
        self.meta.setdefault("version", INDEX_VERSION)
        self.meta.setdefault("skipped", {})
        self.root = root  # the folder the index was loaded from / saved to
        self._validate(where=root or "<memory>")

    # -- accessors ---------------------------------------------------------------------------------------
    @property
    def image_root(self) -> str:
        """Absolute image root. meta.json stores it relative to the index folder when it lies inside that
        folder (the image cache), so an index moved together with its cache still finds its images."""
        root = self.meta.get("image_root", "")
        if root and not os.path.isabs(root):
            root = os.path.normpath(os.path.join(self.root or os.getcwd(), root))
        return root

    def path(self, rel: str) -> str:
        """Absolute path of an image path stored in studies.csv (relative to ``image_root``)."""
        if not rel:
            raise ValueError("empty image path (a study without a lateral has lateral_path == '')")
        return rel if os.path.isabs(rel) else os.path.join(self.image_root, rel)

    @property
    def series_len(self) -> int:
        """The length the series were cut to (the longest a series may be)."""
        return self.meta.get("series_len", DEFAULT_SERIES_LEN)

    def with_series_len(self, length: int) -> "SeriesIndex":
        """This index with every patient's studies cut into series of ``length`` (itself when already so).

        The series of one patient (one time-ordered run of studies: see :func:`patient_runs`) are joined
        back and cut again with :func:`cut_series`, so no study is lost or repeated, time order is kept and
        a series never mixes patients."""
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"series length must be an integer >= 1, got {length!r}")
        if length == self.series_len:
            return self
        series = {split: [c for run in patient_runs(self.studies, chunks, self.series_len)
                          for c in cut_series(run, length)] for split, chunks in self.series.items()}
        meta = dict(self.meta, series_len=length)
        if isinstance(meta.get("counts"), dict):  # counts of the series as they are now
            meta["counts"] = dict(meta["counts"], **{f"series_{s}": len(series[s]) for s in SPLITS
                                                     if f"series_{s}" in meta["counts"]})
        return SeriesIndex(self.studies, series, meta, root=self.root)

    def series_studies(self, split: str, i: int) -> List[Study]:
        return [self.studies[r] for r in self.series[split][i]]

    def __len__(self) -> int:
        return len(self.studies)

    # -- validation ----------------------------------------------------------------------------------------
    def _validate(self, where: str) -> None:
        for i, s in enumerate(self.studies):
            if s.row != i:
                raise ValueError(f"{where}/studies.csv: field 'row' of line {i + 2} is {s.row}, expected {i}")
            if s.split not in SPLITS:
                raise ValueError(f"{where}/studies.csv: field 'split' of row {i} is {s.split!r}, not one of {SPLITS}")
            if not s.frontal_path:
                raise ValueError(f"{where}/studies.csv: field 'frontal_path' of row {i} is empty")
        n, L = len(self.studies), self.series_len
        if isinstance(L, bool) or not isinstance(L, int) or L < 1:
            raise ValueError(f"{where}/meta.json: field 'series_len' is {L!r}, expected an integer >= 1")
        for split, chunks in self.series.items():
            for k, chunk in enumerate(chunks):
                if not 1 <= len(chunk) <= L:
                    raise ValueError(f"{where}/series.json: series {split}[{k}] has {len(chunk)} studies (1..{L} "
                                     f"allowed: meta.json 'series_len' is {L})")
                for r in chunk:
                    if not 0 <= r < n:
                        raise ValueError(f"{where}/series.json: series {split}[{k}] refers to row {r}, "
                                         f"but studies.csv has {n} rows")
                    if self.studies[r].split != split:
                        raise ValueError(f"{where}/series.json: row {r} is listed under {split!r} but its "
                                         f"'split' field is {self.studies[r].split!r}")

    # -- io --------------------------------------------------------------------------------------------------
    def save(self, out: Union[str, os.PathLike]) -> "SeriesIndex":
        """Write the three files atomically; meta.json last so its presence marks a complete index."""
        out = os.fspath(out)
        os.makedirs(out, exist_ok=True)
        lines = _StringSink()
        w = csv.DictWriter(lines, fieldnames=STUDY_COLUMNS, lineterminator="\n")
        w.writeheader()
        for s in self.studies:
            if len(s.text) > REPORT_MAX_CHARS:  # prepare and the manifest converter bound it (bound_report)
                raise ValueError(f"{out}: study row {s.row} has a report of {len(s.text)} characters, more than "
                                 f"the {REPORT_MAX_CHARS} an index stores; cut it with bound_report first")
            w.writerow(asdict(s))
        atomic_write(os.path.join(out, "studies.csv"), lines.getvalue())
        atomic_write(os.path.join(out, "series.json"), json.dumps(self.series, separators=(",", ":")) + "\n")
        meta = dict(self.meta)
        if meta.get("image_root"):
            meta["image_root"] = portable_root(self.image_root, out)
        atomic_write(os.path.join(out, "meta.json"), json.dumps(meta, indent=1, sort_keys=True) + "\n")
        self.root = out
        self.meta = meta
        return self

    @classmethod
    def load(cls, out: Union[str, os.PathLike, "SeriesIndex"]) -> "SeriesIndex":
        if isinstance(out, SeriesIndex):
            return out
        out = os.fspath(out)
        for name in ("studies.csv", "series.json", "meta.json"):
            if not os.path.isfile(os.path.join(out, name)):
                raise FileNotFoundError(f"{os.path.join(out, name)}: missing; is {out} a prepared index folder?")
        meta = _read_json(os.path.join(out, "meta.json"), dict, "an object")
        if meta.get("version") != INDEX_VERSION:
            raise ValueError(f"{out}/meta.json: field 'version' is {meta.get('version')!r}, expected {INDEX_VERSION}")
        series = _read_json(os.path.join(out, "series.json"), dict, "an object {split: [[row, ...], ...]}")
        for split, chunks in series.items():
            if not isinstance(chunks, list) or not all(isinstance(c, list) for c in chunks):
                raise ValueError(f"{out}/series.json: field {split!r} must be a list of row lists")
        studies = _read_studies(os.path.join(out, "studies.csv"))
        idx = cls(studies, series, meta, root=out)
        if idx.image_root and not os.path.isdir(idx.image_root):
            raise FileNotFoundError(f"{out}/meta.json: field 'image_root' is {meta.get('image_root')!r}, and "
                                    f"{idx.image_root} is not a folder; was the image folder moved or deleted?")
        return idx


def portable_root(image_root: str, index_dir: str) -> str:
    """``image_root`` as meta.json stores it: relative to the index folder when inside it, else absolute."""
    image_root, index_dir = os.path.abspath(image_root), os.path.abspath(index_dir)
    rel = os.path.relpath(image_root, index_dir)
    inside = rel != os.pardir and not rel.startswith(os.pardir + os.sep) and not os.path.isabs(rel)
    return rel if inside else image_root


def _read_json(path: str, kind: type, what: str):
    """json.load with errors that name the file (a run killed while writing by hand, a truncated copy)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path}: not valid JSON ({e}); the file is truncated or damaged, rerun prepare") from None
    if not isinstance(data, kind):
        raise ValueError(f"{path}: expected {what}, found {type(data).__name__}")
    return data


def _read_studies(path: str) -> List[Study]:
    # An index written before reports were bounded may hold a field beyond csv's default limit (131072):
    # read it anyway (the tokenizer truncates the text); the limit is restored after the read.
    old_limit = csv.field_size_limit()
    csv.field_size_limit(max(old_limit, 1 << 30))
    try:
        return list(_read_studies_rows(path))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); an index "
                         "is written as UTF-8 by prepare: rerun prepare, or re-save the file as UTF-8") from None
    except csv.Error as e:
        raise ValueError(f"{path}: not a readable CSV ({e}); the file is damaged: rerun prepare") from None
    finally:
        csv.field_size_limit(old_limit)


def _read_studies_rows(path: str) -> Iterable[Study]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in STUDY_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}")
        names = [fl.name for fl in fields(Study)]
        for line, rec in enumerate(reader, start=2):
            kw = {}
            for k in names:
                v = rec[k] if rec[k] is not None else ""
                if k in _INT_COLUMNS:
                    try:
                        v = int(v)
                    except ValueError:
                        raise ValueError(f"{path}: field {k!r} on line {line} is {v!r}, not an integer") from None
                kw[k] = v
            yield Study(**kw)


class _StringSink:
    def __init__(self):
        self._parts: List[str] = []

    def write(self, s: str) -> int:
        self._parts.append(s)
        return len(s)

    def getvalue(self) -> str:
        return "".join(self._parts)


def cut_series(rows_in_time_order: List[int], length: int = DEFAULT_SERIES_LEN) -> List[List[int]]:
    """Non-overlapping chunks of ``length``; the remainder chunk (1..length-1) is kept (docs/method.md §4.4)."""
    return [rows_in_time_order[i:i + length] for i in range(0, len(rows_in_time_order), length)]


def patient_runs(studies: List[Study], chunks: List[List[int]], length: int) -> List[List[int]]:
    """The time-ordered runs of studies that ``chunks`` were cut from with ``cut_series(run, length)``.

    prepare and the manifest converter list each run's chunks one after the other, number the studies of a
    run 0, 1, 2, ... in the ``order`` column, and only a run's last chunk is shorter than ``length``. So a
    chunk continues the one before it exactly when that one is full and ends with the same patient's study
    numbered one lower; anything else starts a new run (never a join across patients)."""
    runs: List[List[int]] = []
    prev: Optional[List[int]] = None
    for chunk in chunks:
        if prev is not None and chunk and len(prev) == length and _continues(studies[prev[-1]], studies[chunk[0]]):
            runs[-1].extend(chunk)
        else:
            runs.append(list(chunk))
        prev = chunk
    return runs


def _continues(last: Study, first: Study) -> bool:
    return first.subject_id == last.subject_id and first.order == last.order + 1


INDEX_FILES = ("studies.csv", "series.json", "meta.json")


def index_fingerprint(index_dir: str) -> str:
    """sha256 over a prepared index's files: its reports, image paths, splits and series.

    meta.json's ``image_root`` is left out: copying the images to another disk (local scratch on a cluster) and
    pointing the index at them does not change the data. Reading the files is cheap next to a training step.
    """
    h = hashlib.sha256()
    for name in INDEX_FILES:
        path = os.path.join(index_dir, name)
        h.update(name.encode() + b"\0")
        if name == "meta.json":
            with open(path, "rb") as f:
                meta = json.load(f)
            meta.pop("image_root", None)
            h.update(json.dumps(meta, sort_keys=True).encode())
        else:
            h.update(file_digest(path).encode())
    return h.hexdigest()
