"""Synthetic MIMIC-CXR-JPG 2.0.0 (plus MS-CXR-T, RSNA and COVIDx-format sets) with a planted signal.

``python -m medst_fast.data.synth --out DIR --patients N --seed S [--image-size H W]``

The tree has the real layout (files/pNN/pSUBJECT/sSTUDY/DICOM.jpg, mimic-cxr-2.0.0-{metadata,split,chexpert}
.csv.gz, reports as files/pNN/pSUBJECT/sSTUDY.txt and mimic-cxr-reports.zip), so prepare.py is exercised on
exactly the inputs a user has. Each patient carries findings whose severity (0..3) evolves over the studies
(improving / stable / worsening); severity is drawn into the frontal and lateral images (differently: a small
effusion or a pneumonia shows mostly on the lateral, a pneumothorax mostly on the frontal) and written into
the reports with change words, so a model that learns anything learns something checkable.

Real-data hazards are planted at low rates and recorded in ground_truth.json: studies without a lateral,
patients with one study, studies with PA+AP frontals, images with a null ViewPosition, lateral-only studies,
missing reports and reports with no findings/impression. Study ids are not in time order and StudyTime is a
float without leading zeros (as in MIMIC), so ordering by study id or by string would be caught.

Determinism: every patient draws from its own numpy generator seeded by (seed, patient), JPEG quality is fixed,
gzip/zip headers carry no timestamps, and all iteration is sorted: same seed -> same bytes.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import logging
import os
import zipfile
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from ..files import atomic_write, lock_process

try:
    from PIL import Image, ImageFilter
except ImportError as e:  # a core install: name the extra instead of a raw ModuleNotFoundError
    raise ImportError("the synthetic data set (python -m medst_fast.pretrain's default data) needs Pillow, which "
                      "is not installed: pip install 'medst_fast[train]'") from e

log = logging.getLogger("medst_fast")

FINDINGS = ("pleural_effusion", "consolidation", "edema", "pneumothorax", "pneumonia")
CHEXPERT_COLUMNS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
)
_CHEXPERT_OF = {"pleural_effusion": "Pleural Effusion", "consolidation": "Consolidation", "edema": "Edema",
                "pneumothorax": "Pneumothorax", "pneumonia": "Pneumonia"}
METADATA_COLUMNS = (
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns",
    "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)
DEFAULT_IMAGE_SIZE = (384, 320)  # (H, W): portrait like real CXRs, small enough for 1,000 studies in seconds
JPEG_QUALITY = 90
_DRAW_MAX = 512  # anatomy is drawn at most this large, then upsampled (full-size images stay cheap to make)
_TRENDS = ("improving", "stable", "worsening")
_ADJ = {1: "small", 2: "moderate", 3: "large"}
_ADJ_DIFFUSE = {1: "mild", 2: "moderate", 3: "severe"}
_VIEW_MEANING = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral", "LL": "left lateral"}

# rates of the planted hazards (per study unless said)
P_ONE_STUDY = 0.25       # per patient
P_NO_LATERAL = 0.30
P_DUPLICATE_FRONTAL = 0.08
P_NULL_VIEW = 0.04       # an extra image whose ViewPosition is null
P_LATERAL_ONLY = 0.03
P_MISSING_REPORT = 0.02
P_EMPTY_REPORT = 0.02


# ------------------------------------------------------------------------------------------------ ids, time
def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64([seed, *keys]))


def _dicom_id(rng: np.random.Generator) -> str:
    return "-".join("%08x" % int(v) for v in rng.integers(0, 2**32, size=5, dtype=np.uint64))


def _fmt_time(seconds: float) -> str:
    """MIMIC writes StudyTime as a float HHMMSS.fff without leading zeros (e.g. 74130.0)."""
    s = int(seconds)
    hh, mm, ss = s // 3600, (s // 60) % 60, s % 60
    frac = int(round((seconds - s) * 1000))
    return f"{hh * 10000 + mm * 100 + ss}.{frac:03d}".rstrip("0").rstrip(".") + ("" if frac else ".0")


def _date_from_ordinal(day: int) -> int:
    import datetime as _dt
    d = _dt.date.fromordinal(day)
    return d.year * 10000 + d.month * 100 + d.day


# --------------------------------------------------------------------------------------------- trajectories
def _trajectory(rng: np.random.Generator, n: int, trend: str) -> List[int]:
    if trend == "worsening":
        s = int(rng.integers(0, 2))
    elif trend == "improving":
        s = int(rng.integers(2, 4))
    else:
        s = int(rng.integers(1, 4))
    out = [s]
    for _ in range(n - 1):
        u = rng.random()
        if trend == "worsening" and u < 0.75:
            s = min(3, s + 1)
        elif trend == "improving" and u < 0.75:
            s = max(0, s - 1)
        out.append(s)
    return out


def change_label(prev: int, cur: int) -> str:
    return "worsening" if cur > prev else "improving" if cur < prev else "stable"


# ----------------------------------------------------------------------------------------------- rendering
class _Anatomy:
    """Per-patient geometry, fixed over studies (with small per-study positioning jitter)."""

    def __init__(self, rng: np.random.Generator):
        self.lung_dx = rng.uniform(0.18, 0.22)
        self.lung_rx = rng.uniform(0.13, 0.16)
        self.lung_ry = rng.uniform(0.27, 0.32)
        self.lung_cy = rng.uniform(0.42, 0.47)
        self.heart_r = rng.uniform(0.11, 0.15)
        self.side = int(rng.integers(0, 2))              # 0 right lung (image left), 1 left lung
        self.focus = (rng.uniform(-0.4, 0.4), rng.uniform(0.1, 0.6))  # lesion site within the lung (x, y)
        self.depth = rng.uniform(0.35, 0.65)            # antero-posterior position of the lesion (lateral x)


def _grid(h: int, w: int):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return yy / h, xx / w


def _ellipse(yy, xx, cy, cx, ry, rx):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _blob(yy, xx, cy, cx, r):
    return np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)))


def render(view: str, sev: Dict[str, int], anat: _Anatomy, rng: np.random.Generator,
           size: Tuple[int, int]) -> np.ndarray:
    """Draw one view (frontal "PA"/"AP" or lateral "LATERAL"/"LL") with the given severities -> uint8 (H, W)."""
    H, W = size
    k = max(1.0, max(H, W) / _DRAW_MAX)
    h, w = max(8, int(round(H / k))), max(8, int(round(W / k)))
    yy, xx = _grid(h, w)
    jy, jx = rng.normal(0, 0.01, size=2)
    yy, xx = yy + jy, xx + jx
    img = np.full((h, w), 15.0, np.float32)
    img[_ellipse(yy, xx, 0.55, 0.5, 0.52, 0.47)] = 115.0
    frontal = view in ("PA", "AP")
    s = {f: int(sev.get(f, 0)) for f in FINDINGS}
    ribs = (np.sin(yy * 60.0 + 3 * xx) > 0.55).astype(np.float32) * 14.0
    if frontal:
        cx = (0.5 - anat.lung_dx, 0.5 + anat.lung_dx)
        lungs = [_ellipse(yy, xx, anat.lung_cy, c, anat.lung_ry, anat.lung_rx) for c in cx]
        lung = lungs[0] | lungs[1]
        img[lung] = 55.0
        img += ribs * lung
        img[np.abs(xx - 0.5) < 0.035] = 160.0                                    # spine / mediastinum
        img[_ellipse(yy, xx, 0.64, 0.54, anat.heart_r, anat.heart_r * 1.2)] = 170.0
        if view == "AP":                                                          # AP: magnified heart, lower contrast
            img = 0.85 * img + 20.0
        side_lung = lungs[anat.side]
        lcx, lcy = cx[anat.side], anat.lung_cy
        fx, fy = lcx + anat.focus[0] * anat.lung_rx, lcy + anat.focus[1] * anat.lung_ry
        bottom = anat.lung_cy + anat.lung_ry
        if s["pleural_effusion"]:                                                 # frontal: blunted angle, a meniscus
            level = bottom - (0.02 + 0.07 * (s["pleural_effusion"] - 1)) - 0.02 * np.abs(xx - lcx) / anat.lung_rx
            img[side_lung & (yy > level)] = 150.0
        if s["consolidation"]:
            img += 28.0 * s["consolidation"] * _blob(yy, xx, fy, fx, 0.025 + 0.015 * s["consolidation"]) * side_lung
        if s["edema"]:
            hilum = _blob(yy, xx, anat.lung_cy + 0.05, 0.5, 0.18)
            img += (10.0 * s["edema"] * hilum + 4.0 * s["edema"]) * lung
        if s["pneumothorax"]:                                                     # frontal: apical lucency + pleural line
            edge = lcx + (-1 if anat.side == 0 else 1) * anat.lung_rx * (1.0 - 0.22 * s["pneumothorax"])
            apical = side_lung & (yy < lcy) & (((xx < edge) if anat.side == 0 else (xx > edge)))
            img[apical] = 22.0
            img[side_lung & (yy < lcy) & (np.abs(xx - edge) < 0.006)] = 120.0
        if s["pneumonia"]:                                                        # frontal: faint, behind the heart
            img += 7.0 * s["pneumonia"] * _blob(yy, xx, bottom - 0.08, 0.5 + (0.08 if anat.side else -0.08), 0.05)
    else:
        lung = _ellipse(yy, xx, 0.46, 0.5, 0.33, 0.3)
        img[lung] = 62.0
        img += ribs * 0.6 * lung
        img[_ellipse(yy, xx, 0.62, 0.36, anat.heart_r * 1.2, anat.heart_r * 1.1)] = 165.0  # anterior heart
        spine = (xx > 0.78) & (xx < 0.87)
        img[spine] = 150.0 + 25.0 * (np.sin(yy * 55.0) > 0)[spine]
        bottom = 0.46 + 0.33
        if s["pleural_effusion"]:                                                 # lateral: posterior recess fills first
            level = bottom - (0.06 + 0.06 * s["pleural_effusion"]) + 0.15 * (0.8 - xx)
            img[lung & (yy > level) & (xx > 0.45)] = 150.0
        if s["consolidation"]:
            img += 24.0 * s["consolidation"] * _blob(yy, xx, anat.lung_cy + anat.focus[1] * 0.3,
                                                      0.3 + 0.4 * anat.depth, 0.03 + 0.015 * s["consolidation"]) * lung
        if s["edema"]:
            img += (8.0 * s["edema"] * _blob(yy, xx, 0.5, 0.5, 0.2) + 4.0 * s["edema"]) * lung
        if s["pneumothorax"]:                                                     # hardly visible on the lateral
            img[lung & (yy < 0.25) & (xx > 0.55)] -= 4.0 * s["pneumothorax"]
        if s["pneumonia"]:                                                        # lateral: clear retrocardiac opacity
            img += 30.0 * s["pneumonia"] * _blob(yy, xx, bottom - 0.12, 0.66, 0.035 + 0.02 * s["pneumonia"]) * lung
    gain, offset = rng.uniform(0.9, 1.1), rng.uniform(-8, 8)
    img = img * gain + offset
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "L").filter(ImageFilter.GaussianBlur(1.2))
    if (h, w) != (H, W):
        pil = pil.resize((W, H), Image.BILINEAR)
    out = np.asarray(pil, dtype=np.int16)
    out = out + _noise(H, W, rng)
    return np.clip(out, 0, 255).astype(np.uint8)


def peek_jitter(rng: np.random.Generator) -> Tuple[float, float]:
    """The positioning jitter the next ``render(..., rng, ...)`` call will draw, without consuming ``rng``."""
    twin = np.random.Generator(type(rng.bit_generator)())
    twin.bit_generator.state = rng.bit_generator.state
    jy, jx = twin.normal(0, 0.01, size=2)
    return float(jy), float(jx)


_VISIBLE = 8.0  # grey levels: about the film-grain noise (std 5) plus JPEG error


def finding_region(finding: str, sev: int, anat: _Anatomy, size: Tuple[int, int],
                   jitter: Tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Where ``render`` draws ``finding`` at severity ``sev`` on a frontal view: bool (H, W).

    The same geometry as the frontal branch of ``render`` (pass ``peek_jitter(rng)`` taken just before the
    render call), so a grounding map can be scored against the planted region. A blob counts out to where it
    adds a tenth of its peak intensity; edema (diffuse over both lungs) returns the lungs.
    """
    if finding not in FINDINGS:
        raise ValueError(f"unknown finding {finding!r}; one of {FINDINGS}")
    H, W = size
    yy, xx = _grid(H, W)
    yy, xx = yy + jitter[0], xx + jitter[1]
    cx = (0.5 - anat.lung_dx, 0.5 + anat.lung_dx)
    lungs = [_ellipse(yy, xx, anat.lung_cy, c, anat.lung_ry, anat.lung_rx) for c in cx]
    side_lung = lungs[anat.side]
    lcx, lcy = cx[anat.side], anat.lung_cy
    bottom = anat.lung_cy + anat.lung_ry
    if sev <= 0:
        return np.zeros((H, W), bool)
    if finding == "pleural_effusion":
        level = bottom - (0.02 + 0.07 * (sev - 1)) - 0.02 * np.abs(xx - lcx) / anat.lung_rx
        return side_lung & (yy > level)
    if finding == "consolidation":
        fx, fy = lcx + anat.focus[0] * anat.lung_rx, lcy + anat.focus[1] * anat.lung_ry
        return side_lung & (28.0 * sev * _blob(yy, xx, fy, fx, 0.025 + 0.015 * sev) >= _VISIBLE)
    if finding == "pneumothorax":
        edge = lcx + (-1 if anat.side == 0 else 1) * anat.lung_rx * (1.0 - 0.22 * sev)
        apical = side_lung & (yy < lcy)
        # the lucency beyond the collapsed lung's edge, and the pleural line drawn at the edge
        return apical & (((xx < edge) if anat.side == 0 else (xx > edge)) | (np.abs(xx - edge) < 0.006))
    if finding == "pneumonia":
        return 7.0 * sev * _blob(yy, xx, bottom - 0.08, 0.5 + (0.08 if anat.side else -0.08), 0.05) >= _VISIBLE
    return lungs[0] | lungs[1]


