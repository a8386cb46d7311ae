import csv
import gzip
import hashlib
import json
import os

import numpy as np
import pytest

from medst_fast.data import synth


def _digest(root):
    h = {}
    for d, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                h[os.path.relpath(p, root)] = hashlib.sha1(fh.read()).hexdigest()
    return h


def _read_gz_csv(path):
    with gzip.open(path, "rt") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synth"))
    gt = synth.generate(root, patients=40, seed=7, rsna=12, covidx=9)
    return root, gt


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    synth.generate(a, patients=5, seed=11, rsna=4, covidx=3)
    synth.generate(b, patients=5, seed=11, rsna=4, covidx=3)
    synth.generate(c, patients=5, seed=12, rsna=4, covidx=3)
    da, db, dc = _digest(a), _digest(b), _digest(c)
    assert da == db
    assert len(da) > 30
    assert da != dc


def test_mimic_layout_and_tables(tree):
    root, gt = tree
    meta = _read_gz_csv(os.path.join(root, "mimic-cxr-2.0.0-metadata.csv.gz"))
    split = _read_gz_csv(os.path.join(root, "mimic-cxr-2.0.0-split.csv.gz"))
    chex = _read_gz_csv(os.path.join(root, "mimic-cxr-2.0.0-chexpert.csv.gz"))
    assert set(synth.METADATA_COLUMNS) <= set(meta[0])
    assert {r["dicom_id"] for r in meta} == {r["dicom_id"] for r in split}
    assert {r["split"] for r in split} <= {"train", "validate", "test"}
    assert len(chex) == gt["counts"]["studies"] and "Pleural Effusion" in chex[0]
    for r in meta:
        s = r["subject_id"]
        p = os.path.join(root, "files", f"p{s[:2]}", f"p{s}", f"s{r['study_id']}", r["dicom_id"] + ".jpg")
        assert os.path.isfile(p), p
        float(r["StudyTime"])  # a float, possibly without leading zeros
        assert len(r["StudyDate"]) == 8
    views = {r["ViewPosition"] for r in meta}
    assert {"PA", "AP", "LATERAL", ""} <= views
    assert sum(1 for r in meta if not r["ViewPosition"]) == gt["counts"]["null_view_images"] > 0
    # hazards are present: one-study patients, no-lateral studies, PA+AP duplicates
    assert any(len(p["studies"]) == 1 for p in gt["patients"].values())
    st = gt["studies"].values()
    assert any(not any(v["view"] in ("LATERAL", "LL") for v in s["views"]) for s in st)
    assert any({"PA", "AP"} <= {v["view"] for v in s["views"]} for s in st)
    # study ids are not in time order for at least one patient (ordering must use the dates)
    assert any([int(x) for x in p["studies"]] != sorted(int(x) for x in p["studies"]) for p in gt["patients"].values())


def test_reports_carry_the_change_words(tree):
    root, gt = tree
    checked = 0
    for sid, s in gt["studies"].items():
        subj = s["subject_id"]
        p = os.path.join(root, "files", f"p{subj[:2]}", f"p{subj}", f"s{sid}.txt")
        if s["report"] == "missing":
            assert not os.path.exists(p)
            continue
        text = open(p).read()
        assert "FINAL REPORT" in text
        if s["report"] == "empty":
            assert "FINDINGS:" not in text and "IMPRESSION:" not in text
            continue
        if not s["change"]:
            continue
        assert "FINDINGS:" in text or "IMPRESSION:" in text
        for f, ch in s["change"].items():
            name = synth._NAMES[f]
            sents = [x for x in text.replace("\n", " ").split(".") if name in x]
            assert sents, (sid, f)
            words = " ".join(sents)
            if ch == "worsening":
                assert "increased" in words or "New" in words
            elif ch == "improving":
                assert "decreased" in words or "resolved" in words
            else:
                assert "unchanged" in words
            checked += 1
    assert checked > 10
    with __import__("zipfile").ZipFile(os.path.join(root, "mimic-cxr-reports.zip")) as z:
        names = z.namelist()
    assert all(n.startswith("files/p1") and n.endswith(".txt") for n in names)


def _pair(view, finding, sev, seed=0):
    anat = synth._Anatomy(np.random.default_rng(seed))
    zero = {f: 0 for f in synth.FINDINGS}
    one = dict(zero, **{finding: sev})
    a = synth.render(view, zero, anat, np.random.Generator(np.random.PCG64(5)), (192, 160)).astype(np.float64)
    b = synth.render(view, one, anat, np.random.Generator(np.random.PCG64(5)), (192, 160)).astype(np.float64)
    return np.abs(b - a).mean()


