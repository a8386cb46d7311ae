"""Bad input to prepare and the loaders: counted, skipped or shortened, never a crash mid-epoch, never misaligned."""
import gzip
import json
import logging
import os
import shutil

import pytest
import torch

from medst_fast.data import prepare as prep
from medst_fast.data import synth
from medst_fast.data.dataset import SeriesDataset, collate_series
from medst_fast.data.index import SeriesIndex


@pytest.fixture(scope="module")
def base_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad") / "tree"
    gt = synth.generate(root, patients=14, seed=9, extras=False, image_size=(80, 64))
    return root, gt


@pytest.fixture
def tree(base_tree, tmp_path):
    root, gt = base_tree
    dst = tmp_path / "tree"
    shutil.copytree(root, dst)
    return dst, gt


def _truncate(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 3])


def _first_full_series(idx):
    return next(s for s in idx.series["train"] if len(s) == 4 and any(idx.studies[r].lateral_path for r in s))


def test_corrupt_frontal_at_prepare_is_counted_and_skipped(tree, tmp_path):
    root, gt = tree
    clean = prep.prepare_mimic(root, root, tmp_path / "a", cache_size=32, workers=0, progress=False)
    victim = clean.studies[5]
    _truncate(os.path.join(root, victim.frontal_path))
    idx = prep.prepare_mimic(root, root, tmp_path / "b", cache_size=32, workers=0, progress=False)
    assert idx.meta["skipped"]["unreadable_image"] == 1
    others = [s for s in gt["studies"][victim.study_id]["views"] if s["view"] in ("PA", "AP") and s["dicom_id"] != victim.frontal_dicom]
    got = [s for s in idx.studies if s.study_id == victim.study_id]
    if others:  # falls back to the other frontal of the study
        assert got and got[0].frontal_dicom == others[0]["dicom_id"]
    else:
        assert not got and idx.meta["skipped"]["no_readable_frontal"] == 1
        assert len(idx.studies) == len(clean.studies) - 1


def test_missing_image_at_prepare_without_cache(tree, tmp_path):
    root, _ = tree
    clean = prep.prepare_mimic(root, root, tmp_path / "a", cache_size=None, workers=0, progress=False)
    with_lat = next(s for s in clean.studies if s.lateral_path)
    os.unlink(os.path.join(root, with_lat.lateral_path))
    idx = prep.prepare_mimic(root, root, tmp_path / "b", cache_size=None, workers=0, progress=False)
    assert idx.meta["skipped"]["missing_image"] == 1
    s = next(s for s in idx.studies if s.study_id == with_lat.study_id)
    assert s.lateral_path == "" and s.frontal_path == with_lat.frontal_path  # kept, without its lateral


def test_empty_report_no_frontal_and_one_study_patient(tree, tmp_path):
    root, gt = tree
    idx = prep.prepare_mimic(root, root, tmp_path / "a", cache_size=None, workers=0, progress=False)
    kept = {s.study_id for s in idx.studies}
    empty = [sid for sid, s in gt["studies"].items() if s["drop"] == "short_report"]
    nofront = [sid for sid, s in gt["studies"].items() if s["drop"] == "no_frontal"]
    # make sure each case is really exercised: turn one more report into an empty one if the seed had none
    if not empty:
        sid = next(iter(kept))
        s = gt["studies"][sid]
        open(os.path.join(root, "files", f"p{s['subject_id'][:2]}", f"p{s['subject_id']}", f"s{sid}.txt"), "w").write(
            "FINAL REPORT\n INDICATION: cough.\n FINDINGS:\n \n IMPRESSION:\n \n")
        idx = prep.prepare_mimic(root, root, tmp_path / "b", cache_size=None, workers=0, progress=False)
        empty, kept = [sid], {s.study_id for s in idx.studies}
    assert empty and not set(empty) & kept
    assert idx.meta["skipped"]["short_report"] == len(empty)
    assert nofront and not set(nofront) & kept and idx.meta["skipped"]["no_frontal"] == len(nofront)
    singles = [p for p, v in gt["patients"].items() if len([x for x in v["studies"] if not gt["studies"][x]["drop"]]) == 1]
    assert singles
    for p in singles:
        rows = [s.row for s in idx.studies if s.subject_id == p]
        assert [rows] in [[list(x)] for spl in idx.series for x in idx.series[spl] if list(x) == rows]


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_bad_frontal_at_load_time_shortens_the_series(tree, tmp_path, caplog, damage):
    root, _ = tree
    idx = prep.prepare_mimic(root, root, tmp_path / "a", cache_size=None, workers=0, progress=False)
    ser = _first_full_series(idx)
    victim = idx.studies[ser[1]]
    p = idx.path(victim.frontal_path)
    _truncate(p) if damage == "truncate" else os.unlink(p)
    ds = SeriesDataset(idx, "train", None, img_size=32, train=False)
    i = idx.series["train"].index(ser)
    with caplog.at_level(logging.WARNING, logger="medst_fast"):
        item = ds[i]
    assert [d["row"] for d in item] == [ser[0], ser[2], ser[3]]
    assert any(victim.frontal_path in r.getMessage() for r in caplog.records)
    assert ds.bad["dropped_study"] == 1 and ds.bad["unreadable_image" if damage == "truncate" else "missing_image"] == 1
    # a whole epoch runs, and each row keeps its own text and lateral
    items = [ds[j] for j in range(len(ds))]
    b = collate_series(items)
    rows = [d["row"] for it in sorted(items, key=lambda it: len(it) != 4) for d in it]
    assert b["text"] == [idx.studies[r].text for r in rows]
    assert b["has_lateral"].tolist() == [bool(idx.studies[r].lateral_path) for r in rows]
    assert victim.row not in rows