_NOISE_CACHE: Dict[Tuple[int, int], np.ndarray] = {}


def _noise(H: int, W: int, rng: np.random.Generator) -> np.ndarray:
    """Film-grain noise: one fixed tile per size, rolled by a random offset (full-size images stay cheap)."""
    tile = _NOISE_CACHE.get((H, W))
    if tile is None:
        tile = np.random.Generator(np.random.PCG64(12345)).normal(0, 5, size=(H, W)).astype(np.int16)
        _NOISE_CACHE[(H, W)] = tile
    return np.roll(tile, (int(rng.integers(0, H)), int(rng.integers(0, W))), axis=(0, 1))


def _jpeg_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a, "L").save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------- reports
_NAMES = {"pleural_effusion": "pleural effusion", "consolidation": "consolidation", "edema": "pulmonary edema",
          "pneumothorax": "pneumothorax", "pneumonia": "pneumonia"}


def _phrase(f: str, sev: int, side: str) -> str:
    adj = (_ADJ_DIFFUSE if f in ("edema", "pneumonia") else _ADJ)[sev]
    where = {"pleural_effusion": f" {side}", "consolidation": f" {side} lower lobe",
             "pneumothorax": f" {side}", "edema": "", "pneumonia": f" {side} lower lobe"}[f]
    if f == "consolidation":
        return f"{adj} consolidation in the{where}"
    if f == "pneumonia":
        return f"{adj} pneumonia in the{where}"
    return f"{adj}{where} {_NAMES[f]}"


