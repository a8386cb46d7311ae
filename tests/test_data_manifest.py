import os

import pandas as pd
import pytest
import torch
from PIL import Image

from medst_fast.data.dataset import SeriesCollate
from medst_fast.data.manifest import ManifestDataset, index_from_manifest, view_kind


@pytest.fixture(scope="module")
def covid_csv(shared_file):
    return shared_file("data", "covid-cxr", "manifest.csv")


def test_view_kind():
    assert view_kind("PA") == view_kind("AP Supine") == view_kind("frontal") == "frontal"
    assert view_kind("L") == view_kind("LATERAL") == view_kind("lateral") == "lateral"
    assert view_kind("?") is None and view_kind(None) is None and view_kind("unknown") is None


def test_covid_manifest_index(covid_csv, tmp_path):
    df = pd.read_csv(covid_csv)
    idx = index_from_manifest(covid_csv, tmp_path / "i")
    assert idx.meta["skipped"]["unknown_view"] == int((df.view_kind == "unknown").sum())
    assert idx.meta["columns"]["text"] == "clinical_notes"
    assert len(idx.studies) > 100
    long = [s for s in idx.series["train"] if len(s) > 1]
    assert long and any(len(s) == 4 for s in long)
    for ser in long:
        ts = [float(idx.studies[r].study_datetime) for r in ser]
        assert ts == sorted(ts) and len(set(idx.studies[r].subject_id for r in ser)) == 1
    pairs = [s for s in idx.studies if s.lateral_path]
    assert pairs
    for s in pairs:  # frontal and lateral come from the same patient and time
        fr = df[df.file == s.frontal_path].iloc[0]
        la = df[df.file == s.lateral_path].iloc[0]
        assert fr.patient_id == la.patient_id and str(fr.offset_days) == str(la.offset_days)
    for s in idx.studies:
        assert os.path.isfile(idx.path(s.frontal_path))


def test_covid_manifest_batches_are_well_formed(covid_csv, tmp_path, vocab_path):
    from medst_fast import get_tokenizer

    tok = get_tokenizer(vocab_path)
    ds = ManifestDataset(covid_csv, tmp_path / "m", "train", tokenizer=tok, img_size=64, train=True)
    dl = torch.utils.data.DataLoader(ds, batch_size=6, shuffle=True, collate_fn=SeriesCollate(), num_workers=2,
                                     generator=torch.Generator().manual_seed(0))
    seen, full = 0, 0
    for b in dl:
        B = b["frontal"].shape[0]
        assert b["frontal"].shape == (B, 1, 64, 64) and b["frontal"].dtype == torch.float32
        assert b["lateral"].shape == (B, 1, 64, 64) and b["has_lateral"].shape == (B,)
        assert torch.all(b["lateral"][~b["has_lateral"]] == 0)
        assert b["frontal"].abs().max() <= 1
        nf = b["n_full_series"]
        full += nf
        assert b["step"][: nf * 4].tolist() == [0, 1, 2, 3] * nf
        assert torch.all(b["step"][nf * 4:] < 4)
        for name in ("input_ids", "attention_mask", "word_slots"):
            assert b[name].shape == (B, 112) and b[name].dtype == torch.long
        assert torch.all(b["input_ids"][:, 0] == tok.cls_token_id)
        assert len(b["study_id"]) == B
        seen += B
    assert seen == len(ds.index.studies) and full > 0


def test_manifest_with_cache_and_explicit_columns(covid_csv, tmp_path):
    df = pd.read_csv(covid_csv).rename(columns={"patient_id": "pid", "file": "img", "clinical_notes": "note"})
    df["img"] = [os.path.join(os.path.dirname(covid_csv), f) for f in df["img"]]  # absolute paths work too
    df = df.head(60)
    csv = tmp_path / "m.csv"
    df.to_csv(csv, index=False)
    with pytest.raises(ValueError, match="m.csv.*'patient'"):
        index_from_manifest(csv, tmp_path / "bad")
    with pytest.raises(ValueError, match="column 'nope'"):
        index_from_manifest(csv, tmp_path / "bad", columns={"patient": "nope"})
    idx = index_from_manifest(csv, tmp_path / "c", cache_size=48, workers=2,
                              columns={"patient": "pid", "image": "img", "text": "note", "view": "view"})
    assert idx.image_root == str(tmp_path / "c" / "images_48")
    for s in idx.studies:
        assert max(Image.open(idx.path(s.frontal_path)).size) == 48