def test_bad_lateral_at_load_time_keeps_the_study_without_it(tree, tmp_path):
    root, _ = tree
    idx = prep.prepare_mimic(root, root, tmp_path / "a", cache_size=None, workers=0, progress=False)
    ser = _first_full_series(idx)
    r = next(r for r in ser if idx.studies[r].lateral_path)
    _truncate(idx.path(idx.studies[r].lateral_path))
    ds = SeriesDataset(idx, "train", None, img_size=32, train=False)
    item = ds[idx.series["train"].index(ser)]
    assert [d["row"] for d in item] == ser
    assert next(d for d in item if d["row"] == r)["lateral"] is None
    b = collate_series([item])
    assert not b["has_lateral"][ser.index(r)] and torch.all(b["lateral"][ser.index(r)] == 0)


def test_all_images_bad_gives_an_empty_series_that_collate_skips(tree, tmp_path):
    root, _ = tree
    idx = prep.prepare_mimic(root, root, tmp_path / "a", cache_size=None, workers=0, progress=False)
    ser = idx.series["train"][0]
    for r in ser:
        os.unlink(idx.path(idx.studies[r].frontal_path))
    ds = SeriesDataset(idx, "train", None, img_size=32, train=False)
    assert ds[0] == []
    b = collate_series([ds[0], ds[1]])
    assert b["frontal"].shape[0] == len(ds[1])
    with pytest.raises(ValueError, match="every series in the batch is empty"):
        collate_series([ds[0]])


def test_broken_tables_name_the_file_and_field(tree, tmp_path):
    root, _ = tree
    meta = os.path.join(root, "mimic-cxr-2.0.0-metadata.csv.gz")
    text = gzip.open(meta, "rt").read()
    with gzip.open(meta, "wt") as f:
        f.write(text.replace("ViewPosition", "ViewPos", 1))
    with pytest.raises(ValueError, match=r"metadata\.csv\.gz.*'ViewPosition'"):
        prep.prepare_mimic(root, root, tmp_path / "x", cache_size=None, workers=0, progress=False)
    with gzip.open(meta, "wt") as f:
        f.write(text)
    split = os.path.join(root, "mimic-cxr-2.0.0-split.csv.gz")
    s = gzip.open(split, "rt").read()
    with gzip.open(split, "wt") as f:
        f.write(s.replace(",train\n", ",training\n", 1))
    with pytest.raises(ValueError, match=r"split\.csv\.gz: field 'split' of dicom .* is 'training'"):
        prep.prepare_mimic(root, root, tmp_path / "x", cache_size=None, workers=0, progress=False)
    with gzip.open(split, "wt") as f:
        f.write(s)
    with pytest.raises(FileNotFoundError, match="reports not found"):
        prep.prepare_mimic(root, tmp_path / "nowhere", tmp_path / "x", cache_size=None, workers=0, progress=False)


def test_broken_index_names_the_file(tree, tmp_path):
    root, _ = tree
    out = tmp_path / "a"
    prep.prepare_mimic(root, root, out, cache_size=None, workers=0, progress=False)
    ser = json.load(open(out / "series.json"))
    ser["train"][0][0] = 10**6
    json.dump(ser, open(out / "series.json", "w"))
    with pytest.raises(ValueError, match=r"series\.json.*refers to row 1000000"):
        SeriesIndex.load(out)
    os.unlink(out / "meta.json")
    with pytest.raises(FileNotFoundError, match="meta.json"):
        SeriesIndex.load(out)