# ----------------------------------------------------------------------------- planted findings (grounding)
PLANTED_FINDINGS = ("pleural_effusion", "pneumothorax", "consolidation")  # the ones with a local region
PLANTED_WORD = {"pleural_effusion": "effusion", "pneumothorax": "pneumothorax", "consolidation": "consolidation"}


class PlantedFrontal(NamedTuple):
    image: np.ndarray  # (canvas, canvas) uint8 PA frontal
    text: str  # "There is a <phrase>." naming the finding, its severity and side
    region: np.ndarray  # (canvas, canvas) bool: where render drew the finding (finding_region)
    word: str  # the report word a grounding map is read for (PLANTED_WORD)
    finding: str
    side: str  # "right" | "left" (the patient's)


def planted_frontals(n: int, seed: int, train: bool, canvas: int) -> List[PlantedFrontal]:
    """``n`` frontals with exactly one planted finding each (cycling PLANTED_FINDINGS), its one-sentence report
    and its region, for grounding checks (tests/test_grounding.py, scripts/grounding_example.py). Training sets
    draw severity 2 or 3, held-out sets (``train=False``) severity 3. Deterministic in (seed, i)."""
    out = []
    for i in range(n):
        rng = _rng(seed, 9, i)
        anat = _Anatomy(rng)
        f = PLANTED_FINDINGS[i % len(PLANTED_FINDINGS)]
        sev = 3 if not train else int(rng.integers(2, 4))
        s = {k: 0 for k in FINDINGS}
        s[f] = sev
        jitter = peek_jitter(rng)  # before render draws it: the region must use the same jitter
        a = render("PA", s, anat, rng, (canvas, canvas))
        side = "right" if anat.side == 0 else "left"
        out.append(PlantedFrontal(a, f"There is a {_phrase(f, sev, side)}.",
                                  finding_region(f, sev, anat, (canvas, canvas), jitter), PLANTED_WORD[f], f, side))
    return out


