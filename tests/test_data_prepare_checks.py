"""Data preparation never passes broken input silently (an error naming file and field, or a counted skip), and
prepare/manifest share one
cache module instead of importing each other."""
import ast
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medst_fast.data import cache
from medst_fast.data import prepare as prep
from medst_fast.data import synth
from medst_fast.data.index import SeriesIndex
from medst_fast.data.manifest import full_date, index_from_manifest

META = "mimic-cxr-2.0.0-metadata.csv.gz"
SPLIT = "mimic-cxr-2.0.0-split.csv.gz"
REPORT = ("FINAL REPORT\n FINDINGS: Small left pleural effusion is unchanged since the prior study.\n"
          " IMPRESSION: Stable small left effusion, no pneumothorax.\n")


# -- MIMIC-format trees ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel") / "tree"
    synth.generate(root, patients=12, seed=5, extras=False, zip_reports=False, image_size=(72, 60))
    return root


@pytest.fixture
def tree(base_tree, tmp_path):
    dst = tmp_path / "tree"
    shutil.copytree(base_tree, dst)
    return dst


def _table(root, name):
    return pd.read_csv(os.path.join(root, name), dtype=str, keep_default_na=False)


def _write_table(root, name, df):
    with gzip.open(os.path.join(root, name), "wt") as f:
        df.to_csv(f, index=False)


def _img(root, subject, study, dicom):
    return os.path.join(root, "files", f"p{subject[:2]}", f"p{subject}", f"s{study}", f"{dicom}.jpg")


def _report_path(root, subject, study):
    return os.path.join(root, "files", f"p{subject[:2]}", f"p{subject}", f"s{study}.txt")


def _truncate(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 3])


def _prepare(root, out, **kw):
    kw.setdefault("cache_size", None)
    return prep.prepare_mimic(root, root, out, workers=0, progress=False, **kw)


def _add_ap_copy(root, study_row):
    """Give a kept study a second frontal (AP, a copy of its image) after its PA; returns the new dicom id."""
    meta, split = _table(root, META), _table(root, SPLIT)
    src = meta[meta.dicom_id == study_row.frontal_dicom].iloc[0]
    new = src.copy()
    new["dicom_id"], new["ViewPosition"] = "ap-copy-" + src["dicom_id"][:8], "AP"
    shutil.copy(_img(root, src.subject_id, src.study_id, src.dicom_id), _img(root, src.subject_id, src.study_id, new.dicom_id))
    _write_table(root, META, pd.concat([meta, new.to_frame().T], ignore_index=True))
    srow = split[split.dicom_id == src.dicom_id].iloc[0].copy()
    srow["dicom_id"] = new["dicom_id"]
    _write_table(root, SPLIT, pd.concat([split, srow.to_frame().T], ignore_index=True))
    return new["dicom_id"]


def test_no_cache_prepare_decodes_and_prefers_a_readable_frontal(tree, tmp_path):
    clean = _prepare(tree, tmp_path / "a")
    pa = next(s for s in clean.studies if s.frontal_dicom and _table(tree, META).set_index("dicom_id").loc[
        s.frontal_dicom, "ViewPosition"] == "PA")
    ap = _add_ap_copy(tree, pa)
    meta = _table(tree, META)
    n_front = meta[meta.ViewPosition.isin(["PA", "AP"])].groupby("study_id").size()
    alone = next(s for s in clean.studies if s.study_id != pa.study_id and n_front[s.study_id] == 1)
    _truncate(_img(tree, pa.subject_id, pa.study_id, pa.frontal_dicom))
    _truncate(_img(tree, alone.subject_id, alone.study_id, alone.frontal_dicom))
    # the old no-cache check (file exists) kept both corrupt frontals, to be dropped mid-epoch
    idx = _prepare(tree, tmp_path / "b")
    got = {s.study_id: s for s in idx.studies}
    assert got[pa.study_id].frontal_dicom == ap  # the readable AP replaces the corrupt PA
    assert alone.study_id not in got
    assert idx.meta["skipped"]["unreadable_image"] == 2 and idx.meta["skipped"]["no_readable_frontal"] == 1
    for s in idx.studies:  # everything kept decodes
        Image.open(idx.path(s.frontal_path)).load()


