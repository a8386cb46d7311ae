"""--series-len N end to end (docs/method.md §8.3): one prepared index (cut by 4) serves any N by re-cutting each
patient's time-ordered studies at load; the loaders put the series of N studies first and the temporal loss
takes n_full_series series of N; N = 4 leaves every batch as it was."""
import json
import math
import os

import pytest
import torch

from medst_fast.data import loaders as L
from medst_fast.data.dataset import SeriesCollate, SeriesDataset, collate_series
from medst_fast.data.index import SPLITS, SeriesIndex, Study, cut_series, patient_runs
from medst_fast.pretrain import main
from medst_fast.train import step as step_mod
from medst_fast import weights as W
from medst_fast.train.args import parse_args
from medst_fast.train.data import RandomSeriesDataset, collate_pretokenized

SMALL = ["--model-override", "vision.img_size=32", "--model-override", "text.max_length=32"]
_FORWARD = step_mod.PretrainModule.forward


# ------------------------------------------------------------------------------------------ cutting semantics
def _study(row, subject, order, split):
    return Study(row=row, subject_id=subject, study_id=f"{subject}-{row}", split=split, order=order,
                 study_datetime="", frontal_path=f"{subject}/{row}.jpg", lateral_path="", frontal_dicom="",
                 lateral_dicom="", text="", n_tokens=0)


def _prepared_like(runs_per_split):
    """An in-memory index cut as prepare cuts it: each run (subject, n studies) numbered 0..n-1, cut by 4.
    Returns (index, {split: [run rows, ...]}) with the runs as the test built them."""
    studies, series, runs = [], {s: [] for s in SPLITS}, {s: [] for s in SPLITS}
    for split, plan in runs_per_split.items():
        for subject, n in plan:
            rows = []
            for k in range(n):
                studies.append(_study(len(studies), subject, k, split))
                rows.append(len(studies) - 1)
            runs[split].append(rows)
            series[split].extend(cut_series(rows, 4))
    return SeriesIndex(studies, series, {"image_root": "", "source": "test"}), runs


# Runs of every remainder, full runs back to back (a, b: 4 each; a patient with two runs, the second
# starting again at order 0 like the manifest converter's untimed studies), and one-study runs.
PLAN = {"train": [("a", 4), ("b", 4), ("c", 1), ("d", 9), ("e", 12), ("f", 2), ("u", 4), ("u", 1), ("g", 7),
                  ("h", 3), ("i", 8), ("j", 5)],
        "valid": [("v", 6), ("w", 1), ("x", 4)],
        "test": []}


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_recut_keeps_every_study_once_in_time_order_within_a_patient(n):
    index, runs = _prepared_like(PLAN)
    cut = index.with_series_len(n)
    assert cut.series_len == n and index.series_len == 4 and cut.studies is not None
    for split in SPLITS:
        got = cut.series[split]
        flat = [r for s in got for r in s]
        assert sorted(flat) == sorted(r for s in index.series[split] for r in s) and len(flat) == len(set(flat))
        for s in got:
            st = [cut.studies[r] for r in s]
            assert 1 <= len(s) <= n
            assert len({x.subject_id for x in st}) == 1  # same patient only
            assert [x.order for x in st] == list(range(st[0].order, st[0].order + len(s)))  # time order kept
        # exactly each run cut by n, runs in their order, a run's short chunk last
        assert got == [c for rows in runs[split] for c in cut_series(rows, n)]
    assert cut.with_series_len(4).series == index.series  # back to the prepared cut


def test_patient_runs_never_join_patients_or_a_fresh_run():
    index, runs = _prepared_like(PLAN)
    assert patient_runs(index.studies, index.series["train"], 4) == runs["train"]
    # a 4-study run followed by another patient's study numbered 4 (hand-made) stays apart
    s = [_study(0, "p", 0, "train"), _study(1, "p", 1, "train"), _study(2, "p", 2, "train"), _study(3, "p", 3, "train"),
         _study(4, "q", 4, "train")]
    assert patient_runs(s, [[0, 1, 2, 3], [4]], 4) == [[0, 1, 2, 3], [4]]


