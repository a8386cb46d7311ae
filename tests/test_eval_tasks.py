"""End to end: each evaluation task on tiny files written here in the real formats, with medst_tiny.

The numbers are checked against the same protocol computed directly (embeddings from a plain forward,
sklearn for the classifier/metric), so a wiring error (pair order, wrong image, split) fails.
"""
import os
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import medst_fast
from medst_fast.eval import common, covidx_probe, msxrt_image, msxrt_sentence, rsna_zeroshot
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _loader_index import write_dicom  # noqa: E402

FINDINGS = msxrt_image.FINDINGS
PROG = ["improving", "stable", "worsening"]


# -- writers for the real formats ------------------------------------------------------------------
def _save_jpg(path, arr):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path, quality=95)


def _image(rng, level, h=72, w=60):
    a = rng.normal(60, 20, (h, w))
    a[h // 4: h // 2, w // 4: 3 * w // 4] += level
    return np.clip(a, 0, 255).astype(np.uint8)


def write_msxrt(root, n=24, seed=0):
    """MIMIC-CXR-JPG tree + metadata CSV at ``root``; the MS-CXR-T CSV in root/ms-cxr-t/."""
    rng = np.random.default_rng(seed)
    meta, rows = [], []
    for i in range(n):
        subj, cur_s, prev_s = 10000000 + i, 50000000 + 2 * i, 50000000 + 2 * i + 1
        cur, prev = f"{i:08x}-cur", f"{i:08x}-prv"
        for d, s, lvl in ((cur, cur_s, 40 * (i % 3)), (prev, prev_s, 40)):
            _save_jpg(os.path.join(root, "files", f"p{str(subj)[:2]}", f"p{subj}", f"s{s}", f"{d}.jpg"),
                      _image(rng, lvl))
            meta.append((d, subj, s, "PA"))
        labels = [PROG[i % 3] if (i + j) % 2 == 0 else "" for j in range(len(FINDINGS))]
        rows.append([cur, prev, cur_s, subj] + labels)
    pd.DataFrame(meta, columns=["dicom_id", "subject_id", "study_id", "ViewPosition"]).to_csv(
        os.path.join(root, "mimic-cxr-2.0.0-metadata.csv"), index=False)
    d = os.path.join(root, "ms-cxr-t")
    os.makedirs(d, exist_ok=True)
    cols = ["dicom_id", "previous_dicom_id", "study_id", "subject_id"] + [f"{f}_progression" for f in FINDINGS]
    path = os.path.join(d, msxrt_image.CSV_NAME)
    pd.DataFrame(rows, columns=cols).to_csv(path, index=False)
    return path


SENTENCES = [
    ("Small right pleural effusion has increased.", "Interval increase in right effusion.", "paraphrase"),
    ("Small right pleural effusion has increased.", "Right effusion has decreased.", "contradiction"),
    ("Edema is unchanged.", "Stable pulmonary edema.", "paraphrase"),
    ("Edema is unchanged.", "Worsening pulmonary edema.", "contradiction"),
    ("Left lower lobe consolidation is improving.", "Improving left consolidation.", "paraphrase"),
    ("Left lower lobe consolidation is improving.", "Left consolidation is worse.", "contradiction"),
    ("Pneumothorax has resolved.", "No residual pneumothorax.", "paraphrase"),
    ("Pneumothorax has resolved.", "Pneumothorax is larger.", "contradiction"),
    ("Heart size is stable. No new effusion.", "Unchanged heart size. No effusion.", "paraphrase"),
    ("Heart size is stable. No new effusion.", "New effusion.", "contradiction"),
]


def write_sentences(path, header=("subset_name", "sentence_1", "sentence_2", "category")):
    rows = [("RadGraph", a, b, c) for a, b, c in SENTENCES * 2]
    rows += [("CheXpert", "New edema.", "Edema is new.", "paraphrase")] * 3
    pd.DataFrame(rows, columns=list(header)).to_csv(path, index=False)
    return path




def write_rsna(d, n=60, seed=0):
    rng = np.random.default_rng(seed)
    img_dir = os.path.join(d, "stage_2_train_images")
    os.makedirs(img_dir, exist_ok=True)
    rows = []
    for i in range(n):
        pid = f"{rng.integers(0, 2**32):08x}-{i:04d}"
        target = i % 2
        if target:  # positives: one label row per box, one or two boxes
            for _ in range(1 + i % 3 // 2):
                rows.append((pid, 100.0, 200.0, 50.0, 60.0, 1))
        else:
            rows.append((pid, None, None, None, None, 0))
        a = (_image(rng, 120 * target, 64, 64).astype(np.uint16) * 16)
        write_dicom(os.path.join(img_dir, pid + ".dcm"), 4095 - a if i % 5 == 0 else a, mono1=i % 5 == 0)
    df = pd.DataFrame(rows, columns=["patientId", "x", "y", "width", "height", "Target"])
    df.to_csv(os.path.join(d, rsna_zeroshot.LABELS_CSV), index=False)
    return d


def write_covidx(d, n_train=30, n_test=9, seed=0):
    rng = np.random.default_rng(seed)
    labels = ["normal", "pneumonia", "COVID-19"]
    for split, n in (("train", n_train), ("test", n_test)):
        lines = []
        for i in range(n):
            lab = i % 3
            fname = f"{split}_{i:03d}.png"
            _save_jpg(os.path.join(d, split, fname), _image(rng, 90 * lab, 80, 64))
            lines.append(f"{500 + i} {fname} {labels[lab]} synth\n")
        with open(os.path.join(d, f"{split}.txt"), "w") as f:
            f.writelines(lines)
    return d


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return medst_fast.create_model("medst_tiny").eval()


def _direct_embed(model, paths):
    x = torch.stack([common.eval_transform(common.read_image(p), model.cfg.vision.img_size) for p in paths])
    with torch.no_grad():
        return model.encode_image(x).numpy()


# -- MS-CXR-T image --------------------------------------------------------------------------------
def test_msxrt_image_end_to_end_matches_direct_protocol(tmp_path, model):
    ms = pytest.importorskip("sklearn.model_selection")
    svm = pytest.importorskip("sklearn.svm")
    csv = write_msxrt(str(tmp_path))
    res = msxrt_image.evaluate(model, csv, [os.path.dirname(csv)], seeds=(42, 100), folds=(2, 3), batch_size=7)
    assert len(res.rows) == 2 * 6 * 2  # folds x (5 findings + average) x (accuracy, macro)
    df = pd.read_csv(csv, dtype=str)
    f = "edema"
    accs = []
    for seed in (42, 100):
        sub = df.sample(frac=1, random_state=seed).dropna(subset=[f"{f}_progression"])
        ids = list(sub["dicom_id"]) + list(sub["previous_dicom_id"])
        paths = [os.path.join(tmp_path, "files", f"p{s[:2]}", f"p{s}", f"s{st}", f"{d}.jpg")
                 for d, s, st in zip(ids, list(sub["subject_id"]) * 2,
                                     list(sub["study_id"]) + [str(int(x) + 1) for x in sub["study_id"]])]
        e = _direct_embed(model, paths)
        X = np.concatenate([e[: len(sub)], e[len(sub):]], axis=1)
        y = sub[f"{f}_progression"].map(msxrt_image.LABELS).to_numpy()
        accs.append(ms.cross_val_score(svm.SVC(kernel="linear"), X, y, cv=3).mean())
    assert res.get(f, "accuracy_cv3") == pytest.approx(np.mean(accs), abs=1e-6)
    for r in res.rows:
        assert 0.0 <= r["value"] <= 1.0


def _add_laterals(root, every=2, seed=1):
    """A LATERAL image for every ``every``-th MS-CXR-T study (current and previous), added to the metadata."""
    rng = np.random.default_rng(seed)
    md_path = os.path.join(root, "mimic-cxr-2.0.0-metadata.csv")
    md = pd.read_csv(md_path, dtype=str)
    rows = []
    for k, (d, subj, study) in enumerate(zip(md.dicom_id, md.subject_id, md.study_id)):
        if k % every == 0:
            lat = d + "-lat"
            _save_jpg(os.path.join(root, "files", f"p{subj[:2]}", f"p{subj}", f"s{study}", f"{lat}.jpg"),
                      _image(rng, 80 * (k % 3)))
            rows.append((lat, subj, study, "LATERAL"))
    md = pd.concat([md, pd.DataFrame(rows, columns=md.columns)])
    md.to_csv(md_path, index=False)
    return {r[2]: r[0] for r in rows}


def test_msxrt_image_study_views_use_the_lateral(tmp_path, model):
    ms = pytest.importorskip("sklearn.model_selection")
    svm = pytest.importorskip("sklearn.svm")
    csv = write_msxrt(str(tmp_path))
    lat_of_study = _add_laterals(str(tmp_path))
    res = msxrt_image.evaluate(model, csv, [str(tmp_path)], seeds=(42,), folds=(3,), batch_size=5, views="study")
    df = pd.read_csv(csv, dtype=str)
    assert res.meta["views"] == "study" and res.meta["laterals"] == len(lat_of_study) > 0
    f = "pleural_effusion"
    sub = df.sample(frac=1, random_state=42).dropna(subset=[f"{f}_progression"])
    S = model.cfg.vision.img_size

    def study_embed(ids, studies, subjects):
        xf, xl, has = [], [], []
        for d, st, sj in zip(ids, studies, subjects):
            folder = os.path.join(tmp_path, "files", f"p{sj[:2]}", f"p{sj}", f"s{st}")
            xf.append(common.eval_transform(common.read_image(os.path.join(folder, f"{d}.jpg")), S))
            lat = lat_of_study.get(st)
            xl.append(common.eval_transform(common.read_image(os.path.join(folder, f"{lat}.jpg")), S) if lat
                      else torch.zeros_like(xf[-1]))
            has.append(lat is not None)
        with torch.no_grad():
            return model.encode_image(torch.stack(xf), torch.stack(xl), torch.tensor(has)).numpy()

    cur = study_embed(sub.dicom_id, sub.study_id, sub.subject_id)
    prev = study_embed(sub.previous_dicom_id, [str(int(x) + 1) for x in sub.study_id], sub.subject_id)
    X, y = np.concatenate([cur, prev], axis=1), sub[f"{f}_progression"].map(msxrt_image.LABELS).to_numpy()
    want = ms.cross_val_score(svm.SVC(kernel="linear"), X, y, cv=3).mean()
    assert res.get(f, "accuracy_cv3") == pytest.approx(want, abs=1e-6)
    # the lateral changes the features: the frontal-only run differs on at least one finding
    fr = msxrt_image.evaluate(model, csv, [str(tmp_path)], seeds=(42,), folds=(3,), batch_size=5)
    assert fr.meta["views"] == "frontal" and fr.meta["laterals"] == 0
    cfg = model.cfg.to_dict()
    cfg["vision"]["lateral_expert"] = False
    frontal_only = medst_fast.MedST(type(model.cfg).from_dict(cfg)).eval()
    with pytest.raises(ValueError, match="lateral expert"):
        msxrt_image.evaluate(frontal_only, csv, [str(tmp_path)], seeds=(42,), folds=(3,), views="study")
    with pytest.raises(ValueError, match="views"):
        msxrt_image.evaluate(model, csv, [str(tmp_path)], views="both")


def test_msxrt_csv_errors_name_file_and_field(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("dicom_id,previous_dicom_id,study_id,subject_id,consolidation_progression,edema_progression,"
                 "pleural_effusion_progression,pneumonia_progression,pneumothorax_progression\n"
                 "a,b,1,2,better,,,,\n")
    with pytest.raises(ValueError, match=r"bad.csv.*consolidation_progression.*row 2"):
        msxrt_image.read_csv(p)
    p.write_text("dicom_id,study_id\na,1\n")
    with pytest.raises(ValueError, match="previous_dicom_id"):
        msxrt_image.read_csv(p)


# -- MS-CXR-T sentences ----------------------------------------------------------------------------
def test_sentence_cleaning_join():
    s = ["Effusion is larger. No pneumothorax."]
    assert msxrt_sentence.clean(s) == ["effusion is larger no pneumothorax"]
    assert msxrt_sentence.clean(s, official_join=True) == ["effusion is largerno pneumothorax"]


def test_sentence_reader_by_name_and_by_position(tmp_path):
    a = write_sentences(str(tmp_path / "a.csv"))
    s1, s2, y = msxrt_sentence.read_pairs(a)
    assert len(y) == 20 and y.sum() == 10 and s1[0] == SENTENCES[0][0] and s2[1] == SENTENCES[1][1]
    # different header names: columns 1-3 by position, as the official itertuples() row[2:5]
    b = write_sentences(str(tmp_path / "b.csv"), header=("subset_name", "s1", "s2", "cat"))
    s1b, s2b, yb = msxrt_sentence.read_pairs(b)
    assert s1b == s1 and s2b == s2 and np.array_equal(yb, y)
    # the extra-column layout with names (e.g. a study_id column before the sentences)
    c = tmp_path / "c.csv"
    df = pd.read_csv(a)
    df.insert(1, "study_id", range(len(df)))
    df.to_csv(c, index=False)
    assert msxrt_sentence.read_pairs(c)[0] == s1
    assert len(msxrt_sentence.read_pairs(a, subset="all")[2]) == 23
    with pytest.raises(ValueError, match="subset_name == 'nope'"):
        msxrt_sentence.read_pairs(a, subset="nope")
    df.loc[3, "category"] = "neutral"
    df.to_csv(c, index=False)
    with pytest.raises(ValueError, match=r"c.csv.*category.*row 5"):
        msxrt_sentence.read_pairs(c)


def test_msxrt_sentence_end_to_end(tmp_path, model, vocab_path):
    sk = pytest.importorskip("sklearn.metrics")
    tok = common.load_tokenizer(vocab_path, model)
    csv = write_sentences(str(tmp_path / msxrt_sentence.CSV_NAME))
    res = msxrt_sentence.evaluate(model, tok, csv)
    s1, s2, y = msxrt_sentence.read_pairs(csv)
    with torch.no_grad():
        e1 = model.encode_text(**{k: v for k, v in tok(msxrt_sentence.clean(s1)).items() if k != "word_slots"})
        e2 = model.encode_text(**{k: v for k, v in tok(msxrt_sentence.clean(s2)).items() if k != "word_slots"})
    sim = (e1 * e2).sum(-1).numpy()
    assert res.get("RadGraph", "auroc") == pytest.approx(sk.roc_auc_score(y, sim), abs=1e-6)
    from medst_fast.eval.metrics import honest_threshold_accuracy, official_threshold_accuracy

    assert res.get("RadGraph", "accuracy_official") == pytest.approx(official_threshold_accuracy(sim, y)[0])
    assert res.get("RadGraph", "accuracy_cv10") == pytest.approx(honest_threshold_accuracy(sim, y)[0])
    off = msxrt_sentence.evaluate(model, tok, csv, official_join=True)
    assert off.meta["join"].startswith('""')


# -- RSNA ------------------------------------------------------------------------------------------
def test_read_dicom_by_hand(tmp_path):
    a = np.array([[0, 100], [300, 400]], np.uint16)
    write_dicom(str(tmp_path / "m2.dcm"), a)
    write_dicom(str(tmp_path / "m1.dcm"), a, mono1=True)
    # 255/400 scale: 0, 63.75 -> 64, 191.25 -> 191, 255; MONOCHROME1 then inverted (255 - x)
    assert common.read_image(tmp_path / "m2.dcm").tolist() == [[0, 64], [191, 255]]
    assert common.read_image(tmp_path / "m1.dcm").tolist() == [[255, 191], [64, 0]]
    write_dicom(str(tmp_path / "z.dcm"), np.zeros((2, 2), np.uint16))
    assert common.read_image(tmp_path / "z.dcm").tolist() == [[0, 0], [0, 0]]


def test_rsna_official_split(tmp_path):
    ms = pytest.importorskip("sklearn.model_selection")
    d = write_rsna(str(tmp_path), n=60)
    sp = rsna_zeroshot.official_split(os.path.join(d, rsna_zeroshot.LABELS_CSV))
    assert (len(sp["train"]), len(sp["test"]), len(sp["valid"])) == (42, 9, 9)
    raw = pd.read_csv(os.path.join(d, rsna_zeroshot.LABELS_CSV))
    pids = sorted(raw["patientId"].unique())  # pandas groupby order
    tgt = [int(raw.loc[raw.patientId == p, "Target"].max()) for p in pids]
    _, tv = ms.train_test_split(list(zip(pids, tgt)), test_size=0.3, random_state=0)
    test, valid = ms.train_test_split(tv, test_size=0.5, random_state=0)
    assert list(sp["test"]["patientId"]) == [p for p, _ in test]
    assert list(sp["valid"]["Target"]) == [t for _, t in valid]
    assert set(sp["train"]["patientId"]).isdisjoint(sp["test"]["patientId"])


def test_rsna_zeroshot_end_to_end(tmp_path, model, vocab_path):
    d = write_rsna(str(tmp_path), n=60)
    tok = common.load_tokenizer(vocab_path, model)
    res = rsna_zeroshot.evaluate(model, tok, d, split="all", batch_size=16)
    assert res.meta["images"] == 60
    # direct: prompts -> unnormalised embeddings -> mean -> normalise; images -> normalised embeddings
    sp = rsna_zeroshot.official_split(os.path.join(d, rsna_zeroshot.LABELS_CSV))
    df = pd.concat([sp["train"], sp["valid"], sp["test"]])
    img = _direct_embed(model, [os.path.join(d, "stage_2_train_images", p + ".dcm") for p in df["patientId"]])

    def cls(prompts):
        enc = tok([msxrt_sentence.clean([p])[0] for p in prompts])
        with torch.no_grad():
            e = model.encode_text(enc["input_ids"], enc["attention_mask"], normalize=False)
        m = e.mean(0)
        return (m / m.norm()).numpy()

    pos, neg = img @ cls(rsna_zeroshot.POSITIVE_PROMPTS), img @ cls(rsna_zeroshot.NEGATIVE_PROMPTS)
    y = df["Target"].to_numpy()
    pred = pos > neg
    assert res.get("all", "accuracy") == pytest.approx(np.mean(pred == y), abs=1e-9)
    from medst_fast.eval.metrics import auroc, balanced_accuracy

    assert res.get("all", "auroc") == pytest.approx(auroc(y, pos - neg), abs=1e-5)
    assert res.get("all", "auroc_hard_official") == pytest.approx(balanced_accuracy(y, pred.astype(int)))
    test = rsna_zeroshot.evaluate(model, tok, d)  # default: the official test split
    assert test.meta["images"] == 9


def test_rsna_custom_prompts(tmp_path, model, vocab_path):
    import json

    d = write_rsna(str(tmp_path), n=40)
    tok = common.load_tokenizer(vocab_path, model)
    pos_p, neg_p = ["There is a large right pneumonia."], ["No pneumonia.", "Lungs are clear."]
    f = tmp_path / "prompts.json"
    f.write_text(json.dumps({"positive": pos_p, "negative": neg_p}))
    assert rsna_zeroshot.read_prompts(f) == (pos_p, neg_p)
    res = rsna_zeroshot.evaluate(model, tok, d, split="all", prompts=(pos_p, neg_p))
    assert res.meta["prompts"] == "custom"
    sp = rsna_zeroshot.official_split(os.path.join(d, rsna_zeroshot.LABELS_CSV))
    df = pd.concat([sp["train"], sp["valid"], sp["test"]])
    img = _direct_embed(model, [os.path.join(d, "stage_2_train_images", p + ".dcm") for p in df["patientId"]])
    score = img @ rsna_zeroshot.class_embedding(model, tok, pos_p).numpy() - img @ rsna_zeroshot.class_embedding(
        model, tok, neg_p).numpy()
    from medst_fast.eval.metrics import auroc

    assert res.get("all", "auroc") == pytest.approx(auroc(df["Target"].to_numpy(), score), abs=1e-5)
    biovil = rsna_zeroshot.evaluate(model, tok, d, split="all")
    assert biovil.get("all", "auroc") != pytest.approx(res.get("all", "auroc"), abs=1e-9)
    for bad, field in (({"positive": ["a"]}, "negative"), ({"positive": [], "negative": ["b"]}, "positive"),
                       ({"positive": ["a"], "negative": [""]}, "negative")):
        f.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=rf"prompts.json.*'{field}'"):
            rsna_zeroshot.read_prompts(f)
    f.write_text("{not json")
    with pytest.raises(ValueError, match="prompts.json"):
        rsna_zeroshot.read_prompts(f)


def test_rsna_bad_labels(tmp_path):
    p = tmp_path / rsna_zeroshot.LABELS_CSV
    p.write_text("patientId,x,y,width,height,Target\na,,,,,2\n")
    with pytest.raises(ValueError, match="Target"):
        rsna_zeroshot.official_split(p)


# -- COVIDx ----------------------------------------------------------------------------------------
def test_covidx_reader_and_splits(tmp_path):
    d = write_covidx(str(tmp_path))
    sp = covidx_probe.official_splits(d, 0.5)
    assert (len(sp["train"]), len(sp["valid"]), len(sp["test"])) == (12, 6, 9)
    full = covidx_probe.official_splits(d, 1.0)
    assert set(sp["train"]["filename"]) <= set(full["train"]["filename"])
    assert sorted(full["test"]["labels"].unique()) == [0, 1, 2]
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "train.txt").write_text("1 a.png positive rsna\n")
    with pytest.raises(ValueError, match=r"train.txt: line 1: label 'positive'"):
        covidx_probe.read_list(tmp_path / "bin" / "train.txt")
    with pytest.raises(ValueError, match="too few"):
        covidx_probe.official_splits(d, 0.01)


def test_train_head_separable_features_and_early_stopping():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=g) * 4

    def make(n):
        y = torch.arange(n) % 3
        return centers[y] + torch.randn(n, 16, generator=g), y

    xtr, ytr = make(60)
    xva, yva = make(30)
    xte, yte = make(30)
    # batch 8: enough optimizer steps at lr 5e-4 to separate 60 points
    head = covidx_probe.train_head(xtr, ytr, xva, yva, max_epochs=100, patience=5, batch_size=8)
    assert (head(xte).argmax(-1) == yte).float().mean().item() == 1.0
    # validation labels that contradict training: the first epochs are the best, training stops early
    calls = []
    orig = torch.nn.functional.cross_entropy

    def spy(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    torch.nn.functional.cross_entropy = spy
    try:
        covidx_probe.train_head(xtr, ytr, xva, (yva + 1) % 3, max_epochs=100, patience=3, batch_size=60)
    finally:
        torch.nn.functional.cross_entropy = orig
    assert len(calls) < 2 * 100  # one train batch + one validation per epoch; stopped well before 100 epochs


def test_covidx_probe_end_to_end(tmp_path, model):
    d = write_covidx(str(tmp_path))
    res = covidx_probe.evaluate(model, d, pcts=(0.5, 1.0), max_epochs=20, patience=5)
    assert [r["subset"] for r in res.rows] == ["50%", "100%"]
    assert res.rows[0]["note"] == "12 training images" and res.rows[1]["n"] == 9
    for r in res.rows:
        assert 0.0 <= r["value"] <= 1.0
    # the image features the probe used are the model's final-LN CLS
    p = os.path.join(d, "test", "test_000.png")
    f = common.embed_images(model, [p], fn=lambda m, x: m.image_features(x))
    assert f.shape == (1, model.cfg.vision.width)


# -- CLI -------------------------------------------------------------------------------------------
def test_cli_writes_table(tmp_path, model, vocab_path):
    from medst_fast.eval.__main__ import main

    medst_fast.save_pretrained(model, tmp_path / "ckpt")
    csv = write_sentences(str(tmp_path / msxrt_sentence.CSV_NAME))
    res = main(["msxrt-sentence", "--checkpoint", str(tmp_path / "ckpt"), "--vocab", vocab_path,
                "--data", str(tmp_path), "--out", str(tmp_path / "out"), "--device", "cpu"])
    md = open(tmp_path / "out" / "msxrt_sentence.md").read()
    assert "accuracy_official" in md and "msxrt-sentence --checkpoint" in md
    rows = pd.read_csv(tmp_path / "out" / "msxrt_sentence.csv")
    assert set(rows["metric"]) == {"auroc", "accuracy_official", "accuracy_cv10"}
    assert rows.loc[rows.metric == "auroc", "value"].item() == pytest.approx(res.get("RadGraph", "auroc"))
    # the random-init baseline is the same evaluation on a seeded random model of this config
    from medst_fast.eval import common as EC

    tok = EC.load_tokenizer(vocab_path, model)
    ref = msxrt_sentence.evaluate(EC.random_baseline(model, 0), tok, csv)
    assert rows.loc[rows.metric == "auroc", "baseline"].item() == pytest.approx(ref.get("RadGraph", "auroc"))
    assert rows.loc[rows.metric == "auroc", "chance"].item() == 0.5
    # --no-baseline skips it, and without --out the report goes beside the checkpoint
    res = main(["msxrt-sentence", "--checkpoint", str(tmp_path / "ckpt"), "--vocab", vocab_path,
                "--data", str(tmp_path), "--device", "cpu", "--no-baseline"])
    rows = pd.read_csv(tmp_path / "eval-ckpt" / "msxrt_sentence.csv")
    assert rows["baseline"].isna().all() and "baseline" not in res.meta
    write_msxrt(str(tmp_path / "mimic"))
    res2 = main(["msxrt-image", "--random-init", "medst_tiny", "--data", str(tmp_path / "mimic" / "ms-cxr-t"),
                 "--seeds", "42", "--folds", "2", "--workers", "0", "--out", str(tmp_path / "out")])
    assert res2.meta["model"].startswith("random init medst_tiny")
    assert os.path.isfile(tmp_path / "out" / "msxrt_image.csv")
    with pytest.raises(ValueError, match="--vocab"):
        main(["msxrt-sentence", "--random-init", "medst_tiny", "--data", str(tmp_path), "--out", str(tmp_path)])


# -- non-finite outputs are refused -----------------------------------------------------------------
def _nan_model(model, part):
    """A copy of the model whose image (final LayerNorm: CLS and embeddings) or text global head outputs NaN."""
    import copy

    m = copy.deepcopy(model)
    param = m.visual.norm.weight if part == "image" else next(m.text_global_head.parameters())
    with torch.no_grad():
        param.fill_(float("nan"))
    return m


def test_rsna_with_nan_image_embeddings_is_an_error(tmp_path, model, vocab_path):
    d = write_rsna(str(tmp_path), n=40)
    tok = common.load_tokenizer(vocab_path, model)
    # the old code scored this model 0.75 "AUROC" (NaN similarities ranked as numbers)
    with pytest.raises(ValueError, match=r"rsna_zeroshot: 40 of 40 rows of image embeddings \(all split\) are not "
                                         r"finite.*row 0, patientId"):
        rsna_zeroshot.evaluate(_nan_model(model, "image"), tok, d, split="all")
    with pytest.raises(ValueError, match=r"rsna_zeroshot: 4 of 4 rows of prompt embeddings"):
        rsna_zeroshot.evaluate(_nan_model(model, "text"), tok, d, split="all")
    y = np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match="rsna_zeroshot: 1 of 4 rows of negative-prompt similarities"):
        rsna_zeroshot.score(y, np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.1, np.nan, 0.3, 0.4]))