@pytest.mark.parametrize("finding", synth.FINDINGS)
def test_planted_signal_grows_with_severity(finding):
    view = "LATERAL" if finding == "pneumonia" else "PA"
    d1, d3 = _pair(view, finding, 1), _pair(view, finding, 3)
    assert d1 > 0.05
    assert d3 > d1


def test_frontal_and_lateral_show_findings_differently():
    # pneumonia (retrocardiac) and small effusions (posterior recess) show more on the lateral,
    # a pneumothorax (apical lucency) more on the frontal
    assert _pair("LATERAL", "pneumonia", 2) > 2 * _pair("PA", "pneumonia", 2)
    assert _pair("LATERAL", "pleural_effusion", 1) > _pair("PA", "pleural_effusion", 1)
    assert _pair("PA", "pneumothorax", 2) > 2 * _pair("LATERAL", "pneumothorax", 2)


def test_msxrt_files(tree):
    root, gt = tree
    with open(os.path.join(root, "msxrt", "MS_CXR_T_temporal_image_classification_v1.0.0.csv")) as f:
        rows = list(csv.DictReader(f))
    assert rows and len(rows) == gt["msxrt"]["image_pairs"]
    labs = {"", "improving", "stable", "worsening"}
    dicoms = {v["dicom_id"]: (sid, v["view"]) for sid, s in gt["studies"].items() for v in s["views"]}
    for r in rows:
        for f in ("consolidation", "edema", "pleural_effusion", "pneumonia", "pneumothorax"):
            assert r[f + "_progression"] in labs
        cur, prev = gt["studies"][dicoms[r["dicom_id"]][0]], gt["studies"][dicoms[r["previous_dicom_id"]][0]]
        assert dicoms[r["dicom_id"]][1] in ("PA", "AP") and cur["order"] == prev["order"] + 1
        if r["pleural_effusion_progression"]:
            assert r["pleural_effusion_progression"] == synth.change_label(
                prev["findings"]["pleural_effusion"], cur["findings"]["pleural_effusion"])
    with open(os.path.join(root, "msxrt", "MS_CXR_T_temporal_sentence_similarity_v1.0.0.csv")) as f:
        raw = list(csv.reader(f))
    # the official reader takes itertuples() fields 2..4 = CSV columns 1..3
    assert raw[0][1:4] == ["sentence_1", "sentence_2", "category"]
    assert {r[3] for r in raw[1:]} == {"paraphrase", "contradiction"}
    assert any(r[4] == "RadGraph" for r in raw[1:])


def test_rsna_dicoms_and_covidx(tree):
    pydicom = pytest.importorskip("pydicom")
    from medst_fast.data.images import read_dicom_gray

    root, gt = tree
    with open(os.path.join(root, "rsna", "stage_2_train_labels.csv")) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["patientId", "x", "y", "width", "height", "Target"]
    assert len(rows) == 12 and {r["Target"] for r in rows} == {"0", "1"}
    photometric = set()
    for r in rows:
        p = os.path.join(root, "rsna", "stage_2_train_images", r["patientId"] + ".dcm")
        photometric.add(pydicom.dcmread(p).PhotometricInterpretation)
        a = np.asarray(read_dicom_gray(p), dtype=np.float64)
        # after MONOCHROME1 inversion every image has dark air outside the body and a bright mediastinum
        assert a[:, 120:136].mean() > a[:8, :8].mean() + 40
    assert photometric == {"MONOCHROME1", "MONOCHROME2"}
    for split in ("train", "test"):
        lines = open(os.path.join(root, "covidx", f"{split}.txt")).read().splitlines()
        assert lines
        for ln in lines:
            pid, fname, lab, src = ln.split(" ")
            assert lab in ("normal", "pneumonia", "COVID-19")
            assert os.path.isfile(os.path.join(root, "covidx", split, fname))


def test_cli_writes_ground_truth(tmp_path, capsys):
    assert synth.main(["--out", str(tmp_path), "--patients", "3", "--seed", "1", "--no-extras", "--image-size", "64", "48"]) == 0
    gt = json.load(open(tmp_path / "ground_truth.json"))
    assert gt["image_size"] == [64, 48]
    assert json.loads(capsys.readouterr().out)["patients"] == 3
    from PIL import Image
    s = next(iter(gt["studies"].values()))
    assert Image.open(tmp_path / s["views"][0]["path"]).size == (48, 64)