def finding_sentence(f: str, prev: Optional[int], cur: int, side: str) -> Optional[str]:
    """A report sentence with the planted change word; None for a finding absent now and before."""
    name = _NAMES[f]
    if prev is None:
        return f"There is a {_phrase(f, cur, side)}." if cur else None
    if prev == 0 and cur == 0:
        return None
    if prev == 0:
        return f"New {_phrase(f, cur, side)}."
    if cur == 0:
        return f"Previously seen {name} has resolved."
    if cur > prev:
        return f"The {side if f != 'edema' else ''} {name} has increased, now {_ADJ_DIFFUSE[cur] if f in ('edema', 'pneumonia') else _ADJ[cur]}.".replace("  ", " ")
    if cur < prev:
        return f"The {side if f != 'edema' else ''} {name} has decreased, now {_ADJ_DIFFUSE[cur] if f in ('edema', 'pneumonia') else _ADJ[cur]}.".replace("  ", " ")
    return f"{_phrase(f, cur, side).capitalize()}, unchanged."


def _report(rng: np.random.Generator, views: Sequence[str], prev: Optional[Dict[str, int]], cur: Dict[str, int],
            side: str, empty: bool) -> str:
    has_lat = any(v in ("LATERAL", "LL") for v in views)
    exam = "CHEST (PA AND LAT)" if has_lat else "CHEST (PORTABLE AP)"
    head = (f"                                 FINAL REPORT\n EXAMINATION:  {exam}\n \n"
            f" INDICATION:  ___ year old with shortness of breath.\n \n"
            f" COMPARISON:  {'___' if prev is not None else 'None.'}\n \n")
    if empty:  # a real-world failure: the report has no findings and no impression section
        return head + " NOTIFICATION:  Discussed with ___ by telephone.\n"
    sents = [finding_sentence(f, None if prev is None else prev[f], cur[f], side) for f in FINDINGS]
    sents = [s for s in sents if s]
    technique = "PA and lateral views of the chest provided." if has_lat else "Single frontal view of the chest."
    normal = ["The cardiomediastinal silhouette is normal.", "No acute osseous abnormality."]
    negatives = [f"No {_NAMES[f]}." for f in FINDINGS if cur[f] == 0 and (prev is None or prev[f] == 0)]
    rng.shuffle(negatives)
    findings = " ".join([technique] + sents + negatives[:2] + normal)
    impression = " ".join(sents) if sents else "No acute cardiopulmonary process."
    layout = rng.random()
    body = ""
    if layout < 0.9:
        body += f" FINDINGS:\n \n {findings}\n \n"
    body += f" IMPRESSION:\n \n {impression}\n"
    return head + body