def test_blank_or_nan_study_date_is_a_counted_skip(tree, tmp_path):
    clean = _prepare(tree, tmp_path / "a")
    a, b = clean.studies[0], clean.studies[-1]
    meta = _table(tree, META)
    meta.loc[meta.study_id == a.study_id, "StudyDate"] = ""
    meta.loc[meta.study_id == b.study_id, "StudyDate"] = "nan"
    _write_table(tree, META, meta)
    idx = _prepare(tree, tmp_path / "b")  # was a raw "cannot convert float NaN to integer"
    assert idx.meta["skipped"]["missing_study_date"] == 2
    assert {s.study_id for s in idx.studies} == {s.study_id for s in clean.studies} - {a.study_id, b.study_id}
    meta.loc[meta.study_id == a.study_id, "StudyDate"] = "21591340"  # not a calendar date: an error
    _write_table(tree, META, meta)
    with pytest.raises(ValueError, match=r"metadata\.csv\.gz: dicom .*StudyDate '?21591340"):
        _prepare(tree, tmp_path / "c")


def test_study_id_shared_by_two_subjects_keeps_both(tree, tmp_path):
    clean = _prepare(tree, tmp_path / "a")
    first = clean.studies[0]
    other = next(s for s in clean.studies if s.subject_id != first.subject_id)
    meta, split = _table(tree, META), _table(tree, SPLIT)
    # move the other subject's study to the same study id (its images and report follow)
    old_dir = os.path.dirname(_img(tree, other.subject_id, other.study_id, "x"))
    os.rename(old_dir, os.path.dirname(_img(tree, other.subject_id, first.study_id, "x")))
    os.rename(_report_path(tree, other.subject_id, other.study_id), _report_path(tree, other.subject_id, first.study_id))
    for df, name in ((meta, META), (split, SPLIT)):
        df.loc[(df.subject_id == other.subject_id) & (df.study_id == other.study_id), "study_id"] = first.study_id
        _write_table(tree, name, df)
    idx = _prepare(tree, tmp_path / "b")
    both = sorted((s.subject_id, s.frontal_dicom) for s in idx.studies if s.study_id == first.study_id)
    assert both == sorted([(first.subject_id, first.frontal_dicom), (other.subject_id, other.frontal_dicom)])
    assert "missing_image" not in idx.meta["skipped"] and len(idx.studies) == len(clean.studies)


STUDY_LEVEL = ("no_frontal", "no_usable_frontal", "missing_study_date", "missing_study_time", "missing_report",
               "short_report", "no_readable_frontal")


def test_skip_counts_account_for_every_study(tree, tmp_path):
    meta = _table(tree, META)
    extra = meta.iloc[[0, 0]].copy()
    extra["dicom_id"] = ["null-view-1", "null-view-2"]
    extra["study_id"] = "59999999"
    extra["ViewPosition"] = ""  # a study whose only rows have a null ViewPosition
    ms = meta.iloc[[0]].copy()
    ms["dicom_id"], ms["study_id"], ms["ViewPosition"] = "no-split-pa", "59999998", "PA"  # frontal without split
    _write_table(tree, META, pd.concat([meta, extra, ms], ignore_index=True))
    idx = _prepare(tree, tmp_path / "a")
    sk = idx.meta["skipped"]
    all_meta = _table(tree, META)
    n_studies = len(all_meta.groupby(["subject_id", "study_id"]))
    kept = len({(s.subject_id, s.study_id) for s in idx.studies})
    assert kept + sum(sk.get(r, 0) for r in STUDY_LEVEL) == n_studies  # the old counts missed the null-only study
    assert sk["null_view_position"] >= 2 and sk["missing_split"] == 1 and sk["no_usable_frontal"] == 1


def test_nothing_kept_is_an_error_with_no_index(tree, tmp_path):
    for d, _, files in os.walk(os.path.join(tree, "files")):
        for f in files:
            if f.endswith(".txt"):
                os.unlink(os.path.join(d, f))
    with pytest.raises(prep.NothingKept, match=r"no study kept .*missing_report"):
        _prepare(tree, tmp_path / "a")
    assert not (tmp_path / "a" / "meta.json").exists()
    rc = prep.main(["mimic", "--jpg-root", str(tree), "--reports", str(tree), "--out", str(tmp_path / "b"),
                    "--cache-size", "0", "--workers", "0"])
    assert rc == 1 and not (tmp_path / "b" / "meta.json").exists()


