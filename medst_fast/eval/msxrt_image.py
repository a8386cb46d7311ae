"""MS-CXR-T temporal image classification.

Pair feature = [current || previous] normalised global embeddings (frontal, single-view path); a linear
SVC scored with StratifiedKFold (no shuffle) after ``df.sample(frac=1, random_state=seed)`` of the whole
CSV; per finding, rows with that label. Reports accuracy (the official score) and macro-accuracy
(balanced accuracy, what BioViL-T reports), each as mean and population std over the seeds.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from . import common
from .metrics import mean_std, require_finite, svc_cross_val
from .chance import accuracy_stats, majority_fraction
from .report import TaskResult

log = logging.getLogger("medst_fast")

CSV_NAME = "MS_CXR_T_temporal_image_classification_v1.0.0.csv"
FINDINGS = ("consolidation", "edema", "pleural_effusion", "pneumonia", "pneumothorax")
LABELS = {"improving": 0, "stable": 1, "worsening": 2}
SEEDS = (42, 100, 666)
FOLDS = (5, 10)
METADATA_NAMES = ("mimic-cxr-2.0.0-metadata.csv", "mimic-cxr-2.0.0-metadata.csv.gz")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".dcm")


def read_csv(path, findings: Sequence[str] = FINDINGS) -> "pd.DataFrame":
    """The image-classification CSV; only the ``findings`` asked for need their progression column."""
    cols = ["dicom_id", "previous_dicom_id", "study_id", "subject_id"] + [f"{f}_progression" for f in findings]
    df = common.read_csv_checked(path, cols, dtype={"dicom_id": str, "previous_dicom_id": str})
    for f in findings:
        col = f"{f}_progression"
        bad = df[col].notna() & ~df[col].isin(list(LABELS))
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise ValueError(f"{path}: column {col!r} row {i + 2} has {df[col].iloc[i]!r}; "
                             f"expected one of {list(LABELS)} or empty")
    for c in ("dicom_id", "previous_dicom_id"):
        if df[c].isna().any():
            raise ValueError(f"{path}: column {c!r} has empty values (row {int(np.flatnonzero(df[c].isna())[0]) + 2})")
    return df


def check_findings(findings: Sequence[str]) -> List[str]:
    bad = [f for f in findings if f not in FINDINGS]
    if bad or not findings:
        raise ValueError(f"findings {list(bad) or '[]'}: choose from {list(FINDINGS)}")
    return list(dict.fromkeys(findings))


def too_few(y: np.ndarray, k: int) -> Optional[str]:
    """Why ``k``-fold stratified SVC scoring cannot run on labels ``y``, or None when it can."""
    counts = np.unique(y, return_counts=True)[1] if len(y) else np.array([], dtype=int)
    if len(y) < k:
        return f"{len(y)} labelled pairs, fewer than the {k} CV folds"
    if len(counts) < 2:
        return f"{len(y)} labelled pairs, all of one class"
    if counts.max() < k:
        return f"no class has {k} pairs (the most frequent has {counts.max()}), so {k} stratified folds cannot be made"
    return None


class ImageResolver:
    """dicom_id -> image file under ``roots`` (tried in order), for any of the layouts in use:

    1. the official flattened copy ``files/<dicom_id>.jpg`` (or ``<dicom_id>.jpg`` at the root);
    2. the MIMIC-CXR-JPG tree ``files/pXX/pSUBJECT/sSTUDY/<dicom_id>.jpg``, via the metadata CSV
       (``metadata`` or ``mimic-cxr-2.0.0-metadata.csv[.gz]`` in a root or its parent);
    3. otherwise one walk of the tree indexing files by name.
    """

    def __init__(self, roots: Sequence[str], metadata: Optional[str] = None):
        self.roots = [os.fspath(r) for r in roots if r and os.path.isdir(r)]
        if not self.roots:
            raise FileNotFoundError(f"image root(s) not found: {list(roots)}")
        self.metadata = metadata or self._find_metadata()
        self._tree: Optional[Dict[str, str]] = None
        self._walked: Optional[Dict[str, str]] = None
        self._lateral: Optional[Dict[str, str]] = None

    def _find_metadata(self) -> Optional[str]:
        for r in self.roots:
            for d in (r, os.path.dirname(os.path.abspath(r))):
                for n in METADATA_NAMES:
                    if os.path.isfile(os.path.join(d, n)):
                        return os.path.join(d, n)
        return None

    def _tree_index(self) -> Dict[str, str]:
        if self._tree is None:
            self._tree = {}
            if self.metadata:
                md = common.read_csv_checked(self.metadata, ["dicom_id", "subject_id", "study_id"],
                                             usecols=["dicom_id", "subject_id", "study_id"], dtype=str)
                for d, subj, study in zip(md["dicom_id"], md["subject_id"], md["study_id"]):
                    self._tree[d] = os.path.join("files", f"p{subj[:2]}", f"p{subj}", f"s{study}", f"{d}.jpg")
        return self._tree

    def _walk_index(self) -> Dict[str, str]:
        if self._walked is None:
            log.info("indexing images under %s (no flattened copy or metadata CSV found)", self.roots)
            self._walked = {}
            for r in self.roots:
                for dirpath, _, files in os.walk(r):
                    for f in files:
                        stem, ext = os.path.splitext(f)
                        if ext.lower() in IMAGE_EXTS:
                            self._walked.setdefault(stem, os.path.join(dirpath, f))
        return self._walked

    def find(self, dicom_id: str) -> Optional[str]:
        for r in self.roots:
            for p in (os.path.join(r, "files", dicom_id + ".jpg"), os.path.join(r, dicom_id + ".jpg")):
                if os.path.isfile(p):
                    return p
        rel = self._tree_index().get(dicom_id)
        if rel:
            # the MIMIC tree sits beside its metadata CSV, whichever root the CSV was found from
            for r in self.roots + ([os.path.dirname(self.metadata)] if self.metadata else []):
                if os.path.isfile(os.path.join(r, rel)):
                    return os.path.join(r, rel)
        return self._walk_index().get(dicom_id)

    def lateral_of(self, dicom_id: str) -> Optional[str]:
        """The lateral (ViewPosition LATERAL, else LL) dicom_id of ``dicom_id``'s study, from the metadata CSV."""
        if self._lateral is None:
            if not self.metadata:
                raise FileNotFoundError(f"views='study' needs the MIMIC-CXR metadata CSV (ViewPosition) under "
                                        f"{self.roots} or given with --metadata")
            md = common.read_csv_checked(self.metadata, ["dicom_id", "study_id", "ViewPosition"],
                                         usecols=["dicom_id", "study_id", "ViewPosition"], dtype=str)
            lat: Dict[str, str] = {}
            for view in ("LATERAL", "LL"):  # a true lateral first, as the pre-processing pairs them
                rows = md[md["ViewPosition"] == view]
                for d, study in zip(rows["dicom_id"], rows["study_id"]):
                    lat.setdefault(study, d)
            study_of = dict(zip(md["dicom_id"], md["study_id"]))
            self._lateral = {d: lat[s] for d, s in study_of.items() if s in lat and lat[s] != d}
        return self._lateral.get(dicom_id)

    def resolve(self, dicom_ids: Sequence[str]) -> Dict[str, str]:
        out, missing = {}, []
        for d in dict.fromkeys(dicom_ids):
            p = self.find(d)
            if p is None:
                missing.append(d)
            else:
                out[d] = p
        if missing:
            raise FileNotFoundError(f"{len(missing)} image(s) not found under {self.roots} "
                                    f"(metadata: {self.metadata}); first: {missing[:5]}")
        return out


