"""A small prepared index (docs/interfaces.md format) over the real covid-cxr images, for loader tests.

Studies are (patient, day) groups of the manifest with a frontal view; the first lateral of the same group is
the study's lateral. Series are per patient in day order, cut into chunks of 4.
"""
import csv
import os
from collections import defaultdict

from medst_fast.data.index import SeriesIndex, Study


def build_index(covid_dir, out_dir, max_studies=40, split="test", extra=()):
    """Write the index to out_dir; ``extra`` = [(frontal_abs_path, lateral_abs_path_or_"")] appended as one
    more series (used for corrupt files). Returns the SeriesIndex."""
    groups = defaultdict(lambda: {"frontal": [], "lateral": []})
    with open(os.path.join(covid_dir, "manifest.csv"), newline="") as f:
        for r in csv.DictReader(f):
            if r["view_kind"] in ("frontal", "lateral"):
                day = float(r["offset_days"]) if r["offset_days"] else 0.0
                groups[(r["patient_id"], day)][r["view_kind"]].append(os.path.join(covid_dir, r["file"]))
    per_patient = defaultdict(list)
    for (pid, day), g in sorted(groups.items()):
        if g["frontal"]:
            per_patient[pid].append((day, g["frontal"][0], g["lateral"][0] if g["lateral"] else ""))
    # patients with many studies and with laterals first, so a small index has full series and laterals
    pids = sorted(per_patient, key=lambda p: (-len(per_patient[p]), -sum(bool(x[2]) for x in per_patient[p]), p))
    studies, series = [], []
    for pid in pids:
        chunk = []
        for k, (day, fr, la) in enumerate(per_patient[pid]):
            if len(studies) >= max_studies:
                break
            studies.append(Study(row=len(studies), subject_id=str(pid), study_id=f"p{pid}_d{day:g}", split=split,
                                 order=k, study_datetime="", frontal_path=fr, lateral_path=la, frontal_dicom="",
                                 lateral_dicom="", text=f"study {len(studies)} of patient {pid}: lungs", n_tokens=0))
            chunk.append(len(studies) - 1)
            if len(chunk) == 4:
                series.append(chunk)
                chunk = []
        if chunk:
            series.append(chunk)
    if extra:
        chunk = []
        for fr, la in extra:
            studies.append(Study(row=len(studies), subject_id="x", study_id=f"x{len(studies)}", split=split, order=0,
                                 study_datetime="", frontal_path=fr, lateral_path=la, frontal_dicom="",
                                 lateral_dicom="", text="extra study", n_tokens=0))
            chunk.append(len(studies) - 1)
        series.append(chunk)
    return SeriesIndex(studies, {split: series}, {"image_root": covid_dir, "source": "covid-cxr test",
                                                   "mode": "study"}).save(out_dir)