def test_index_moved_with_its_cache_still_loads(tree, tmp_path):
    idx = _prepare(tree, tmp_path / "a" / "idx", cache_size=24)
    assert json.load(open(tmp_path / "a" / "idx" / "meta.json"))["image_root"] == "images_24"
    shutil.move(str(tmp_path / "a" / "idx"), str(tmp_path / "moved"))
    moved = SeriesIndex.load(tmp_path / "moved")
    assert moved.image_root == str(tmp_path / "moved" / "images_24")
    for s in moved.studies:
        assert max(Image.open(moved.path(s.frontal_path)).size) == 24
    assert len(moved.studies) == len(idx.studies)
    # without a cache the images stay outside the index folder: stored absolute, so moving the index works too
    _prepare(tree, tmp_path / "n")
    assert json.load(open(tmp_path / "n" / "meta.json"))["image_root"] == os.path.abspath(tree)
    shutil.move(str(tmp_path / "n"), str(tmp_path / "n2"))
    n2 = SeriesIndex.load(tmp_path / "n2")
    assert all(os.path.isfile(n2.path(s.frontal_path)) for s in n2.studies)
    shutil.rmtree(tmp_path / "moved" / "images_24")
    with pytest.raises(FileNotFoundError, match=r"meta\.json: field 'image_root' is 'images_24'"):
        SeriesIndex.load(tmp_path / "moved")


@pytest.mark.parametrize("name", ["series.json", "meta.json"])
def test_truncated_json_names_the_file(tree, tmp_path, name):
    _prepare(tree, tmp_path / "a")
    _truncate(tmp_path / "a" / name)
    with pytest.raises(ValueError, match=rf"{name}: not valid JSON"):
        SeriesIndex.load(tmp_path / "a")
    (tmp_path / "a" / name).write_text("[1, 2]")
    with pytest.raises(ValueError, match=rf"{name}: expected an object"):
        SeriesIndex.load(tmp_path / "a")