def test_recut_bad_length_is_refused():
    index, _ = _prepared_like(PLAN)
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="series length must be an integer >= 1"):
            index.with_series_len(bad)
    assert index.with_series_len(4) is index  # the prepared length: the index itself, untouched


def test_index_series_len_field(tmp_path):
    index, _ = _prepared_like(PLAN)
    six = index.with_series_len(6)
    six.save(tmp_path / "six")
    assert json.loads((tmp_path / "six" / "meta.json").read_text())["series_len"] == 6
    back = SeriesIndex.load(str(tmp_path / "six"))
    assert back.series == six.series and back.series_len == 6 and max(map(len, back.series["train"])) == 6
    meta = json.loads((tmp_path / "six" / "meta.json").read_text())
    meta.pop("series_len")  # a series of 6 in an index that says (by default) 4
    (tmp_path / "six" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"series.json: series train\[\d+\] has 6 studies \(1..4 allowed"):
        SeriesIndex.load(str(tmp_path / "six"))
    meta["series_len"] = "6"
    (tmp_path / "six" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="meta.json: field 'series_len' is '6', expected an integer >= 1"):
        SeriesIndex.load(str(tmp_path / "six"))


@pytest.fixture(scope="module")
def synthetic_index(tmp_path_factory):
    """A 10-patient synthetic MIMIC-CXR index, prepared (series of 4)."""
    from medst_fast.data import prepare, synth

    root = tmp_path_factory.mktemp("syn")
    synth.generate(str(root / "tree"), patients=10, seed=5, extras=False, zip_reports=False, image_size=(80, 64))
    prepare.prepare_mimic(str(root / "tree"), str(root / "tree"), str(root / "idx"), cache_size=None, workers=0,
                          progress=False)
    return str(root / "idx")


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_recut_of_a_prepared_index_is_each_patients_studies_cut_by_n(synthetic_index, n):
    index = SeriesIndex.load(synthetic_index)
    assert index.meta["series_len"] == 4 and index.series_len == 4
    cut = index.with_series_len(n)
    for split in SPLITS:
        per_patient = {}
        for s in index.studies:  # studies.csv alone: each patient's rows in their time order
            if s.split == split:
                per_patient.setdefault(s.subject_id, []).append(s)
        want = sorted(tuple(c) for st in per_patient.values()
                      for c in cut_series([x.row for x in sorted(st, key=lambda x: x.order)], n))
        assert sorted(map(tuple, cut.series[split])) == want, split
    longest = max(len([s for s in index.studies if s.split == "train" and s.subject_id == p])
                  for p in {s.subject_id for s in index.studies})
    assert longest > 4 and max(map(len, cut.series["train"])) == min(n, longest)  # joined where a patient has more


# ----------------------------------------------------------------------------------------------- batching
def _fake_items(lengths, S=8):
    items = []
    for i, n in enumerate(lengths):
        items.append([{"row": 10 * i + k, "study_id": f"s{i}-{k}", "frontal": torch.full((1, S, S), float(i)),
                       "lateral": None, "text": f"t{i}-{k}"} for k in range(n)])
    return items


def test_collate_puts_the_series_of_n_first():
    items = _fake_items([3, 6, 2, 6, 5])
    b = SeriesCollate(series_len=6)(items)
    assert b["n_full_series"] == 2
    assert b["study_id"][:12] == [f"s1-{k}" for k in range(6)] + [f"s3-{k}" for k in range(6)]
    assert b["step"][:12].tolist() == list(range(6)) * 2 and b["series_index"][:12].tolist() == [0] * 6 + [1] * 6
    assert collate_series(items)["n_full_series"] == 0  # the default N = 4: none of these is complete
    assert collate_series(_fake_items([4, 2, 4]))["n_full_series"] == 2


