"""The trainer on build_series_loader (--loader pil|nvjpeg|dali) over a small synthetic index: the same batches
reach the model from every back-end, the log names the back-end and shows input vs compute time, and the
loader's bad-image counts reach metrics.csv. (A resume on each back-end: tests/test_train_resume.py.)"""
import csv
import os

import pytest
import torch

from medst_fast.data import loaders as L
from medst_fast.pretrain import main
from medst_fast.train import step as step_mod

GREY = 2.0 / 255.0 + 1e-5  # one grey level after (x/255 - 0.5)/0.5
SMALL = ["--model-override", "vision.img_size=32", "--model-override", "text.max_length=32"]
_FORWARD = step_mod.PretrainModule.forward  # the real one: each _recording wraps it, never a previous wrapper
BATCHED = ["nvjpeg"] + (["dali"] if L.dali_missing() is None else [])


@pytest.fixture(scope="module")
def synthetic_index(tmp_path_factory, copy_index):
    """The session's tiny synthetic MIMIC-CXR index (13 training series), copied, with one unreadable lateral."""
    from medst_fast.data.index import SeriesIndex

    path = copy_index(tmp_path_factory.mktemp("syn") / "copy")
    idx = SeriesIndex.load(path)
    lateral = next(idx.studies[r].lateral_path for s in idx.series["train"] for r in s if idx.studies[r].lateral_path)
    with open(idx.path(lateral), "wb") as f:
        f.write(b"\xff\xd8 not really a jpeg")
    assert len(idx.series["train"]) == 13
    return path


def _argv(out, data, vocab, loader, *extra):
    return ["--data", data, "--vocab", vocab, "--out", str(out), "--workers", "0", "--batch-series", "2",
            "--log-every", "1", "--no-export", "--progress", "off", "--loader", loader, "--seed", "3", *SMALL, *extra]


def _recording(monkeypatch, stop_at=None):
    """Record what every forward receives (CPU copies); os.kill(SIGTERM) at forward number ``stop_at``."""
    seen = []

    def fwd(self, batch):
        seen.append({k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in batch.items()
                     if k in ("frontal", "lateral", "has_lateral", "input_ids", "attention_mask", "word_slots",
                              "study_id", "n_full_series")})
        if stop_at is not None and len(seen) == stop_at:
            os.kill(os.getpid(), 15)
        return _FORWARD(self, batch)

    monkeypatch.setattr(step_mod.PretrainModule, "forward", fwd)
    return seen


def assert_same_batches(a, b, exact):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x["study_id"] == y["study_id"] and x["n_full_series"] == y["n_full_series"]
        for k in ("has_lateral", "input_ids", "attention_mask", "word_slots"):
            assert torch.equal(x[k], y[k]), k
        for k in ("frontal", "lateral"):
            assert x[k].shape == y[k].shape
            d = (x[k] - y[k]).abs().max().item()
            assert (d == 0) if exact else (d <= GREY), (k, d)


def _metrics(out):
    with open(os.path.join(str(out), "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


def test_every_backend_feeds_the_trainer_the_same_batches(tmp_path, monkeypatch, synthetic_index, vocab_path):
    runs = {}
    for be in ["pil"] + BATCHED:
        seen = _recording(monkeypatch)
        res = main(_argv(tmp_path / be, synthetic_index, vocab_path, be, "--epochs", "1"))  # 6 steps
        assert res.step == 6 and res.bad_steps == 0
        runs[be] = (seen, _metrics(tmp_path / be), (tmp_path / be / "train.log").read_text())
    ref, ref_rows, _ = runs["pil"]
    for be, (seen, rows, text) in runs.items():
        assert f"loader: {be} (requested" in text  # the one line naming the back-end and why
        assert_same_batches(ref, seen, exact=False)
        # the same batches give the same loss (pixels may differ by a grey level, so not bitwise)
        assert float(rows[0]["loss"]) == pytest.approx(float(ref_rows[0]["loss"]), rel=2e-2)
        assert all(float(r["input_ms"]) >= 0 and float(r["compute_ms"]) > 0 for r in rows)
        assert "ms/step" in text and "waiting for data" in text
        # the unreadable lateral is counted the same way whichever back-end read it
        assert [r["bad_images"] for r in rows] == [r["bad_images"] for r in ref_rows]
    assert ref_rows[-1]["bad_images"] == "1" and {r["dropped_studies"] for r in ref_rows} == {"0"}  # one epoch


def test_random_dataset_names_its_loader(tmp_path, vocab_path):
    argv = ["--dataset-type", "random", "--random-series", "4", "--vocab", vocab_path, "--out", str(tmp_path / "r"),
            "--workers", "0", "--batch-series", "2", "--max-steps", "1", "--no-export", *SMALL]
    assert main(argv).step == 1
    text = (tmp_path / "r" / "train.log").read_text()
    assert "loader: random (--dataset-type random: in-memory random series" in text
    row = _metrics(tmp_path / "r")[-1]
    assert (row["bad_images"], row["dropped_studies"], row["cpu_decoded"]) == ("0", "0", "0")