def test_eval_sets_added_to_a_tree_without_them_equal_generate_extras(tmp_path):
    with_extras, without = str(tmp_path / "a"), str(tmp_path / "b")
    synth.generate(with_extras, patients=12, seed=3, rsna=6, covidx=6)
    synth.generate(without, patients=12, seed=3, rsna=6, covidx=6, extras=False)
    assert not os.path.exists(os.path.join(without, "msxrt"))
    counts = synth.ensure_eval_sets(without, rsna=6, covidx=6)
    assert counts["msxrt"]["image_pairs"] > 0 and counts["covidx"] == {"train": 6, "test": 3}
    da, db = _digest(with_extras), _digest(without)
    sets = lambda d: {k: v for k, v in d.items() if k.split(os.sep)[0] in ("msxrt", "rsna", "covidx")}  # noqa: E731
    assert sets(da) == sets(db) and len(sets(da)) > 10  # the same bytes as generate(extras=True)
    # a second call finds them complete and rewrites nothing
    mtime = os.path.getmtime(os.path.join(without, "covidx", "train.txt"))
    assert synth.ensure_eval_sets(without) == counts
    assert os.path.getmtime(os.path.join(without, "covidx", "train.txt")) == mtime
    with pytest.raises(FileNotFoundError, match="ground_truth.json"):
        synth.ensure_eval_sets(str(tmp_path))


@pytest.mark.parametrize("finding", ["pleural_effusion", "consolidation", "pneumothorax", "pneumonia"])
def test_finding_region_is_where_render_draws(finding):
    """The region a grounding map is scored against covers the pixels the finding changes."""
    for i in range(4):
        rng = synth._rng(0, 9, i)
        anat = synth._Anatomy(rng)
        state = rng.bit_generator.state
        jitter = synth.peek_jitter(rng)
        assert rng.bit_generator.state == state  # peeking consumes nothing
        sev = {f: 0 for f in synth.FINDINGS}
        sev[finding] = 3
        a = synth.render("PA", sev, anat, rng, (110, 110)).astype(int)
        rng.bit_generator.state = state
        b = synth.render("PA", {f: 0 for f in synth.FINDINGS}, anat, rng, (110, 110)).astype(int)
        region = synth.finding_region(finding, 3, anat, (110, 110), jitter)
        changed = np.abs(a - b) > 8
        assert changed.sum() > 50
        grown = region.copy()  # the blur (radius 1.2) spreads each edge by a pixel or two
        for dy in (-2, -1, 1, 2):
            grown |= np.roll(region, dy, 0) | np.roll(region, dy, 1)
        assert (changed & grown).sum() >= 0.95 * changed.sum()
        assert (changed & region).sum() >= 0.6 * region.sum()
        assert region.mean() < 0.08  # a small part of the image: a peak there is no accident
    assert not synth.finding_region(finding, 0, anat, (110, 110)).any()


def test_findings_are_drawn_on_the_side_the_report_names(tmp_path):
    """Patient's right is the image's left: an effusion the reports call 'right' brightens the image's left half."""
    from PIL import Image

    root = str(tmp_path / "s")
    gt = synth.generate(root, patients=100, seed=5, extras=False, zip_reports=False, image_size=(96, 80))
    agree = []
    for subject, pat in gt["patients"].items():
        pa = []
        for sid in pat["studies"]:
            st = gt["studies"][sid]
            v = next((v for v in st["views"] if v["view"] == "PA"), None)
            if v is not None:
                pa.append((st["findings"], v["path"]))
        # two PA studies whose only difference is a larger effusion
        pair = next(((a, b) for a in pa for b in pa
                     if b[0]["pleural_effusion"] - a[0]["pleural_effusion"] >= 1
                     and all(a[0][f] == b[0][f] for f in synth.FINDINGS if f != "pleural_effusion")), None)
        if pair is None:
            continue
        img = lambda rel: np.asarray(Image.open(os.path.join(root, rel)), dtype=np.float64)  # noqa: E731
        a, b = img(pair[1][1]), img(pair[0][1])
        # each image has its own gain and offset: fit them away before looking at what the effusion added
        A = np.stack([b.ravel(), np.ones(b.size)], 1)
        coef = np.linalg.lstsq(A, a.ravel(), rcond=None)[0]
        diff = a - (A @ coef).reshape(a.shape)
        w = diff.shape[1]
        left, right = diff[:, : w // 2].clip(0).sum(), diff[:, w // 2:].clip(0).sum()
        agree.append((left > right) == (pat["side"] == "right"))
    # a side drawn at random would agree about half the time; jitter and film grain blur a few pairs
    assert len(agree) >= 8 and np.mean(agree) >= 0.85, agree