def classify(df, feats: Dict[str, np.ndarray], seeds: Sequence[int] = SEEDS, folds: Sequence[int] = FOLDS,
             findings: Sequence[str] = FINDINGS) -> Dict:
    """The protocol on precomputed features. Returns {(finding, k): {"acc": [per seed], "macro": [...]}},
    with finding "average" the mean over the scored findings per seed (as the official script averages),
    and {("skipped", k): {finding: reason}} for findings with too few labelled pairs for k folds."""
    out: Dict = {}
    for k in folds:
        out[("skipped", k)] = {}
    for seed in seeds:
        shuffled = df.sample(frac=1, random_state=seed)  # the whole CSV, then per-finding filtering
        for k in folds:
            per_seed_acc, per_seed_mac, per_seed_chance = [], [], []
            for f in findings:
                col = f"{f}_progression"
                sub = shuffled[shuffled[col].notna()]
                y = sub[col].map(LABELS).to_numpy()
                why = too_few(y, k)
                if why:
                    out[("skipped", k)][f] = why
                    continue
                X = np.concatenate([common.stack_rows(feats, list(sub["dicom_id"])),
                                    common.stack_rows(feats, list(sub["previous_dicom_id"]))], axis=1)
                accs, maccs = svc_cross_val(X, y, k)
                a, m = float(np.mean(accs)), float(np.mean(maccs))
                # chance: a constant prediction of the majority class (accuracy), 1/classes (macro accuracy)
                rec = out.setdefault((f, k), {"acc": [], "macro": [], "n": len(y), "chance_acc": majority_fraction(y),
                                              "chance_macro": 1.0 / len(np.unique(y))})
                rec["acc"].append(a)
                rec["macro"].append(m)
                per_seed_acc.append(a)
                per_seed_mac.append(m)
                per_seed_chance.append((rec["chance_acc"], rec["chance_macro"]))
            if per_seed_acc:
                rec = out.setdefault(("average", k), {"acc": [], "macro": [], "n": None,
                                                      "chance_acc": float(np.mean([c[0] for c in per_seed_chance])),
                                                      "chance_macro": float(np.mean([c[1] for c in per_seed_chance]))})
                rec["acc"].append(float(np.mean(per_seed_acc)))
                rec["macro"].append(float(np.mean(per_seed_mac)))
    if not any(("average", k) in out for k in folds):
        raise ValueError(f"no finding has enough labelled pairs for {list(folds)}-fold CV: "
                         f"{out[('skipped', folds[0])]}")
    return out