def test_random_set_follows_series_len():
    ds = RandomSeriesDataset(40, lambda t: _fake_tok(t), 8, seed=1, series_len=6)
    lens = [ds[i]["frontal"].shape[0] for i in range(len(ds))]
    assert max(lens) == 6 and min(lens) >= 1 and lens.count(6) >= 10 and any(1 <= x < 6 for x in lens)
    b = collate_pretokenized([ds[i] for i in range(8)], series_len=6)
    n_full = sum(x == 6 for x in lens[:8])
    assert b["n_full_series"] == n_full and b["step"][: 6 * n_full].tolist() == list(range(6)) * n_full
    with pytest.raises(ValueError, match="series_len must be >= 2"):
        RandomSeriesDataset(4, None, 8, series_len=1)


def _fake_tok(texts, L=8):
    n = len(texts)
    return {"input_ids": torch.ones(n, L, dtype=torch.long), "attention_mask": torch.ones(n, L, dtype=torch.long),
            "word_slots": torch.zeros(n, L, dtype=torch.long)}


@pytest.mark.parametrize("backend", ["pil", "nvjpeg"])
def test_loaders_follow_series_len(synthetic_index, backend):
    """Validation order, one series per batch: the batches are the re-cut series, in order, whole."""
    n = 3
    cut = SeriesIndex.load(synthetic_index).with_series_len(n)
    loader = L.build_series_loader(backend, synthetic_index, "train", None, 32, 1, False, workers=0 if backend == "pil"
                                   else 1, device="cpu", series_len=n)
    loader.set_epoch(0)
    batches = list(loader)
    assert len(batches) == len(cut.series["train"])
    for b, s in zip(batches, cut.series["train"]):
        want = [cut.studies[r].study_id for r in s if cut.studies[r].frontal_path]
        assert b["study_id"] == want  # (no unreadable image in this index)
        assert b["n_full_series"] == (len(s) == n)


# ------------------------------------------------------------------------------------------------ trainer
def _argv(out, vocab, *extra):
    return ["--dataset-type", "random", "--random-series", "12", "--vocab", vocab, "--out", str(out), "--workers", "0",
            "--batch-series", "3", "--log-every", "1", "--no-export", "--progress", "off", *SMALL, *extra]


def _record_temporal(monkeypatch):
    """Record each temporal-loss call (rows, n_full, T) and the batch the forward received."""
    import medst_fast.losses as losses

    calls, batches = [], []
    orig = losses.temporal_loss

    def temporal(img, txt, n_full, cfg):
        out = orig(img, txt, n_full, cfg)
        calls.append({"rows": img.shape[0], "n_full": n_full, "T": cfg.series_len, "value": float(out.detach())})
        return out

    def fwd(self, batch):
        batches.append({k: batch[k] for k in ("n_full_series", "step", "series_index")})
        return _FORWARD(self, batch)

    monkeypatch.setattr(losses, "temporal_loss", temporal)
    monkeypatch.setattr(step_mod.PretrainModule, "forward", fwd)
    return calls, batches


@pytest.mark.parametrize("n", [2, 6])
def test_trainer_steps_with_series_len(tmp_path, vocab_path, monkeypatch, n):
    calls, batches = _record_temporal(monkeypatch)
    res = main(_argv(tmp_path / "r", vocab_path, "--series-len", str(n), "--max-steps", "3"))
    assert res.step == 3 and math.isfinite(res.last_loss)
    assert len(calls) == len(batches) == 3
    for c, b in zip(calls, batches):
        k = b["n_full_series"]
        assert c["T"] == n and c["n_full"] == k and k * n <= c["rows"] and math.isfinite(c["value"])
        assert b["step"][: k * n].tolist() == list(range(n)) * k  # the first n_full*N rows: whole series of N
        assert b["series_index"][: k * n].tolist() == [j for j in range(k) for _ in range(n)]
        assert (b["series_index"][k * n:] >= k).all()
    assert any(c["n_full"] > 0 and c["value"] > 0 for c in calls)
    st = W.load_checkpoint(res.last_checkpoint)
    assert st["config"]["loss"]["series_len"] == n and st["args"]["series_len"] == n


