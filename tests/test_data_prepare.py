import csv
import filecmp
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from PIL import Image

from medst_fast.data import cache
from medst_fast.data import prepare as prep
from medst_fast.data import synth
from medst_fast.data.index import SeriesIndex


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mimic"))
    gt = synth.generate(root, patients=40, seed=3, extras=False)
    return root, gt


def _expected(gt, mode="study"):
    """Rows per patient in time order from the generator's ground truth, independent of prepare's code."""
    out = {}
    for subj, p in sorted(gt["patients"].items()):
        rows = []
        for sid in p["studies"]:  # already in time order
            s = gt["studies"][sid]
            if s["drop"]:
                continue
            views = [v for v in s["views"] if v["view"]]
            fr = [v for v in views if v["view"] in ("PA", "AP")]
            lat = [v for v in views if v["view"] in ("LATERAL", "LL")]
            lat_id = lat[0]["dicom_id"] if lat else ""
            if mode == "study":
                fr = sorted(fr, key=lambda v: v["view"] != "PA")[:1]
            for v in fr:
                rows.append((sid, v["dicom_id"], lat_id, s["split"]))
        if rows:
            out[subj] = rows
    return out


def _chunks(xs):
    return [xs[i:i + 4] for i in range(0, len(xs), 4)]


def test_study_mode_matches_ground_truth(tree, tmp_path):
    root, gt = tree
    idx = prep.prepare_mimic(root, root, tmp_path / "out", cache_size=64, workers=0, progress=False)
    exp = _expected(gt)
    got = {}
    for s in idx.studies:
        got.setdefault(s.subject_id, []).append((s.study_id, s.frontal_dicom, s.lateral_dicom, s.split))
    assert got == exp
    # series: each patient's rows cut into chunks of 4, remainder kept
    want = sorted(tuple(c) for rows in exp.values() for c in _chunks([r[0] for r in rows]))
    have = sorted(tuple(idx.studies[r].study_id for r in ser) for spl in idx.series for ser in idx.series[spl])
    assert have == want
    assert any(len(c) == 4 for c in have) and any(len(c) < 4 for c in have)
    # the skip summary agrees with the hazards the generator planted
    sk = idx.meta["skipped"]
    drops = pd.Series([s["drop"] for s in gt["studies"].values()]).value_counts().to_dict()
    assert sk.get("null_view_position", 0) == gt["counts"]["null_view_images"] > 0
    for reason in ("no_frontal", "missing_report", "short_report"):
        assert sk.get(reason, 0) == drops.get(reason, 0), reason
    # cache: longer side 64, paths relative to the cache root
    assert idx.image_root == str(tmp_path / "out" / "images_64")
    for s in idx.studies[:20]:
        for rel in filter(None, (s.frontal_path, s.lateral_path)):
            assert max(Image.open(idx.path(rel)).size) == 64
    # text = cleaned impression + findings
    s0 = idx.studies[0]
    assert s0.text == s0.text.lower() and "." not in s0.text and s0.n_tokens == len(s0.text.split())
    # order/datetime increase within a patient
    for ser in idx.series["train"]:
        ts = [idx.studies[r].study_datetime for r in ser]
        assert ts == sorted(ts)
        assert [idx.studies[r].order for r in ser] == list(range(idx.studies[ser[0]].order, idx.studies[ser[0]].order + len(ser)))


def test_official_rows_mode(tree, tmp_path):
    root, gt = tree
    idx = prep.prepare_mimic(root, root, tmp_path / "o", cache_size=None, workers=0, mode="official_rows", progress=False)
    exp = _expected(gt, mode="official_rows")
    got = {}
    for s in idx.studies:
        got.setdefault(s.subject_id, []).append((s.study_id, s.frontal_dicom, s.lateral_dicom, s.split))
    assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in exp.items()}
    dup = [sid for sid, n in pd.Series([s.study_id for s in idx.studies]).value_counts().items() if n > 1]
    assert dup, "the synthetic tree should contain PA+AP studies"
    rows = [s for s in idx.studies if s.study_id == dup[0]]
    assert rows[0].text == rows[1].text and rows[0].lateral_path == rows[1].lateral_path
    assert idx.meta["mode"] == "official_rows" and idx.image_root == os.path.abspath(root)
    n = sum(len(c) for spl in idx.series for c in idx.series[spl])
    assert n == len(idx.studies)


def test_reports_from_zip_and_sectioned_csv_agree(tree, tmp_path):
    root, _ = tree
    a = prep.prepare_mimic(root, root, tmp_path / "a", cache_size=None, workers=0, progress=False)
    b = prep.prepare_mimic(root, os.path.join(root, "mimic-cxr-reports.zip"), tmp_path / "b", cache_size=None,
                           workers=0, progress=False)
    recs = []
    for d, _, files in os.walk(os.path.join(root, "files")):
        for f in files:
            if f.endswith(".txt"):
                imp, fnd = prep.sections_of(open(os.path.join(d, f)).read())
                recs.append({"study": f[:-4], "impression": imp, "findings": fnd})
    pd.DataFrame(recs).to_csv(tmp_path / "mimic_cxr_sectioned.csv", index=False)
    c = prep.prepare_mimic(root, tmp_path / "mimic_cxr_sectioned.csv", tmp_path / "c", cache_size=None, workers=0,
                           progress=False)
    assert filecmp.cmp(tmp_path / "a" / "studies.csv", tmp_path / "b" / "studies.csv", shallow=False)
    assert filecmp.cmp(tmp_path / "a" / "studies.csv", tmp_path / "c" / "studies.csv", shallow=False)
    assert a.series == b.series == c.series


