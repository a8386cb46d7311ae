"""What the trainer does when a step, a batch, a checkpoint or a validation goes wrong (train/faults.py,
train/step.py, medst_fast/weights.py): no silent wrong result, nothing non-finite written."""
import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
import types

import pytest
import torch

import medst_fast
from medst_fast import weights as W
from medst_fast.pretrain import main
from medst_fast.train import build as build_mod
from medst_fast.train import faults as faults_mod
from medst_fast.train import rng
from medst_fast.train import step as step_mod
from medst_fast.train.args import parse_args
from medst_fast.train.data import BAD_BATCH, RandomSeriesDataset
from medst_fast.train.faults import TrainingDiverged
from medst_fast.train.step import batch_to

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train_args import SMALL, _argv, _cli_run  # noqa: E402  (one tiny-run command line for both files)


def _metrics(out):
    with open(os.path.join(str(out), "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


def _finite(sd):
    return all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


# -- coordination with the model's packing plan ----------------------------------------------------------------
def test_batch_to_keeps_a_host_copy_of_has_lateral():
    lat = torch.tensor([True, False, True])
    b = batch_to({"has_lateral": lat, "frontal": torch.zeros(3, 1, 4, 4), "n_full_series": 0}, torch.device("cpu"))
    assert b["has_lateral_host"] is lat and b["has_lateral_host"].device.type == "cpu"
    assert torch.equal(b["has_lateral"], lat) and b["n_full_series"] == 0
    assert "has_lateral_host" not in batch_to({"frontal": torch.zeros(1)}, torch.device("cpu"))


# -- a skipped step leaves no trace; a non-finite model is never written --------------------------------
def _poison_frontal(monkeypatch, bad_calls):
    """Forward number n in bad_calls sees NaN images: the BatchNorm statistics it computes are NaN."""
    orig = step_mod.PretrainModule.forward
    count = {"n": 0}

    def fwd(self, batch):
        count["n"] += 1
        if count["n"] in bad_calls:
            batch = dict(batch, frontal=torch.full_like(batch["frontal"], float("nan")))
        return orig(self, batch)

    monkeypatch.setattr(step_mod.PretrainModule, "forward", fwd)


def test_skipped_step_restores_batchnorm_statistics(tmp_path, vocab_path, monkeypatch):
    _poison_frontal(monkeypatch, {2})
    res = main(_argv(tmp_path / "r", vocab_path, "--max-steps", "4"))
    assert res.step == 4 and res.bad_steps == 1
    st = W.load_checkpoint(res.last_checkpoint)
    sd = st["model"]
    assert _finite(sd)
    counts = {int(v) for k, v in sd.items() if k.endswith("num_batches_tracked")}
    assert counts == {3}  # 4 forwards, the skipped one undone
    assert {float(s["step"]) for s in st["optimizer"]["state"].values()} == {3.0}  # 4 steps, one update skipped
    model = medst_fast.from_pretrained(res.export_dir).eval()
    with torch.no_grad():
        z = model.encode_image(torch.zeros(2, 1, 32, 32))
    assert torch.isfinite(z).all()


def test_skip_step_puts_every_buffer_back(vocab_path):
    """StepRunner on its own: after a NaN forward and skip_step the buffers are bitwise what they were."""
    args = parse_args(_argv("unused", vocab_path))
    tok = medst_fast.get_tokenizer(vocab_path)
    model = medst_fast.create_model("medst_tiny", vision={"img_size": 32}, text={"max_length": 32})
    from medst_fast.losses import MedSTLoss
    from medst_fast.train.data import collate_pretokenized

    runner = step_mod.StepRunner(step_mod.PretrainModule(model, MedSTLoss(model.cfg.loss, False)),
                                 build_mod.build_optimizer(list(model.parameters()), args, torch.device("cpu")),
                                 torch.device("cpu"), "none")
    ds = RandomSeriesDataset(4, tok, 32, seed=1)
    batch = collate_pretokenized([ds[0], ds[1]])
    runner.forward_backward([batch])  # one good step so the statistics are not the initial ones
    runner.optimizer_step(1e-4)
    before = {k: v.clone() for k, v in model.named_buffers()}
    bad = dict(batch, frontal=torch.full_like(batch["frontal"], float("nan")))
    stats = runner.forward_backward([bad])
    assert stats.nonfinite.item() == 1
    assert any(not torch.equal(before[k], v) for k, v in model.named_buffers())  # the forward did write them
    runner.skip_step()
    for k, v in model.named_buffers():
        assert torch.equal(before[k], v), k
    assert all(p.grad is None for p in model.parameters())


_POISON_GRAD = """
import sys
import torch
from medst_fast.pretrain import _cli
from medst_fast.train import step as step_mod

orig = step_mod.StepRunner.optimizer_step

def step(self, lr):  # the loss was finite; a NaN gradient (e.g. from a sqrt at 0) reaches the update
    self.params[0].grad.view(-1)[0] = float("nan")
    return orig(self, lr)

step_mod.StepRunner.optimizer_step = step
sys.exit(_cli())
"""


def test_update_that_makes_weights_nonfinite_stops_and_writes_nothing(tmp_path, vocab_path):
    """A finite loss whose update makes the weights NaN: exit code 1, no export, no non-finite checkpoint."""
    out = tmp_path / "r"
    script = tmp_path / "poison.py"
    script.write_text(_POISON_GRAD)
    cmd = [sys.executable, str(script), *_argv(out, vocab_path, "--max-steps", "4", "--save-every", "100")]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "the update of step 1 made the weights NaN/inf" in r.stderr and "Traceback" not in r.stderr
    assert not (out / "final").exists() and not (out / "final_encoder").exists()
    assert W.list_checkpoints(str(out)) == []


def test_weights_check_runs_before_every_checkpoint(tmp_path, vocab_path, monkeypatch):
    """Even when the in-loop flag is bypassed, save() itself refuses non-finite tensors."""
    monkeypatch.setattr(step_mod.StepRunner, "nonfinite_weights",
                        lambda self: torch.zeros(1, dtype=torch.float64))
    orig = step_mod.StepRunner.optimizer_step

    def poisoning_step(self, lr):
        out = orig(self, lr)
        with torch.no_grad():
            self.params[0].fill_(float("inf"))
        return out

    monkeypatch.setattr(step_mod.StepRunner, "optimizer_step", poisoning_step)
    with pytest.raises(TrainingDiverged, match="refusing to write a checkpoint"):
        main(_argv(tmp_path / "r", vocab_path, "--max-steps", "2", "--save-every", "2"))
    assert W.list_checkpoints(str(tmp_path / "r")) == [] and not (tmp_path / "r" / "final").exists()


# -- checkpoints and exports are verified on load ------------------------------------------------------
def _small_run(out, vocab, *extra):
    return main(_argv(out, vocab, "--max-steps", "4", "--save-every", "2", "--no-export", *extra))


def _flip(path, offset, n=64):
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def test_flipped_bytes_in_an_export_are_detected(tmp_path):
    m = medst_fast.create_model("medst_tiny")
    medst_fast.save_pretrained(m, tmp_path / "exp")
    w = tmp_path / "exp" / "model.safetensors"
    _flip(str(w), os.path.getsize(w) - 4096)  # inside the tensor data, past the header
    with pytest.raises(ValueError, match="model.safetensors: the weights are corrupted"):
        medst_fast.from_pretrained(tmp_path / "exp")


def test_unsafe_pickle_and_truncation_have_their_own_messages(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    p = str(tmp_path / "evil.pt")
    torch.save({"format": 1, "model": Evil()}, p)
    W.write_hash_file(p)  # even with a matching hash it must not be unpickled
    with pytest.raises(W.CheckpointError) as e:
        W.load_checkpoint(p)
    msg = str(e.value).split(": ", 1)[1]  # without the path (it holds this test's name)
    assert "unsafe pickle" in msg and "truncated" not in msg and "weights_only" not in msg
    good = W.save_checkpoint({"format": 1, "model": {}, "optimizer": {}, "step": 1, "epoch": 0,
                               "step_in_epoch": 1, "rng": rng.capture_rng()}, str(tmp_path / "run"), 1, keep=2)
    with open(good, "r+b") as f:
        f.truncate(100)
    for verify in (True, False):  # by the hash file, and by the zip reader when the hash is not checked
        with pytest.raises(W.CheckpointError, match="truncated") as e:
            W.load_checkpoint(good, verify=verify)
        msg = str(e.value).split(": ", 1)[1]
        assert "weights_only" not in msg and "unsafe" not in msg


# -- resume and run folders ------------------------------------------------------------------------------------
def test_kill_before_the_first_checkpoint_leaves_no_duplicate_metrics(tmp_path, vocab_path, monkeypatch):
    out = tmp_path / "r"

    def killed(*a, **k):
        raise KeyboardInterrupt  # stands in for SIGKILL during the first checkpoint write

    monkeypatch.setattr(W, "save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        main(_argv(out, vocab_path, "--max-steps", "5", "--save-every", "5", "--no-export"))
    assert [int(r["step"]) for r in _metrics(out)] == [1, 2, 3, 4, 5] and W.list_checkpoints(str(out)) == []
    monkeypatch.undo()
    res = main(_argv(out, vocab_path, "--max-steps", "5", "--save-every", "5", "--no-export", "--resume", "auto"))
    assert res.step == 5
    assert [int(r["step"]) for r in _metrics(out)] == [1, 2, 3, 4, 5]


def test_two_processes_build_the_synthetic_cache_once(tmp_path):
    cache = tmp_path / "cache"
    code = ("import sys; from medst_fast.train.data import ensure_synthetic; "
            "print(ensure_synthetic(sys.argv[1], 6)[0])")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(cache)], env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert outs[0][0] == outs[1][0]
    (root,) = [p for p in cache.iterdir() if p.name.startswith("synthetic-")]
    assert (root / "COMPLETE").is_file() and (root / "vocab.txt").is_file()
    from medst_fast.data.index import SeriesIndex

    assert len(SeriesIndex.load(str(root / "index")).series["train"]) > 0


# -- a bad batch is skipped and counted, never a crash --------------------------------------------------
def test_one_study_batch_is_skipped_and_counted(tmp_path, vocab_path):
    """--batch-series 1 with a one-study series: the global heads' BatchNorm would see one row."""
    res = main(_argv(tmp_path / "r", vocab_path, "--batch-series", "1", "--max-steps", "8", "--no-export"))
    tok = medst_fast.get_tokenizer(vocab_path)
    ds = RandomSeriesDataset(8, tok, 32, seed=42)
    n_single = sum(ds[i]["frontal"].shape[0] == 1 for i in range(8))
    assert n_single >= 1  # the test needs one (series 5 with seed 42)
    assert res.step == 8 and res.bad_batches == n_single and res.bad_steps == 0
    rows = _metrics(tmp_path / "r")
    assert int(rows[-1]["bad_batches"]) == n_single
    skipped = [r for r in rows if r["loss"] == "nan"]
    assert len(skipped) == n_single and all(float(r["studies_per_s"]) == 0 for r in skipped)
    assert _finite(W.load_checkpoint(res.last_checkpoint)["model"])
    assert "unusable batch" in (tmp_path / "r" / "train.log").read_text()


@pytest.fixture(scope="module")
def broken_index(tmp_path_factory, vocab_path):
    """A 6-patient synthetic index whose first training series has every frontal image unreadable."""
    from medst_fast.data import prepare, synth
    from medst_fast.data.index import SeriesIndex

    root = tmp_path_factory.mktemp("broken")
    synth.generate(str(root / "tree"), patients=6, seed=3, extras=False, zip_reports=False, image_size=(64, 56))
    prepare.prepare_mimic(str(root / "tree"), str(root / "tree"), str(root / "idx"), cache_size=None, workers=0,
                          progress=False)
    idx = SeriesIndex.load(str(root / "idx"))
    for r in idx.series["train"][0]:
        with open(idx.path(idx.studies[r].frontal_path), "wb") as f:
            f.write(b"not a jpeg")
    return str(root / "idx"), len(idx.series["train"]), len(idx.series["train"][0])


@pytest.mark.parametrize("loader", ["pil", "nvjpeg"])
def test_all_unreadable_batch_is_skipped_and_counted(tmp_path, vocab_path, broken_index, loader):
    data, n_train, n_broken = broken_index
    argv = ["--data", data, "--vocab", vocab_path, "--out", str(tmp_path / "r"), "--workers", "0", "--batch-series", "1",
            "--epochs", "1", "--log-every", "1", "--no-export", "--progress", "off", "--loader", loader, *SMALL]
    res = main(argv)
    assert res.step == n_train and res.bad_batches >= 1  # the broken series, plus any one-study series
    rows = _metrics(tmp_path / "r")
    assert int(rows[-1]["bad_batches"]) == res.bad_batches
    # every frontal of the broken series is unreadable: each image counted, each study dropped
    assert int(rows[-1]["bad_images"]) == int(rows[-1]["dropped_studies"]) == n_broken
    text = (tmp_path / "r" / "train.log").read_text()
    assert "all 1 series of the batch are unreadable" in text and f"loader: {loader} (requested" in text


def test_bad_batch_stand_in_is_what_the_collate_returns():
    from medst_fast.data.dataset import SeriesCollate
    from medst_fast.train.data import SkipBadBatches

    out = SkipBadBatches(SeriesCollate())([[], []])
    assert out[BAD_BATCH].startswith("collate_series: every series in the batch is empty") and out["n_series"] == 2
    assert step_mod.batch_problem(out) == out[BAD_BATCH]
    with pytest.raises(KeyError):  # only the data's own "nothing usable" error becomes a stand-in
        SkipBadBatches(lambda items: {}["x"])([[1]])


def test_ranks_agree_on_skipping_a_bad_batch(tmp_path, vocab_path):
    """torchrun, 2 ranks, one series per rank: a rank holding the one-study series makes both ranks skip."""
    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "medst_fast.pretrain",
           *_argv(out, vocab_path, "--batch-series", "1", "--max-steps", "4", "--no-export")]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = _metrics(out)
    assert int(rows[-1]["bad_batches"]) == 1 and sum(r["loss"] == "nan" for r in rows) == 1, time.time() - t0


def test_model_override_and_flags_never_drop_each_other(vocab_path):
    """--model-override faithful=true used to be discarded by the --faithful default; clashes are errors."""
    args = parse_args(_argv("unused", vocab_path, "--model-override", "faithful=true",
                            "--model-override", 'text={"layers": 1}'))
    o = build_mod.model_overrides(args)
    assert o["faithful"] is True and o["text"] == {"layers": 1} and o["loss"]["lambda_ita"] == 1.0
    cfg = medst_fast.get_model_config("medst_tiny").replace(**o)
    assert cfg.faithful and cfg.text.layers == 1
    for extra in (["--faithful", "--model-override", "faithful=false"], ["--model-override", "loss.lambda_ita=2"]):
        with pytest.raises(SystemExit, match="have their own flags"):
            build_mod.model_overrides(parse_args(_argv("unused", vocab_path, *extra)))


def test_save_pretrained_removes_its_own_stale_temps_only(tmp_path):
    stale = tmp_path / ".tmp-killed"
    os.makedirs(stale)
    (stale / "model.safetensors").write_bytes(b"half")
    other = tmp_path / ".tmp-not-ours"
    os.makedirs(other)
    (other / "notes.txt").write_text("keep me")
    medst_fast.save_pretrained(medst_fast.create_model("medst_tiny"), tmp_path / "exp")
    assert not stale.exists() and (other / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-not-ours", "exp"]


# -- a non-finite validation (e.g. fp16 overflow in eval mode) is reported, never a best model, never a crash ------
class _NaNModel(torch.nn.Module):
    """Global embeddings with a NaN (what an fp16 overflow in eval mode gives) and a NaN loss."""

    def forward(self, batch):
        n = batch["frontal"].shape[0]
        img = torch.randn(n, 4)
        img[0, 0] = float("nan")
        return type("Out", (), {"img_global": img, "txt_global": torch.randn(n, 4)})()


class _ListLoader:
    def __init__(self, batches):
        self.batches = batches

    def set_epoch(self, epoch, start_batch=0):
        pass

    def __iter__(self):
        return iter(self.batches)


def _nan_validation():
    from medst_fast.train.validate import Validator

    loss = lambda out, model: type("L", (), {"total": torch.tensor(float("nan"))})()  # noqa: E731
    v = Validator(_ListLoader([{"frontal": torch.zeros(3, 1, 4, 4)}] * 2), n_series=2, batch_series=1)
    return v.run(_NaNModel(), loss, torch.device("cpu"), None, lambda b: b)


def test_nonfinite_validation_is_reported_as_such(caplog):
    from medst_fast.train.validate import describe, is_finite

    v = _nan_validation()
    assert v["studies"] == 6 and v["batches"] == 2
    assert math.isnan(v["val_loss"]) and math.isnan(v["val_r1"]) and not is_finite(v)
    line = describe(v)  # raised "cannot convert float NaN to integer" (the chance p-value of a NaN recall)
    assert line.startswith("NOT FINITE (val_loss nan, val_r1 nan, val_r5 nan)") and "6 studies" in line
    assert "validation is not finite" in caplog.text
    finite = dict(v, val_loss=1.0, val_r1=0.5, val_r5=1.0)
    assert is_finite(finite) and describe(finite).startswith("loss 1.0000")
    assert not is_finite(dict(finite, val_r1=float("nan")))  # NaN embeddings with a finite loss are not finite
    none = describe(dict(v, studies=0, batches=0, skipped=2))  # every validation image unreadable
    assert none == "no study could be validated (0 batch(es), 2 unreadable batch(es) skipped): no numbers"


def test_nonfinite_validation_is_not_a_best_model_and_training_goes_on(tmp_path, monkeypatch):
    """The trainer's decision on a NaN validation: no best/ export, best_val kept, the step goes on (no raise)."""
    from medst_fast.train import loop as loop_mod
    from medst_fast.train.state import TrainState

    nan = _nan_validation()
    t = loop_mod.Training.__new__(loop_mod.Training)
    t.run = types.SimpleNamespace(
        validator=type("V", (), {"run": lambda self, *a: dict(nan)})(), total_steps=10, eval_every=2,
        args=argparse.Namespace(no_export=False), model=None, val_loss_fn=None, device=torch.device("cpu"),
        run_dir=str(tmp_path), runner=types.SimpleNamespace(dtype=torch.float16))
    t.state, t.last_ckpt = TrainState(step=4, best_val=3.5), None
    t.window, t.result = loop_mod.Window(), loop_mod.TrainResult(str(tmp_path), 4, 0)
    exported = []
    monkeypatch.setattr(loop_mod, "export_best", lambda *a: exported.append(a))
    v = t.validate_if_due()
    assert v is not None and math.isnan(v["val_loss"])
    assert t.state.best_val == 3.5 and exported == []
    t.state.best_val = None  # nor is it the first best model
    t.validate_if_due()
    assert t.state.best_val is None and exported == []


# -- a run that made no update stops with the cause, and exports nothing ---------------------------------------------
@pytest.fixture(scope="module")
def imageless_index(tmp_path_factory):
    """A 6-patient synthetic index whose images were all deleted after prepare (image_root still exists)."""
    from medst_fast.data import prepare, synth

    root = tmp_path_factory.mktemp("imageless")
    synth.generate(str(root / "tree"), patients=6, seed=3, extras=False, zip_reports=False, image_size=(64, 56))
    prepare.prepare_mimic(str(root / "tree"), str(root / "tree"), str(root / "idx"), cache_size=None, workers=0,
                          progress=False)
    for d, _, files in os.walk(root / "tree"):
        for name in files:
            if name.endswith(".jpg"):
                os.unlink(os.path.join(d, name))
    return str(root / "idx")


def _index_argv(out, data, vocab, *extra):
    return ["--data", data, "--vocab", vocab, "--out", str(out), "--workers", "0", "--batch-series", "2",
            "--log-every", "1", "--progress", "off", "--loader", "pil", *SMALL, *extra]


def test_steps_in_a_row_without_an_update_stop_naming_the_cause(tmp_path, vocab_path, imageless_index):
    out = tmp_path / "r"
    with pytest.raises(faults_mod.NoUpdates, match=r"3 steps in a row made no update .*--max-bad-steps 3.*missing_image "
                                                  r"\d+.*meta.json field 'image_root'"):
        main(_index_argv(out, imageless_index, vocab_path, "--max-steps", "10", "--max-bad-steps", "3"))
    assert not (out / "final").exists() and not (out / "best").exists()


def test_a_run_that_made_no_update_exports_nothing(tmp_path, vocab_path, imageless_index):
    out = tmp_path / "r"  # fewer steps than --max-bad-steps: the end of the run catches it
    with pytest.raises(faults_mod.NoUpdates, match=r"none of the run's 2 steps made an update.*2 unusable batch"):
        main(_index_argv(out, imageless_index, vocab_path, "--max-steps", "2"))
    assert not (out / "final").exists() and not (out / "final_encoder").exists()


def test_meta_json_without_image_root_is_refused(tmp_path, vocab_path, imageless_index, monkeypatch, capsys):
    import shutil

    data = str(tmp_path / "idx")
    shutil.copytree(imageless_index, data)
    meta = json.loads(open(os.path.join(data, "meta.json")).read())
    del meta["image_root"]
    open(os.path.join(data, "meta.json"), "w").write(json.dumps(meta))
    rc, err = _cli_run(monkeypatch, capsys, _index_argv(tmp_path / "r", data, vocab_path, "--max-steps", "2"))
    assert rc == 2 and f"{data}/meta.json: field 'image_root' is missing" in err, err
    assert not (tmp_path / "r").exists()