def test_trainer_on_a_prepared_index_recuts_it(tmp_path, vocab_path, synthetic_index, monkeypatch):
    calls, batches = _record_temporal(monkeypatch)
    res = main(["--data", synthetic_index, "--vocab", vocab_path, "--out", str(tmp_path / "r"), "--workers", "0",
                "--batch-series", "2", "--log-every", "1", "--no-export", "--progress", "off", "--loader", "pil",
                "--series-len", "6", "--max-steps", "2", "--eval-every", "0", *SMALL])
    assert math.isfinite(res.last_loss)
    n_series = len(SeriesIndex.load(synthetic_index).with_series_len(6).series["train"])
    assert W.load_checkpoint(res.last_checkpoint)["n_series"] == n_series
    train_calls = calls[:2]  # then the validation at the end (same N)
    for c, b in zip(train_calls, batches):
        assert c["T"] == 6 and b["step"][: 6 * c["n_full"]].tolist() == list(range(6)) * c["n_full"]
    assert all(c["T"] == 6 for c in calls)


def test_faithful_with_series_len_is_refused(vocab_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(_argv("unused", vocab_path, "--faithful", "--series-len", "6"))
    assert "--faithful cannot be combined with --series-len: faithful mode keeps the paper's" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- the default N = 4
def _collate_as_before(items):
    """collate_series as it was before --series-len (series of exactly 4 first), the fields the check reads."""
    items = [it for it in items if it]
    full = [it for it in items if len(it) == 4]
    ordered = full + [it for it in items if len(it) != 4]
    rows = [st for it in ordered for st in it]
    return {"frontal": torch.stack([st["frontal"] for st in rows]), "n_full_series": len(full),
            "study_id": [st["study_id"] for st in rows],
            "step": torch.tensor([k for it in ordered for k in range(len(it))])}


def test_default_batches_are_unchanged(synthetic_index):
    """N = 4 on a prepared index: the series of series.json as written, batched as before."""
    with open(os.path.join(synthetic_index, "series.json")) as f:
        stored = json.load(f)["train"]
    index = SeriesIndex.load(synthetic_index)
    assert index.with_series_len(4) is index and index.series["train"] == stored
    ds = SeriesDataset(synthetic_index, "train", None, 32, train=False)
    bs = 3
    loader = L.build_series_loader("pil", synthetic_index, "train", None, 32, bs, False, workers=0, device="cpu",
                                   series_len=4)
    loader.set_epoch(0)
    got = list(loader)
    assert len(got) == len(stored) // bs
    for k, b in enumerate(got):
        want = _collate_as_before([ds[i] for i in range(k * bs, (k + 1) * bs)])
        assert b["study_id"] == want["study_id"] and b["n_full_series"] == want["n_full_series"]
        assert torch.equal(b["step"], want["step"]) and torch.equal(b["frontal"], want["frontal"])
    # and with training crops: the loader with N = 4 gives bitwise the loader without the argument
    a = L.build_series_loader("pil", synthetic_index, "train", None, 32, 2, True, workers=0, device="cpu", seed=7)
    b = L.build_series_loader("pil", synthetic_index, "train", None, 32, 2, True, workers=0, device="cpu", seed=7,
                              series_len=4)
    for x, y in zip(*(list((ld.set_epoch(1), ld)[1]) for ld in (a, b))):
        assert x["study_id"] == y["study_id"] and torch.equal(x["frontal"], y["frontal"])


def test_default_random_batches_are_unchanged():
    torch.manual_seed(3)
    a = [RandomSeriesDataset(10, _fake_tok, 8, seed=2)[i] for i in range(10)]
    torch.manual_seed(3)
    b = [RandomSeriesDataset(10, _fake_tok, 8, seed=2, series_len=4)[i] for i in range(10)]
    for x, y in zip(a, b):
        assert torch.equal(x["frontal"], y["frontal"]) and x["study_id"] == y["study_id"]
    batch = collate_pretokenized(a)
    full = [it for it in a if it["frontal"].shape[0] == 4]
    order = full + [it for it in a if it["frontal"].shape[0] != 4]
    assert batch["n_full_series"] == len(full) > 0
    assert torch.equal(batch["frontal"], torch.cat([it["frontal"] for it in order]))