# -- manifests -----------------------------------------------------------------------------------------
def _gray(path, level, size=(40, 48)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    a = np.full(size, level, dtype=np.uint8)
    a[5:15, 5:20] = 255 - level
    Image.fromarray(a).save(path)


def _write_dicom(path, level):
    from _loader_index import write_dicom

    a = np.full((50, 40), level * 16, dtype=np.uint16)
    a[10:20, :] = 4000
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_dicom(path, a)


def _manifest(path, rows, time_col="offset"):
    cols = ["patientid", time_col, "view", "filename", "clinical_notes"]
    pd.DataFrame(rows, columns=cols).to_csv(path, index=False)
    return path


NOTE = "Bilateral patchy opacities, worse than before."


def test_offset_column_orders_a_patients_studies(tmp_path):
    rows = []
    for p in ("p1", "p2"):
        for k, off in enumerate(("12", "0", "5", "30", "")):
            f = f"images/{p}_{k}.png"
            _gray(str(tmp_path / f), 40 + 30 * k)
            rows.append((p, off, "PA", f, NOTE))
    idx = index_from_manifest(_manifest(tmp_path / "m.csv", rows), tmp_path / "i")
    assert idx.meta["columns"]["time"] == "offset"
    timed = [s for s in idx.series["train"] if len(s) > 1]
    assert len(timed) == 2  # one series per patient; the old code ignored 'offset' and made series of one
    for ser in timed:
        assert [float(idx.studies[r].study_datetime) for r in ser] == [0.0, 5.0, 12.0, 30.0]
    assert idx.meta["counts"]["untimed_studies"] == 2


def test_dates_that_are_not_full_dates_are_errors(tmp_path):
    rows, files = [], []
    for k, when in enumerate(("March 2, 2020", "Mar 20, 2020", "2020-03-14")):
        f = f"images/d{k}.png"
        _gray(str(tmp_path / f), 30 + 40 * k)
        rows.append(("7", when, "PA", f, NOTE))
    idx = index_from_manifest(_manifest(tmp_path / "d.csv", rows, time_col="date"), tmp_path / "i")
    ser = next(s for s in idx.series["train"] if len(s) == 3)
    # by date, not as text (text order would put "2020-03-14" first and "March 2" last)
    assert [idx.studies[r].frontal_path for r in ser] == ["images/d0.png", "images/d2.png", "images/d1.png"]
    assert idx.studies[ser[0]].study_datetime == "2020-03-02T00:00:00"
    bad = rows + [("7", "2015", "PA", "images/d0.png", NOTE)]  # a year alone merges every 2015 image
    with pytest.raises(ValueError, match=r"d2\.csv: column 'date' on data line 4 is '2015', not a full date"):
        index_from_manifest(_manifest(tmp_path / "d2.csv", bad, time_col="date"), tmp_path / "j")
    mixed = [("7", "3", "PA", "images/d0.png", NOTE), ("7", "9", "PA", "images/d1.png", NOTE),
             ("7", "Mar 14, 2020", "PA", "images/d2.png", NOTE)]  # a date among offsets was silently untimed
    with pytest.raises(ValueError, match=r"column 'offset' on data line 3 is 'Mar 14, 2020', not a number"):
        index_from_manifest(_manifest(tmp_path / "d3.csv", mixed), tmp_path / "k")
    assert not (tmp_path / "j" / "meta.json").exists() and not (tmp_path / "k" / "meta.json").exists()
    unknown = mixed[:2] + [("7", "?", "PA", "images/d2.png", NOTE)]  # unknown markers mean untimed, counted
    u = index_from_manifest(_manifest(tmp_path / "d4.csv", unknown), tmp_path / "u")
    assert u.meta["counts"]["unknown_times"] == 1 and u.meta["counts"]["untimed_studies"] == 1
    assert full_date("20200314") is not None and full_date("2020-03") is None and full_date("03/14/2020") is None


def test_cache_names_do_not_collide_and_dicoms_are_cached(tmp_path):
    pytest.importorskip("pydicom")
    _gray(str(tmp_path / "img" / "x.png"), 20)   # patient A
    _gray(str(tmp_path / "img" / "x.jpg"), 230)  # patient B: same name, other extension, other image
    _write_dicom(str(tmp_path / "img" / "c.dcm"), 100)
    _gray(str(tmp_path.parent / f"{tmp_path.name}_outside" / "img" / "x.png"), 120)  # outside the image root
    outside = str(tmp_path.parent / f"{tmp_path.name}_outside" / "img" / "x.png")
    rows = [("A", "1", "PA", "img/x.png", NOTE), ("B", "1", "PA", "img/x.jpg", NOTE),
            ("C", "1", "PA", "img/c.dcm", NOTE), ("D", "1", "PA", outside, NOTE)]
    idx = index_from_manifest(_manifest(tmp_path / "m.csv", rows), tmp_path / "i", cache_size=32)
    assert "unreadable_image" not in idx.meta["skipped"]  # the DICOM used to be counted unreadable
    by_patient = {s.subject_id: s for s in idx.studies}
    assert sorted(by_patient) == ["A", "B", "C", "D"]
    paths = {p: idx.path(s.frontal_path) for p, s in by_patient.items()}
    assert len(set(paths.values())) == 4  # x.png and x.jpg used to share one cache file
    means = {p: np.asarray(Image.open(f)).mean() for p, f in paths.items()}
    assert means["A"] < 80 < means["D"] < 180 < means["B"]  # each patient trains on its own image
    assert max(Image.open(paths["C"]).size) == 32
    names = [cache.cache_name(r, "/data") for r in ("x.png", "x.jpg", "x.png.jpg", "/data/x.png", "__/x.png",
                                                     "../x.png", "/elsewhere/x.png")]
    assert len(set(names)) == len(names) - 1 and names[0] == names[3]  # the same file, however it is named


def test_manifest_with_nothing_readable_is_an_error(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    m = _manifest(tmp_path / "m.csv", [("1", "0", "PA", "images/bad.jpg", NOTE), ("1", "3", "PA", "images/gone.png", NOTE)])
    with pytest.raises(ValueError, match=r"m\.csv: no study kept .*missing_image.*unreadable_image"):
        index_from_manifest(m, tmp_path / "i")
    assert prep.main(["manifest", "--csv", str(m), "--out", str(tmp_path / "j"), "--workers", "0"]) == 1
    assert not (tmp_path / "j" / "meta.json").exists()


# -- the worker pool -----------------------------------------------------------------------------------
def _children(pid):
    out = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out |= {int(c) for c in open(f"/proc/{pid}/task/{tid}/children").read().split()}
        except OSError:
            pass
    return out


def _alive(pid):
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has already exited


# A prepare run whose image jobs each take a while (same code path; the sleep keeps it running long enough
# to be signalled mid-cache). The pool forks, so the workers inherit the slowed function.
_DRIVER = """
import multiprocessing, sys, time
multiprocessing.set_start_method("fork")
from medst_fast.data import cache, prepare
real = cache.check_or_cache
def slow(*a):
    time.sleep(0.3)
    return real(*a)
cache.check_or_cache = slow
sys.exit(prepare.main(sys.argv[1:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads worker pids from /proc (Linux)")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_pool_workers_do_not_outlive_prepare(base_tree, tmp_path, sig):
    cmd = [sys.executable, "-c", _DRIVER, "mimic", "--jpg-root", str(base_tree), "--reports", str(base_tree),
           "--out", str(tmp_path / "o"), "--cache-size", "24", "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline, workers = time.time() + 120, set()
        while time.time() < deadline and proc.poll() is None and len(workers) < 2:
            workers = _children(proc.pid)
            time.sleep(0.05)
        assert proc.poll() is None and len(workers) >= 2, "the pool did not start"
        os.kill(proc.pid, sig)  # the parent only, as a scheduler or the OOM killer would
        rc = proc.wait(timeout=60)
        deadline = time.time() + 30
        while time.time() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.05)
        assert not any(_alive(w) for w in workers), "pool workers outlived the prepare process"
        err = proc.stderr.read().decode()
        if sig == signal.SIGTERM:
            assert rc == 128 + signal.SIGTERM, err
            assert "interrupted by signal" in err
        assert not (tmp_path / "o" / "meta.json").exists()
    finally:
        try:  # whatever is left of our own child's session (the workers, if this test failed)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def test_an_exception_in_a_worker_terminates_the_pool(base_tree, tmp_path, monkeypatch):
    import multiprocessing as mp

    real = cache.check_or_cache

    def flaky(src, *a):
        if src.endswith(sorted_srcs[5]):
            raise RuntimeError("simulated failure in a worker")
        time.sleep(0.05)
        return real(src, *a)

    idx = _prepare(base_tree, tmp_path / "clean")
    sorted_srcs = sorted(s.frontal_path for s in idx.studies)
    monkeypatch.setattr(cache, "check_or_cache", flaky)  # inherited by the forked workers
    ctx_method = mp.get_start_method(allow_none=True)
    if ctx_method not in (None, "fork"):
        pytest.skip("needs fork workers to inherit the patched function")
    before = {p.pid for p in mp.active_children()}  # children of earlier tests in this process are not ours
    with pytest.raises(RuntimeError, match="simulated failure"):
        prep.prepare_mimic(base_tree, base_tree, tmp_path / "o", cache_size=24, workers=2, progress=False)
    assert not [p for p in mp.active_children() if p.is_alive() and p.pid not in before]  # no worker left running


# -- the import cycle ----------------------------------------------------------------------------------
def _imports(module_file):
    tree = ast.parse(open(module_file).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names.add(("." * node.level) + (node.module or ""))
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return names


def test_manifest_and_prepare_do_not_import_each_other():
    d = os.path.dirname(prep.__file__)
    assert not {n for n in _imports(os.path.join(d, "manifest.py")) if n.endswith("prepare")}
    assert not {n for n in _imports(os.path.join(d, "cache.py")) if n.endswith(("prepare", "manifest"))}
    code = "import sys, medst_fast.data.manifest; print('medst_fast.data.prepare' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_manifest_skip_counts_account_for_every_study(tmp_path):
    rows = []
    for k, (off, view) in enumerate((("0", "PA"), ("0", "L"), ("4", "unknown"), ("9", "PA"), ("9", "?"))):
        f = f"images/s{k}.png"
        _gray(str(tmp_path / f), 40 + 30 * k)
        rows.append(("p", off, view, f, NOTE))
    idx = index_from_manifest(_manifest(tmp_path / "m.csv", rows), tmp_path / "i")
    sk = idx.meta["skipped"]
    # offsets 0 and 9 are kept; offset 4 had only an unknown view: the old counts never mentioned the study
    assert sorted(s.study_datetime for s in idx.studies) == ["0.0", "9.0"]
    assert sk["unknown_view"] == 2 and sk["no_frontal"] == 1