def _same_index(d1, d2):
    assert filecmp.cmp(os.path.join(d1, "studies.csv"), os.path.join(d2, "studies.csv"), shallow=False)
    assert filecmp.cmp(os.path.join(d1, "series.json"), os.path.join(d2, "series.json"), shallow=False)
    i1, i2 = SeriesIndex.load(d1), SeriesIndex.load(d2)
    assert i1.meta["skipped"] == i2.meta["skipped"]
    r1, r2 = i1.image_root, i2.image_root
    c1 = sorted(os.path.relpath(os.path.join(d, f), r1) for d, _, fs in os.walk(r1) for f in fs)
    c2 = sorted(os.path.relpath(os.path.join(d, f), r2) for d, _, fs in os.walk(r2) for f in fs)
    assert c1 == c2 and c1
    for rel in c1[::7]:
        assert filecmp.cmp(os.path.join(r1, rel), os.path.join(r2, rel), shallow=False)


def test_interrupted_then_rerun_gives_the_same_index(tree, tmp_path, monkeypatch):
    root, _ = tree
    clean = tmp_path / "clean"
    prep.prepare_mimic(root, root, clean, cache_size=48, workers=2, progress=False)
    real, calls = cache.check_or_cache, {"n": 0}

    def flaky(*a):
        calls["n"] += 1
        if calls["n"] > 25:
            raise RuntimeError("simulated crash in the middle of the cache")
        return real(*a)

    monkeypatch.setattr(cache, "check_or_cache", flaky)
    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        prep.prepare_mimic(root, root, out, cache_size=48, workers=0, progress=False)
    assert not (out / "meta.json").exists()  # no index is written by an interrupted run
    done = [f for d, _, fs in os.walk(out) for f in fs if f.endswith(".jpg")]
    assert 0 < len(done) <= 25
    monkeypatch.setattr(cache, "check_or_cache", real)
    prep.prepare_mimic(root, root, out, cache_size=48, workers=0, progress=False)
    _same_index(clean, out)


def test_killed_process_then_rerun_gives_the_same_index(tree, tmp_path):
    """SIGKILL the CLI (and its worker pool) while it writes the cache, then rerun it."""
    root, _ = tree
    clean = tmp_path / "clean"
    prep.prepare_mimic(root, root, clean, cache_size=40, workers=0, progress=False, draft=False)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "medst_fast.data.prepare", "mimic", "--jpg-root", root, "--reports", root,
           "--out", str(out), "--cache-size", "40", "--workers", "2", "--no-draft"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(out) and any(f.endswith(".jpg") for _, _, fs in os.walk(out) for f in fs):
            break
        time.sleep(0.01)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # our own child's process group only
    proc.wait()
    # every cache file present after the kill is complete (written via temp + rename)
    for d, _, fs in os.walk(out):
        for f in fs:
            if f.endswith(".jpg") and not f.startswith(".tmp-"):
                Image.open(os.path.join(d, f)).load()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "skipped:" in r.stderr
    _same_index(clean, out)


def test_rerun_with_other_decode_settings_is_refused(tree, tmp_path):
    """A resumed cache must not mix draft and full decodes: the second run names the stamp file and field."""
    root, _ = tree
    out = tmp_path / "o"
    prep.prepare_mimic(root, root, out, cache_size=32, workers=0, progress=False, draft=False)
    before = sorted(p.name for p in (out / "images_32").rglob("*.jpg"))
    with pytest.raises(ValueError, match=r"cache-params\.json.*'draft'"):
        prep.prepare_mimic(root, root, out, cache_size=32, workers=0, progress=False, draft=True)
    assert sorted(p.name for p in (out / "images_32").rglob("*.jpg")) == before  # nothing written is lost
    prep.prepare_mimic(root, root, out, cache_size=32, workers=0, progress=False, draft=False)  # same settings resume


def test_cli_and_no_cache_points_at_the_jpg_root(tree, tmp_path):
    root, _ = tree
    assert prep.main(["mimic", "--jpg-root", root, "--reports", root, "--out", str(tmp_path / "x"),
                      "--cache-size", "0", "--workers", "0"]) == 0
    idx = SeriesIndex.load(tmp_path / "x")
    assert idx.image_root == os.path.abspath(root) and idx.meta["cache_size"] == 0
    assert all(os.path.isfile(idx.path(s.frontal_path)) for s in idx.studies)
    with open(tmp_path / "x" / "studies.csv") as f:
        assert next(csv.reader(f)) == list(__import__("medst_fast.data.index", fromlist=["x"]).STUDY_COLUMNS)


def test_study_datetime_parses_mimic_float_times():
    assert prep.study_datetime("21590202", "74130.0") == "2159-02-02T07:41:30.000"
    assert prep.study_datetime("21590202", "104610.932") == "2159-02-02T10:46:10.932"