def test_msxrt_with_nan_embeddings_is_an_error(tmp_path, model, vocab_path):
    pytest.importorskip("sklearn.svm")
    csv = write_msxrt(str(tmp_path), n=12)
    with pytest.raises(ValueError, match=r"msxrt_image: 24 of 24 rows of image embeddings \(views=frontal\).*dicom_id"):
        msxrt_image.evaluate(_nan_model(model, "image"), csv, [os.path.dirname(csv)], seeds=(42,), folds=(2,))
    scsv = write_sentences(str(tmp_path / msxrt_sentence.CSV_NAME))
    tok = common.load_tokenizer(vocab_path, model)
    with pytest.raises(ValueError, match=r"msxrt_sentence: \d+ of \d+ rows of sentence_1 embeddings"):
        msxrt_sentence.evaluate(_nan_model(model, "text"), tok, scsv)
    with pytest.raises(ValueError, match="msxrt_sentence: 1 of 4 rows of sentence-pair similarities"):
        msxrt_sentence.score(np.array([0.2, np.nan, 0.5, 0.9]), np.array([0, 1, 0, 1]), n_splits=2)


def test_covidx_refuses_nan_features_and_zero_epochs(tmp_path, model):
    from medst_fast.eval.__main__ import main

    d = write_covidx(str(tmp_path))
    with pytest.raises(ValueError, match=r"covidx_probe: 39 of 39 rows of image features"):
        covidx_probe.evaluate(_nan_model(model, "image"), d, pcts=(1.0,), max_epochs=2)
    with pytest.raises(ValueError, match="max_epochs must be >= 1"):
        covidx_probe.evaluate(model, d, pcts=(1.0,), max_epochs=0)
    with pytest.raises(SystemExit) as e:  # the CLI refuses the flag before loading anything
        main(["covidx-probe", "--random-init", "medst_tiny", "--data", d, "--max-epochs", "0", "--workers", "0",
              "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    assert not os.path.exists(tmp_path / "out" / "covidx_probe.csv")  # no table for an untrained probe
    with pytest.raises(ValueError, match="patience"):
        covidx_probe.train_head(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), torch.zeros(3, 2),
                                torch.zeros(3, dtype=torch.long), patience=0)


# -- the CLI's subcommands, defaults from the checkpoint, finding selection -----------------------------------
def test_cli_subcommands_have_their_own_help(capsys):
    from medst_fast.eval.__main__ import main

    helps = {}
    for task in ("msxrt-image", "msxrt-sentence", "rsna-zeroshot", "covidx-probe", "all"):
        with pytest.raises(SystemExit) as e:
            main([task, "--help"])
        assert e.value.code == 0
        helps[task] = capsys.readouterr().out
    assert len(set(helps.values())) == 5  # no two tasks print the same parser
    assert "--findings" in helps["msxrt-image"] and "--findings" not in helps["msxrt-sentence"]
    assert "--pcts" in helps["covidx-probe"] and "--pcts" not in helps["rsna-zeroshot"]
    assert "--vocab" in helps["rsna-zeroshot"] and "--vocab" not in helps["covidx-probe"]
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert top.count("msxrt-image") == 1 and "msxrt_image" not in top  # each task listed once


def test_cli_vocab_defaults_to_the_checkpoint_folder(tmp_path, model, vocab_path):
    from medst_fast.eval.__main__ import main

    medst_fast.save_pretrained(model, tmp_path / "ckpt", vocab=vocab_path)
    write_sentences(str(tmp_path / msxrt_sentence.CSV_NAME))
    # underscore spelling accepted, no --vocab needed: the folder holds vocab.txt
    res = main(["msxrt_sentence", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(tmp_path),
                "--out", str(tmp_path / "out"), "--device", "cpu"])
    tok = common.load_tokenizer(vocab_path, model)
    want = msxrt_sentence.evaluate(model, tok, str(tmp_path / msxrt_sentence.CSV_NAME))
    assert res.get("RadGraph", "auroc") == pytest.approx(want.get("RadGraph", "auroc"), abs=1e-9)
    medst_fast.save_pretrained(model, tmp_path / "novocab")
    with pytest.raises(ValueError, match=r"--vocab.*novocab holds no vocab.txt"):
        main(["msxrt-sentence", "--checkpoint", str(tmp_path / "novocab"), "--data", str(tmp_path),
              "--out", str(tmp_path / "out")])


def test_msxrt_findings_selection_and_too_few_pairs(tmp_path, model):
    pytest.importorskip("sklearn.svm")
    csv = write_msxrt(str(tmp_path), n=36)  # 18 labelled pairs per finding: 6 per class, enough for 5 folds
    df = pd.read_csv(csv)
    df["pneumothorax_progression"] = [PROG[i % 3] if i < 4 else None for i in range(len(df))]  # 4 pairs only
    df.to_csv(csv, index=False)
    res = msxrt_image.evaluate(model, csv, [os.path.dirname(csv)], seeds=(42,), folds=(2, 5))
    assert "pneumothorax (cv5)" in res.meta["skipped"] and "fewer than the 5 CV folds" in res.meta["skipped"][
        "pneumothorax (cv5)"]
    assert {r["subset"] for r in res.rows if r["metric"] == "accuracy_cv5"} == set(FINDINGS) - {"pneumothorax"} | {"average"}
    assert any(r["subset"] == "pneumothorax" and r["metric"] == "accuracy_cv2" for r in res.rows)
    avg = [r for r in res.rows if r["subset"] == "average" and r["metric"] == "accuracy_cv5"][0]
    per = [r["value"] for r in res.rows if r["metric"] == "accuracy_cv5" and r["subset"] in FINDINGS]
    assert avg["value"] == pytest.approx(np.mean(per)) and "over 4 of 5 findings" in avg["note"]
    # --findings: only those are scored, and only their columns are needed
    sel = msxrt_image.evaluate(model, csv, [os.path.dirname(csv)], seeds=(42,), folds=(2,), findings=["edema"])
    assert {r["subset"] for r in sel.rows} == {"edema", "average"}
    df.drop(columns=["consolidation_progression"]).to_csv(csv, index=False)
    with pytest.raises(ValueError, match="consolidation_progression"):
        msxrt_image.evaluate(model, csv, [os.path.dirname(csv)], seeds=(42,), folds=(2,))
    assert msxrt_image.evaluate(model, csv, [os.path.dirname(csv)], seeds=(42,), folds=(2,),
                                findings=["edema", "pneumonia"]).meta["findings"] == ["edema", "pneumonia"]
    with pytest.raises(ValueError, match="choose from"):
        msxrt_image.evaluate(model, csv, [os.path.dirname(csv)], findings=["effusion"])
    # nothing scorable at all is an error, not an empty table
    with pytest.raises(ValueError, match="no finding has enough labelled pairs"):
        msxrt_image.evaluate(model, csv, [os.path.dirname(csv)], seeds=(42,), folds=(5,), findings=["pneumothorax"])
    # and through the CLI
    from medst_fast.eval.__main__ import main

    out = main(["msxrt-image", "--random-init", "medst_tiny", "--data", csv, "--findings", "edema,pneumothorax",
                "--seeds", "42", "--folds", "5", "--workers", "0", "--out", str(tmp_path / "out")])
    assert out.meta["findings"] == ["edema", "pneumothorax"] and "pneumothorax (cv5)" in out.meta["skipped"]


def test_trainer_checkpoint_brings_its_config(tmp_path):
    from medst_fast import weights as W

    src = medst_fast.create_model("medst_tiny", text={"vocab_size": 500})
    state = {"format": W.FORMAT_VERSION, "model": src.state_dict(), "optimizer": {}, "step": 1, "epoch": 0,
             "step_in_epoch": 1, "rng": [], "config": src.cfg.to_dict()}
    path = W.save_checkpoint(state, str(tmp_path / "run"), 1, keep=1)
    m = common.load_model(checkpoint=path, device="cpu")  # no --model needed, vocab size as trained
    assert m.cfg.text.vocab_size == 500 and not m.training
    m2 = common.load_model(checkpoint=path, model_name="medst_tiny", device="cpu")
    assert m2.cfg.text.vocab_size == 500
    # a --model of another architecture is refused with the flag to drop, not silently overridden
    with pytest.raises(ValueError, match=r"--model medst_vit_b16: .*another architecture.*; drop --model"):
        common.load_model(checkpoint=path, model_name="medst_vit_b16", device="cpu")


def test_all_evaluates_a_quick_start_run(tmp_path, capsys):
    """README quick start: `python -m medst_fast.eval all --checkpoint RUN/final` right after pretraining:
    every table has its chance level and a random-init baseline, each task a verdict, and the report lands in
    the run's folder."""
    pytest.importorskip("sklearn.svm")
    from medst_fast.eval.__main__ import main
    from medst_fast.pretrain import main as pretrain

    run = tmp_path / "run"
    # 40 patients: the quick start's own 400-patient set costs ~50 CPU s to generate, and 2 steps need few
    pretrain(["--cache-dir", str(tmp_path / "cache"), "--max-steps", "2", "--workers", "0", "--synthetic-patients",
              "40", "--out", str(run)])
    results = main(["all", "--checkpoint", str(run / "final"), "--seeds", "42", "--folds", "2", "--pcts", "1",
                    "--max-epochs", "2", "--workers", "0", "--device", "cpu"])
    tasks = [r.task for r in results]
    assert tasks[:2] == ["msxrt_image", "msxrt_sentence"] and "covidx_probe" in tasks
    import importlib.util

    if importlib.util.find_spec("pydicom"):  # the synthetic RSNA set is DICOM
        assert "rsna_zeroshot" in tasks
    assert not (tmp_path / "out").exists() and not os.path.exists("eval_results/all.csv")
    table = pd.read_csv(run / "eval" / "all.csv")  # beside the checkpoint, not in the current folder
    assert set(table["task"]) == set(tasks) and table["value"].notna().all()
    # chance and the random-init baseline of the same run on every row; a p-value on each task's tested rows
    assert table["chance"].notna().all() and table["baseline"].notna().all()
    assert all(table[table["task"] == t]["p"].notna().any() for t in tasks)
    assert all(r.meta["baseline"].startswith("random init of the same config") for r in results)
    printed = capsys.readouterr().out
    assert printed.count("verdict: ") == len(tasks) and "| chance | random init |" in printed
    assert all(r.meta["model"] == str(run / "final") for r in results)
    # the sets were written beside the run's training data, once
    (raw,) = list((tmp_path / "cache").glob("synthetic-*/raw"))
    assert (raw / "EVAL_SETS_COMPLETE").is_file() and (raw / "msxrt").is_dir()
    with pytest.raises(ValueError, match="not inside a training run folder"):
        medst_fast.save_pretrained(medst_fast.create_model("medst_tiny"), tmp_path / "loose")
        main(["all", "--checkpoint", str(tmp_path / "loose"), "--out", str(tmp_path / "out")])


# -- one unreadable image is a counted skip; bad flags are usage errors ----------------------------------------
def _corrupt(path):
    with open(path, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not an image")


def test_rsna_skips_and_counts_a_corrupt_image(tmp_path, model, vocab_path):
    d = write_rsna(str(tmp_path), n=40)
    sp = rsna_zeroshot.official_split(os.path.join(d, rsna_zeroshot.LABELS_CSV))
    df = pd.concat([sp["train"], sp["valid"], sp["test"]])
    bad = df["patientId"].iloc[3]
    _corrupt(os.path.join(d, "stage_2_train_images", bad + ".dcm"))
    tok = common.load_tokenizer(vocab_path, model)
    res = rsna_zeroshot.evaluate(model, tok, d, split="all", batch_size=8)
    assert res.meta["skipped_images"] == 1 and res.meta["images"] == 39
    assert all(r["n"] == 39 for r in res.rows)
    # the scores are those of the 39 readable images
    keep = df[df["patientId"] != bad]
    img = _direct_embed(model, [os.path.join(d, "stage_2_train_images", p + ".dcm") for p in keep["patientId"]])
    clf = rsna_zeroshot.classifier(model, tok, rsna_zeroshot.POSITIVE_PROMPTS, rsna_zeroshot.NEGATIVE_PROMPTS).numpy()
    pred = (img @ clf[:, 0]) > (img @ clf[:, 1])
    assert res.get("all", "accuracy") == pytest.approx(np.mean(pred == keep["Target"].to_numpy()), abs=1e-9)


def test_msxrt_image_skips_pairs_of_a_corrupt_image_and_the_cli_reports_it(tmp_path, model):
    pytest.importorskip("sklearn.svm")
    from medst_fast.eval.__main__ import main

    csv = write_msxrt(str(tmp_path / "mimic"), n=24)
    df = pd.read_csv(csv, dtype=str)
    cur, subj, study = df["dicom_id"].iloc[0], df["subject_id"].iloc[0], df["study_id"].iloc[0]
    _corrupt(os.path.join(tmp_path, "mimic", "files", f"p{subj[:2]}", f"p{subj}", f"s{study}", f"{cur}.jpg"))
    res = msxrt_image.evaluate(model, csv, [os.path.dirname(os.path.dirname(csv))], seeds=(42,), folds=(2,))
    assert res.meta["skipped_images"] == 1 and res.meta["skipped_pairs"] == 1 and res.meta["pairs"] == 23
    res = main(["msxrt-image", "--random-init", "medst_tiny", "--data", csv, "--seeds", "42", "--folds", "2",
                "--workers", "0", "--out", str(tmp_path / "out")])
    assert res.meta["skipped_images"] == 1
    assert "- skipped_images: 1" in open(tmp_path / "out" / "msxrt_image.md").read()


def test_covidx_skips_and_counts_a_corrupt_image(tmp_path, model):
    d = write_covidx(str(tmp_path))
    _corrupt(os.path.join(d, "test", "test_004.png"))
    res = covidx_probe.evaluate(model, d, pcts=(1.0,), max_epochs=3, patience=2)
    assert res.meta["skipped_images"] == 1 and res.meta["test"] == 8 and res.rows[0]["n"] == 8


@pytest.mark.parametrize("argv, flag, why", [
    (["msxrt-image", "--folds", "1"], "--folds", "at least 2 folds, got 1"),
    (["msxrt-image", "--folds", "5,x"], "--folds", "comma list of integers"),
    (["rsna-zeroshot", "--batch-size", "0"], "--batch-size", "must be >= 1, got 0"),
    (["covidx-probe", "--workers", "-1"], "--workers", "must be >= 0, got -1"),
    (["covidx-probe", "--pcts", "0.5,2"], "--pcts", "in (0, 1], got 2.0"),
])
def test_bad_flags_are_usage_errors_naming_the_flag(tmp_path, capsys, argv, flag, why):
    from medst_fast.eval.__main__ import main

    with pytest.raises(SystemExit) as e:
        main([*argv, "--random-init", "medst_tiny", "--data", str(tmp_path), "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and why in err
    assert not os.path.exists(tmp_path / "out")


def test_cli_bad_input_is_one_line_not_a_traceback(tmp_path, capsys):
    from medst_fast.eval.__main__ import cli

    assert cli(["covidx-probe", "--random-init", "medst_tiny", "--data", str(tmp_path / "nope"), "--workers", "0",
                "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medst_fast.eval: error: ") and "nope" in err[0]