def image_features(model, resolver: ImageResolver, ids: Sequence[str], views: str = "frontal", batch_size: int = 64,
                   workers: int = 0):
    """dicom_id -> normalised global embedding, how many of them had a lateral added, and the unreadable
    inputs [(path, reason)] (their dicom_ids have no feature: a counted skip, as in training).

    ``views``: "frontal" embeds each image alone; "study" adds the lateral of its study (``lateral_of``)."""
    paths = resolver.resolve(ids)
    if views == "frontal":
        by_path, skipped = common.unique_embeddings(model, [paths[d] for d in ids], batch_size=batch_size,
                                                    workers=workers, desc="MS-CXR-T images")
        feats = {d: by_path[paths[d]] for d in ids if paths[d] in by_path}
        _check_features(feats, list(feats), "frontal")
        return feats, 0, skipped
    lats = {d: resolver.lateral_of(d) for d in ids}
    lat_paths = resolver.resolve([l for l in lats.values() if l])
    pairs = [(paths[d], lat_paths[lats[d]] if lats[d] else None) for d in ids]
    kept, emb, bad = common.embed_studies_kept(model, pairs, batch_size=batch_size, workers=workers,
                                               desc="MS-CXR-T studies")
    feats = {ids[i]: emb[j].numpy() for j, i in enumerate(kept)}
    _check_features(feats, list(feats), "study")
    return feats, sum(pairs[i][1] is not None for i in kept), [(pairs[i][0], why) for i, why in bad]