# ---------------------------------------------------------------------------------------------- generation
def _plan_patient(seed: int, p: int) -> dict:
    rng = _rng(seed, 1, p)
    # sparse 8-digit ids spread over p10..p19 like MIMIC's (the pNN folder is the first two digits)
    subject = 10000000 + (p % 10) * 1000000 + (p // 10) * 37 + int(rng.integers(0, 37))
    n = 1 if rng.random() < P_ONE_STUDY else int(rng.integers(2, 9))
    active = [f for f in FINDINGS if rng.random() < 0.35]
    trends = {f: _TRENDS[int(rng.integers(0, 3))] for f in active}
    sev = {f: (_trajectory(rng, n, trends[f]) if f in active else [0] * n) for f in FINDINGS}
    day = int(rng.integers(770000, 800000))  # shifted years ~2110-2190, as MIMIC's de-identified dates
    studies = []
    for t in range(n):
        if t:
            day += 0 if rng.random() < 0.15 else int(rng.integers(1, 400))  # same-day follow-ups happen
        secs = float(rng.integers(0, 86400 * 1000)) / 1000.0
        if t and studies[-1]["day"] == day and secs <= studies[-1]["secs"]:
            secs = min(86399.999, studies[-1]["secs"] + 600.0)
        lateral_only = rng.random() < P_LATERAL_ONLY
        views = []
        if not lateral_only:
            views.append("PA" if rng.random() < 0.7 else "AP")
            if rng.random() < P_DUPLICATE_FRONTAL:
                views.append("AP" if views[0] == "PA" else "PA")
        if lateral_only or rng.random() >= P_NO_LATERAL:
            views.append("LATERAL" if rng.random() < 0.9 else "LL")
        if rng.random() < P_NULL_VIEW:
            views.append("")  # an image with a null ViewPosition (prepare skips and counts it)
        studies.append({
            "day": day, "secs": secs, "views": views,
            "missing_report": bool(rng.random() < P_MISSING_REPORT),
            "empty_report": bool(rng.random() < P_EMPTY_REPORT),
            "findings": {f: sev[f][t] for f in FINDINGS},
        })
    return {"subject": subject, "trends": trends, "side": "right" if rng.random() < 0.5 else "left",
            "studies": studies, "split": ("train" if rng.random() < 0.9 else "validate" if rng.random() < 0.5 else "test")}


def generate(out_dir, patients: int = 100, seed: int = 0, image_size: Optional[Tuple[int, int]] = None,
             extras: bool = True, zip_reports: bool = True, rsna: int = 40, covidx: int = 60) -> dict:
    """Write a synthetic MIMIC-CXR-JPG tree to ``out_dir`` and return the ground truth (also ground_truth.json).

    Args:
        patients: number of patients (about 3.5 studies and 5.5 images each on average).
        image_size: (H, W) of every MIMIC image; default 384x320. Use e.g. (3000, 2500) for benchmarks.
        extras: also write the MS-CXR-T, RSNA and COVIDx-format sets under out_dir/{msxrt,rsna,covidx}.
        zip_reports: also write mimic-cxr-reports.zip (the reports are always written as a .txt tree too).
        rsna, covidx: number of images in those sets.
    Returns:
        {"seed", "image_size", "studies": {study_id: {...}}, "patients": {subject_id: {...}}, "counts": {...}}
    """
    out_dir = os.fspath(out_dir)
    size = tuple(image_size) if image_size is not None else DEFAULT_IMAGE_SIZE
    if len(size) != 2 or min(size) < 16:
        raise ValueError(f"image_size must be (H, W) with both >= 16, got {image_size!r}")
    os.makedirs(out_dir, exist_ok=True)
    plans = [_plan_patient(seed, p) for p in range(patients)]
    # study ids are unique and NOT in time order (as in MIMIC): a random permutation of a sparse range
    n_studies = sum(len(pl["studies"]) for pl in plans)
    sid_pool = 50000000 + _rng(seed, 2).permutation(n_studies * 7)[:n_studies]
    meta_rows, split_rows, chex_rows, reports = [], [], [], {}
    gt_studies, gt_patients = {}, {}
    k = 0
    for p, pl in enumerate(plans):
        subject = pl["subject"]
        rng = _rng(seed, 3, p)
        anat = _Anatomy(rng)
        # the findings are drawn on the side the reports name (_Anatomy's own draw is kept for the RNG stream)
        anat.side = 0 if pl["side"] == "right" else 1
        pdir = os.path.join(out_dir, "files", f"p{str(subject)[:2]}", f"p{subject}")
        prev = None
        study_ids = []
        for t, st in enumerate(pl["studies"]):
            study = int(sid_pool[k]); k += 1
            study_ids.append(str(study))
            sdir = os.path.join(pdir, f"s{study}")
            os.makedirs(sdir, exist_ok=True)
            date, time = _date_from_ordinal(st["day"]), _fmt_time(st["secs"])
            views = []
            for v in st["views"]:
                dicom = _dicom_id(rng)
                draw_as = v or ("PA" if rng.random() < 0.5 else "LATERAL")
                pixels = render(draw_as, st["findings"], anat, rng, size)
                with open(os.path.join(sdir, dicom + ".jpg"), "wb") as f:
                    f.write(_jpeg_bytes(pixels))
                rel = os.path.relpath(os.path.join(sdir, dicom + ".jpg"), out_dir)
                views.append({"dicom_id": dicom, "view": v, "path": rel})
                desc = "CHEST (PA AND LAT)" if any(x in ("LATERAL", "LL") for x in st["views"]) else "CHEST (PORTABLE AP)"
                meta_rows.append([dicom, subject, study, desc, v, size[0], size[1], date, time, desc,
                                  _VIEW_MEANING.get(v, ""), "Erect" if v != "AP" else "Recumbent"])
                split_rows.append([dicom, study, subject, pl["split"]])
            text = _report(rng, st["views"], prev, st["findings"], pl["side"], st["empty_report"])
            if not st["missing_report"]:
                reports[os.path.join("files", f"p{str(subject)[:2]}", f"p{subject}", f"s{study}.txt")] = text
            chex = []
            for c in CHEXPERT_COLUMNS:
                f = next((f for f, cc in _CHEXPERT_OF.items() if cc == c), None)
                if f is not None:
                    chex.append("1.0" if st["findings"][f] else ("0.0" if rng.random() < 0.5 else ""))
                elif c == "No Finding":
                    chex.append("" if any(st["findings"].values()) else "1.0")
                else:
                    chex.append("")
            chex_rows.append([subject, study] + chex)
            drop = None
            if not any(v in ("PA", "AP") for v in st["views"]):
                drop = "no_frontal"
            elif st["missing_report"]:
                drop = "missing_report"
            elif st["empty_report"]:
                drop = "short_report"
            gt_studies[str(study)] = {
                "subject_id": str(subject), "order": t, "study_date": date, "study_time": time,
                "views": views, "findings": dict(st["findings"]),
                "change": None if prev is None else {f: change_label(prev[f], st["findings"][f])
                                                     for f in FINDINGS if prev[f] or st["findings"][f]},
                "split": "valid" if pl["split"] == "validate" else pl["split"], "drop": drop,
                "report": "missing" if st["missing_report"] else "empty" if st["empty_report"] else "ok",
            }
            prev = st["findings"]
        gt_patients[str(subject)] = {"studies": study_ids, "trends": pl["trends"], "side": pl["side"],
                                     "split": "valid" if pl["split"] == "validate" else pl["split"]}
    # MIMIC ships the metadata sorted by dicom_id? No: by subject/study path. Keep path order (deterministic).
    _write_csv_gz(os.path.join(out_dir, "mimic-cxr-2.0.0-metadata.csv.gz"), METADATA_COLUMNS, meta_rows)
    _write_csv_gz(os.path.join(out_dir, "mimic-cxr-2.0.0-split.csv.gz"), ("dicom_id", "study_id", "subject_id", "split"), split_rows)
    _write_csv_gz(os.path.join(out_dir, "mimic-cxr-2.0.0-chexpert.csv.gz"), ("subject_id", "study_id") + CHEXPERT_COLUMNS, chex_rows)
    for rel in sorted(reports):
        with open(os.path.join(out_dir, rel), "w", encoding="utf-8", newline="\n") as f:
            f.write(reports[rel])
    if zip_reports:
        with zipfile.ZipFile(os.path.join(out_dir, "mimic-cxr-reports.zip"), "w", zipfile.ZIP_DEFLATED) as z:
            for rel in sorted(reports):
                zi = zipfile.ZipInfo(rel, date_time=(1980, 1, 1, 0, 0, 0))
                zi.compress_type = zipfile.ZIP_DEFLATED
                z.writestr(zi, reports[rel])
    gt = {"seed": seed, "image_size": list(size), "studies": gt_studies, "patients": gt_patients,
          "counts": {"patients": len(plans), "studies": len(gt_studies), "images": len(meta_rows),
                     "null_view_images": sum(1 for r in meta_rows if not r[4])}}
    if extras:
        gt["msxrt"] = _write_msxrt(out_dir, gt)
        gt["rsna"] = _write_rsna(os.path.join(out_dir, "rsna"), seed, rsna)
        gt["covidx"] = _write_covidx(os.path.join(out_dir, "covidx"), seed, covidx)
    with open(os.path.join(out_dir, "ground_truth.json"), "w", encoding="utf-8") as f:
        json.dump(gt, f, indent=1, sort_keys=True)
    return gt


EVAL_SETS_MARKER = "EVAL_SETS_COMPLETE"


def ensure_eval_sets(root: str, rsna: int = 40, covidx: int = 60) -> dict:
    """Write the MS-CXR-T, RSNA and COVIDx-format sets into a generated tree that lacks them; returns counts.

    ``root`` is a folder ``generate`` wrote (it reads ``ground_truth.json``), e.g. the trainer's synthetic
    cache ``<cache>/synthetic-.../raw``, which is generated without them. The sets are derived from the
    ground truth alone (the same bytes ``generate(extras=True)`` writes), so the MIMIC tree is not touched.
    Built once under a lock; ``EVAL_SETS_COMPLETE`` (written last, holding the counts) marks a finished build.
    """
    root = os.fspath(root)
    marker = os.path.join(root, EVAL_SETS_MARKER)
    gt_path = os.path.join(root, "ground_truth.json")
    if not os.path.isfile(gt_path):
        raise FileNotFoundError(f"{gt_path}: missing; {root} is not a tree written by medst_fast.data.synth")
    fd = os.open(os.path.join(root, ".eval_sets.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        lock_process(fd)
        if os.path.isfile(marker):
            with open(marker, encoding="utf-8") as f:
                return json.load(f)
        with open(gt_path, encoding="utf-8") as f:
            try:
                gt = json.load(f)
            except ValueError as e:
                raise ValueError(f"{gt_path}: not valid JSON ({e})") from None
        for k in ("msxrt", "rsna", "covidx"):
            if isinstance(gt.get(k), dict):  # generate(extras=True) wrote them already
                counts = {k: gt[k] for k in ("msxrt", "rsna", "covidx") if k in gt}
                break
        else:
            log.info("writing the synthetic evaluation sets (MS-CXR-T, RSNA, COVIDx formats) into %s", root)
            seed = int(gt["seed"])
            counts = {"msxrt": _write_msxrt(root, gt), "rsna": _write_rsna(os.path.join(root, "rsna"), seed, rsna),
                      "covidx": _write_covidx(os.path.join(root, "covidx"), seed, covidx)}
        atomic_write(marker, json.dumps(counts, sort_keys=True))
        return counts
    finally:
        os.close(fd)


def _csv_text(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _write_csv_gz(path: str, header, rows) -> None:
    # mtime=0 and no file name in the gzip header: identical bytes for identical content
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        gz.write(_csv_text(header, rows).encode("utf-8"))


def _frontal_of(study: dict) -> Optional[str]:
    for pref in ("PA", "AP"):
        for v in study["views"]:
            if v["view"] == pref:
                return v["dicom_id"]
    return None


def _write_msxrt(out_dir: str, gt: dict) -> dict:
    """MS-CXR-T-format CSVs: consecutive frontal pairs with progression labels, and sentence pairs."""
    d = os.path.join(out_dir, "msxrt")
    os.makedirs(d, exist_ok=True)
    rows = []
    for subject in sorted(gt["patients"]):
        sids = gt["patients"][subject]["studies"]
        for a, b in zip(sids, sids[1:]):
            sa, sb = gt["studies"][a], gt["studies"][b]
            fa, fb = _frontal_of(sa), _frontal_of(sb)
            if not (fa and fb and sb["change"]):
                continue
            labels = [sb["change"].get(f, "") for f in ("consolidation", "edema", "pleural_effusion", "pneumonia", "pneumothorax")]
            rows.append([fb, fa, b, subject] + labels)
    cols = ("dicom_id", "previous_dicom_id", "study_id", "subject_id", "consolidation_progression",
            "edema_progression", "pleural_effusion_progression", "pneumonia_progression", "pneumothorax_progression")
    with open(os.path.join(d, "MS_CXR_T_temporal_image_classification_v1.0.0.csv"), "w", encoding="utf-8") as f:
        f.write(_csv_text(cols, rows))
    # sentence pairs: paraphrases keep the change direction, contradictions flip it
    srng = _rng(gt["seed"], 4)
    pairs = []
    for f in FINDINGS:
        name = _NAMES[f]
        for side in ("right", "left"):
            loc = "" if f == "edema" else f"{side} "
            up = [f"The {loc}{name} has increased.", f"Interval increase in {loc}{name}.", f"Worsening {loc}{name}."]
            down = [f"The {loc}{name} has decreased.", f"Interval decrease in {loc}{name}.", f"Improving {loc}{name}."]
            same = [f"The {loc}{name} is unchanged.", f"Stable {loc}{name}.", f"No change in {loc}{name}."]
            for group in (up, down, same):
                pairs.append(("RadGraph", group[0], group[1 + int(srng.integers(0, 2))], "paraphrase"))
            pairs.append(("RadGraph", up[int(srng.integers(0, 3))], down[int(srng.integers(0, 3))], "contradiction"))
            pairs.append(("RadGraph", same[int(srng.integers(0, 3))], up[int(srng.integers(0, 3))], "contradiction"))
        pairs.append(("CheXpert", f"New {name}.", f"{name.capitalize()} is new.", "paraphrase"))
    # The official reader takes itertuples() fields 2..4, i.e. CSV columns 1..3 (field 0 is the index), so
    # sentence_1, sentence_2, category sit right after one leading column, and subset_name comes after them.
    srows = [[str(50000000 + i), s1, s2, cat, sub] for i, (sub, s1, s2, cat) in enumerate(pairs)]
    with open(os.path.join(d, "MS_CXR_T_temporal_sentence_similarity_v1.0.0.csv"), "w", encoding="utf-8") as f:
        f.write(_csv_text(("study_id", "sentence_1", "sentence_2", "category", "subset_name"), srows))
    return {"image_pairs": len(rows), "sentence_pairs": len(srows)}


def _write_rsna(d: str, seed: int, n: int) -> dict:
    """RSNA-format: stage_2_train_labels.csv (a row per box; one row with blanks for negatives) + DICOMs."""
    if n <= 0:
        return {"images": 0}
    try:
        import pydicom
        from pydicom.dataset import FileDataset, FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage
    except ImportError:
        log.warning("pydicom not installed: skipping the synthetic RSNA set (pip install pydicom)")
        return {"images": 0}
    img_dir = os.path.join(d, "stage_2_train_images")
    os.makedirs(img_dir, exist_ok=True)
    rows, positives = [], 0
    S = 256
    for i in range(n):
        rng = _rng(seed, 5, i)
        pid = "%08x-%04x-%04x-%04x-%012x" % tuple(int(rng.integers(0, 2**bits)) for bits in (32, 16, 16, 16, 48))
        anat = _Anatomy(rng)
        target = int(rng.random() < 0.4)
        sev = {f: 0 for f in FINDINGS}
        if target:
            sev["consolidation"] = int(rng.integers(2, 4))
            sev["pneumonia"] = sev["consolidation"]
        a = render("PA", sev, anat, rng, (S, S)).astype(np.uint16) * 16  # 12-bit range, as real DICOMs
        if target:
            positives += 1
            lcx = 0.5 + (-1 if anat.side == 0 else 1) * anat.lung_dx
            cx, cy = lcx + anat.focus[0] * anat.lung_rx, anat.lung_cy + anat.focus[1] * anat.lung_ry
            r = 0.05 + 0.015 * sev["consolidation"]
            # boxes in 1024-px coordinates, as the RSNA labels are
            x, y, bw = (cx - r) * 1024, (cy - r) * 1024, 2 * r * 1024
            rows.append([pid, f"{x:.1f}", f"{y:.1f}", f"{bw:.1f}", f"{bw:.1f}", 1])
        else:
            rows.append([pid, "", "", "", "", 0])
        mono1 = bool(rng.random() < 0.3)
        if mono1:
            a = (4095 - a).astype(np.uint16)
        meta = FileMetaDataset()
        uid = f"1.2.826.0.1.3680043.8.498.{seed % 100000}.{i + 1}"
        meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        meta.MediaStorageSOPInstanceUID = uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, uid
        ds.PatientID, ds.Modality, ds.BodyPartExamined, ds.ViewPosition = pid, "CR", "CHEST", "PA"
        ds.Rows, ds.Columns = S, S
        ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 12, 11, 0
        ds.PhotometricInterpretation = "MONOCHROME1" if mono1 else "MONOCHROME2"
        ds.PixelData = np.ascontiguousarray(a).tobytes()
        ds.save_as(os.path.join(img_dir, pid + ".dcm"), enforce_file_format=True)
    with open(os.path.join(d, "stage_2_train_labels.csv"), "w", encoding="utf-8") as f:
        f.write(_csv_text(("patientId", "x", "y", "width", "height", "Target"), rows))
    return {"images": n, "positives": positives}


def _write_covidx(d: str, seed: int, n: int) -> dict:
    """COVIDx-format: train.txt/test.txt lines "patientid filename label source" + images.

    normal: nothing drawn; pneumonia: unilateral lobar consolidation; COVID-19: bilateral peripheral haze."""
    labels = ("normal", "pneumonia", "COVID-19")
    counts = {}
    for split, m in (("train", n), ("test", max(3, n // 2))):
        os.makedirs(os.path.join(d, split), exist_ok=True)
        lines = []
        for i in range(m):
            rng = _rng(seed, 6, 0 if split == "train" else 1, i)
            lab = labels[i % 3]
            anat = _Anatomy(rng)
            sev = {f: 0 for f in FINDINGS}
            if lab == "pneumonia":
                sev["consolidation"] = int(rng.integers(2, 4))
            elif lab == "COVID-19":
                sev["edema"] = int(rng.integers(2, 4))
            a = render("PA", sev, anat, rng, (256, 256))
            fname = f"{split}-{i:05d}.jpg"
            Image.fromarray(a, "L").save(os.path.join(d, split, fname), format="JPEG", quality=JPEG_QUALITY)
            lines.append(f"{1000 + i} {fname} {lab} synth\n")
        with open(os.path.join(d, f"{split}.txt"), "w", encoding="utf-8") as f:
            f.writelines(lines)
        counts[split] = m
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m medst_fast.data.synth", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--patients", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                    help="image height and width (default 384 320; ~3000 2500 for full-size benchmarks)")
    ap.add_argument("--no-extras", action="store_true", help="skip the MS-CXR-T, RSNA and COVIDx-format sets")
    ap.add_argument("--no-zip", action="store_true", help="do not write mimic-cxr-reports.zip")
    a = ap.parse_args(argv)
    gt = generate(a.out, patients=a.patients, seed=a.seed, image_size=a.image_size, extras=not a.no_extras,
                  zip_reports=not a.no_zip)
    print(json.dumps(gt["counts"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
