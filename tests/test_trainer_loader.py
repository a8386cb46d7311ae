"""The trainer on build_series_loader (--loader pil|nvjpeg|dali) over a small synthetic index: the same batches
reach the model from every back-end, resume is exact on the batched back-ends, the log names the back-end
and shows input vs compute time, and the loader's bad-image counts reach metrics.csv across a resume."""
import csv
import os

import pytest
import torch

from medst_fast.data import loaders as L
from medst_fast.pretrain import main
from medst_fast import weights as W
from medst_fast.train import loop as loop_mod

GREY = 2.0 / 255.0 + 1e-5  # one grey level after (x/255 - 0.5)/0.5
SMALL = ["--model-override", "vision.img_size=32", "--model-override", "text.max_length=32"]
_FORWARD = loop_mod.PretrainModule.forward  # the real one: each _recording wraps it, never a previous wrapper
BATCHED = ["nvjpeg"] + (["dali"] if L.dali_missing() is None else [])


@pytest.fixture(scope="module")
def synthetic_index(tmp_path_factory):
    """An 8-patient synthetic MIMIC-CXR index (13 training series) with one unreadable lateral."""
    from medst_fast.data import prepare, synth
    from medst_fast.data.index import SeriesIndex

    root = tmp_path_factory.mktemp("syn")
    synth.generate(str(root / "tree"), patients=8, seed=3, extras=False, zip_reports=False, image_size=(80, 64))
    prepare.prepare_mimic(str(root / "tree"), str(root / "tree"), str(root / "idx"), cache_size=None, workers=0,
                          progress=False)
    idx = SeriesIndex.load(str(root / "idx"))
    lateral = next(idx.studies[r].lateral_path for s in idx.series["train"] for r in s if idx.studies[r].lateral_path)
    with open(idx.path(lateral), "wb") as f:
        f.write(b"\xff\xd8 not really a jpeg")
    assert len(idx.series["train"]) == 13
    return str(root / "idx")


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

    monkeypatch.setattr(loop_mod.PretrainModule, "forward", fwd)
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


@pytest.mark.parametrize("backend", BATCHED)
def test_resume_on_a_batched_backend_equals_the_uninterrupted_run(tmp_path, monkeypatch, synthetic_index,
                                                                  vocab_path, backend):
    """13 series, 2 per micro-batch, 2 micro-batches per step: 3 steps per epoch; 7 steps cross two epoch
    boundaries, and the stop after step 2 is mid-epoch. Same batches after the resume, bitwise weights."""
    extra = ("--max-steps", "7", "--accum-steps", "2", "--save-every", "100")
    ref = _recording(monkeypatch)
    a = main(_argv(tmp_path / "ref", synthetic_index, vocab_path, backend, *extra))
    first = _recording(monkeypatch, stop_at=3)  # forward 3 is in step 2: the step ends, then a checkpoint
    res = main(_argv(tmp_path / "run", synthetic_index, vocab_path, backend, *extra))
    assert res.interrupted and res.step == 2
    rest = _recording(monkeypatch)
    b = main(["--out", str(tmp_path / "run"), "--resume", "auto"])  # the run's own flags, --loader included
    assert b.step == 7 and f"loader: {backend} (requested" in (tmp_path / "run" / "train.log").read_text()
    assert len(first) == 4 and len(ref) == 14
    assert_same_batches(ref[:4], first, exact=True)
    assert_same_batches(ref[4:], rest, exact=True)
    wa, wb = W.load_checkpoint(a.last_checkpoint), W.load_checkpoint(b.last_checkpoint)
    for k in wa["model"]:
        assert torch.equal(wa["model"][k], wb["model"][k]), k
    ra, rb = _metrics(tmp_path / "ref"), _metrics(tmp_path / "run")
    assert [r["step"] for r in rb] == [str(i) for i in range(1, 8)]
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]
    # the loader's counts continue across the resume (the checkpoint carries them)
    assert [r["bad_images"] for r in ra] == [r["bad_images"] for r in rb] and int(rb[-1]["bad_images"]) >= 1


def test_the_loader_may_change_on_resume(tmp_path, monkeypatch, synthetic_index, vocab_path):
    """--loader does not change the data: a resume may switch back-ends without --allow-changed-args."""
    extra = ("--max-steps", "4", "--save-every", "100")
    ref = _recording(monkeypatch)
    main(_argv(tmp_path / "ref", synthetic_index, vocab_path, "pil", *extra))
    _recording(monkeypatch, stop_at=2)
    assert main(_argv(tmp_path / "run", synthetic_index, vocab_path, "pil", *extra)).step == 2
    rest = _recording(monkeypatch)
    res = main(["--out", str(tmp_path / "run"), "--resume", "auto", "--loader", "nvjpeg"])
    assert res.step == 4
    assert_same_batches(ref[2:], rest, exact=False)
    assert "loader: nvjpeg (requested" in (tmp_path / "run" / "train.log").read_text()


def test_random_dataset_names_its_loader(tmp_path, vocab_path):
    argv = ["--dataset-type", "random", "--random-series", "4", "--vocab", vocab_path, "--out", str(tmp_path / "r"),
            "--workers", "0", "--batch-series", "2", "--max-steps", "1", "--no-export", *SMALL]
    assert main(argv).step == 1
    text = (tmp_path / "r" / "train.log").read_text()
    assert "loader: random (--dataset-type random: in-memory random series" in text
    row = _metrics(tmp_path / "r")[-1]
    assert (row["bad_images"], row["dropped_studies"], row["cpu_decoded"]) == ("0", "0", "0")