def _check_features(feats: Dict[str, np.ndarray], ids: Sequence[str], views: str) -> None:
    """A NaN embedding would reach the SVC (which raises deep inside sklearn) or a metric: refuse it here."""
    if ids:
        require_finite(np.stack([feats[d] for d in ids]), f"image embeddings (views={views})", "msxrt_image",
                       names=[f"dicom_id {d}" for d in ids])


def evaluate(model, csv_path, images: Sequence[str], metadata: Optional[str] = None,
             seeds: Sequence[int] = SEEDS, folds: Sequence[int] = FOLDS, batch_size: int = 64,
             workers: int = 0, views: str = "frontal", findings: Sequence[str] = FINDINGS) -> TaskResult:
    """``views``: "frontal" is the official protocol (each listed frontal alone); "study" adds the lateral of
    the same study (from the metadata CSV) where there is one, which is how a MoVE model sees a study.
    ``findings``: which findings to score (the CSV needs their columns only). A finding with too few
    labelled pairs for a fold count is skipped and reported (log line, ``meta["skipped"]``, note on the
    average), never a crash; the average is over the scored findings."""
    if views not in ("frontal", "study"):
        raise ValueError(f"views must be 'frontal' or 'study', got {views!r}")
    findings = check_findings(findings)
    df = read_csv(csv_path, findings)
    labelled = df[[f"{f}_progression" for f in findings]].notna().any(axis=1)
    df = df[labelled]
    if not len(df):
        raise ValueError(f"{csv_path}: no row labels any of {findings}")
    resolver = ImageResolver(images, metadata)
    n_pairs = len(df)
    ids = list(dict.fromkeys(list(df["dicom_id"]) + list(df["previous_dicom_id"])))
    feats, n_lat, unreadable = image_features(model, resolver, ids, views, batch_size, workers)
    if unreadable:  # a pair needs both images; the folds are drawn over the pairs that remain
        df = df[df["dicom_id"].isin(feats) & df["previous_dicom_id"].isin(feats)]
    scores = classify(df, feats, seeds, folds, findings)
    skipped = {f"{f} (cv{k})": why for k in folds for f, why in scores[("skipped", k)].items()}
    for what, why in skipped.items():
        log.warning("msxrt_image: skipped %s: %s", what, why)
    res = TaskResult("msxrt_image", meta={"csv": os.fspath(csv_path), "pairs": len(df), "images": len(ids),
                                          "views": views, "laterals": n_lat, "findings": findings,
                                          "seeds": list(seeds), "classifier": "SVC(kernel='linear', C=1)",
                                          **({"skipped": skipped} if skipped else {})})
    if unreadable:
        common.report_skipped(res, unreadable, "msxrt_image")
        res.meta["skipped_pairs"] = n_pairs - len(df)
    for k in folds:
        scored = [f for f in findings if (f, k) in scores]
        for f in scored + (["average"] if scored else []):
            rec = scores[(f, k)]
            for metric, key in (("accuracy", "acc"), ("macro_accuracy", "macro")):
                m, s = mean_std(rec[key])
                note = "official score" if key == "acc" else "BioViL-T metric"
                if f == "average" and len(scored) < len(findings):
                    note += f"; over {len(scored)} of {len(findings)} findings ({', '.join(scored)})"
                chance = rec[f"chance_{key}"]
                # a binomial test fits accuracy (items right of n); balanced accuracy and the average get none
                stats = accuracy_stats(m, rec["n"], chance) if key == "acc" and rec["n"] else None
                res.add(f, f"{metric}_cv{k}", m, s, rec["n"], note, chance=chance, stats=stats)
    return res


def find_csv(data) -> str:
    """``data``: the CSV itself or a folder holding it (the MS-CXR-T release folder)."""
    return common.find_file(data, [CSV_NAME], "MS-CXR-T image classification CSV")
