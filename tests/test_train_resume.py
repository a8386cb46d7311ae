"""Resuming a run that was killed (kill -9) ends bitwise where the uninterrupted run ends.

That needs the data order to be a function of (seed, epoch), exactly the consumed batches skipped, per-item
augmentation independent of the worker that loads it, every RNG/optimizer/scaler state and the loader's counts
restored, validation drawing nothing from the RNGs, and the metrics rows a killed run logged after its last
checkpoint dropped.

One uninterrupted reference run per (data, loader, validation) setting, with a checkpoint every step, also gives
the killed runs: just before it writes checkpoint K+1, the run folder is copied aside. That copy is, file for
file, the folder of a run killed -9 at that moment (checkpoints up to K, metrics rows up to K+1, the lock file
of a process that no longer holds it). One case kills a real CLI process with SIGKILL instead.
"""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from medst_fast.data import loaders as L
from medst_fast.pretrain import main
from medst_fast.train import run_dir as R
from medst_fast import weights as W

from conftest import move_to_valid, tiny_run_argv

MAX_STEPS = 7
KILL_POINTS = (2, 3)  # the checkpoints a killed copy of a reference run resumes from
SMALL = ["--model-override", "vision.img_size=32", "--model-override", "text.max_length=32"]
HAS_DALI = L.dali_missing() is None


def _argv(out, vocab, data, loader, val):
    # 2 series per micro-batch, 2 micro-batches per step: 3 steps per epoch on 12-13 training series, 2 with a
    # validation split, so 7 steps cross two or three epoch boundaries.
    if data is None:
        src = ["--dataset-type", "random", "--random-series", "12"]
    else:
        src = ["--data", data, "--loader", loader]
    workers = "1" if loader in ("random", "pil") else "0"  # a loader worker: per-item seeding off the main thread
    return [*src, "--vocab", vocab, "--out", str(out), "--batch-series", "2", "--accum-steps", "2",
            "--max-steps", str(MAX_STEPS), "--save-every", "1", "--keep", "20", "--workers", workers,
            "--log-every", "1", "--progress", "off", "--seed", "3", "--clip-grad", "1.0",
            *(["--eval-every", "2"] if val else ["--no-export"]), *SMALL]  # best/ is exported by validation


def _metrics(out):
    with open(os.path.join(str(out), "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def indexes(tmp_path_factory, copy_index):
    """The tiny index with one unreadable lateral (the loader's bad-image count must survive a resume), and the
    same with its last 3 training series as a 'valid' split."""
    from medst_fast.data.index import SeriesIndex

    out = {}
    for val in (False, True):
        path = copy_index(tmp_path_factory.mktemp("val" if val else "train") / "copy")
        idx = SeriesIndex.load(path)
        lateral = next(idx.studies[r].lateral_path for s in idx.series["train"] for r in s
                       if idx.studies[r].lateral_path)
        with open(idx.path(lateral), "wb") as f:
            f.write(b"\xff\xd8 not really a jpeg")
        if val:
            move_to_valid(idx, 3)
            idx.save(path)
        out[val] = path
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, vocab_path, indexes):
    """``reference(data_kind, loader, val)``: (run folder, {K: copy of the folder just before checkpoint K+1}),
    made once per setting."""
    made = {}

    def get(data_kind, loader, val):
        key = (data_kind, loader, val)
        if key not in made:
            root = tmp_path_factory.mktemp("ref")
            out = root / "run"
            data = indexes[val] if data_kind == "index" else None
            snaps = {}
            real_save = W.save_checkpoint

            def save_and_snapshot(state, run_dir, step, keep):
                if step - 1 in KILL_POINTS:
                    snaps[step - 1] = str(root / f"killed_after_{step - 1}")
                    shutil.copytree(run_dir, snaps[step - 1])
                return real_save(state, run_dir, step, keep)

            W.save_checkpoint = save_and_snapshot
            try:
                res = main(_argv(out, vocab_path, data, loader, val))
            finally:
                W.save_checkpoint = real_save
            assert res.step == MAX_STEPS and res.bad_steps == 0
            assert sorted(snaps) == list(KILL_POINTS), "the checkpoints were not written by checkpoint.save_checkpoint"
            made[key] = (str(out), snaps, _argv(out, vocab_path, data, loader, val))
        return made[key]

    return get


def _sigkilled(argv, out):
    """The same run as a CLI process, SIGKILLed once its checkpoint 2 exists (it may have gone a bit further)."""
    cmd = [sys.executable, "-m", "medst_fast.pretrain", *argv]
    cmd[cmd.index("--out") + 1] = str(out)
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = W.ckpt_path(str(out), 2)
    deadline = time.time() + 300
    while not os.path.exists(first) and p.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    err = p.communicate()[1].decode(errors="replace")
    assert p.returncode == -signal.SIGKILL, err[-3000:]
    done = W.list_checkpoints(str(out))
    assert done and W.ckpt_path(str(out), MAX_STEPS) not in done, "the run finished before it could be killed"
    return str(out)


# (data, loader, validation, kill point): the kill point is the checkpoint the resume starts from: 2 is step 2
# of 3 in the first epoch, 3 the end of the first epoch; "sigkill" kills a real process after checkpoint 2.
CASES = [
    pytest.param("random", "random", False, "sigkill", id="random-sigkill"),
    pytest.param("index", "nvjpeg", False, 2, id="nvjpeg-mid_epoch"),
    pytest.param("index", "nvjpeg", False, 3, id="nvjpeg-epoch_end"),
    pytest.param("index", "dali", False, 2, id="dali-mid_epoch",
                 marks=pytest.mark.skipif(not HAS_DALI, reason=f"DALI: {L.dali_missing()}")),
    pytest.param("index", "pil", True, 3, id="pil-validation-mid_epoch"),
]


@pytest.mark.parametrize("data_kind, loader, val, kill", CASES)
def test_killed_run_resumes_bitwise(tmp_path, reference, data_kind, loader, val, kill):
    ref_out, snaps, argv = reference(data_kind, loader, val)
    if kill == "sigkill":
        out = _sigkilled(argv, tmp_path / "killed")
    else:
        out = shutil.copytree(snaps[kill], tmp_path / "killed")
        newest = W.list_checkpoints(str(out))[-1]
        assert newest == W.ckpt_path(str(out), kill)
        at_epoch_start = W.load_checkpoint(newest)["step_in_epoch"] == 0
        assert at_epoch_start == (kill == 3 and not val)  # the kill point is what the case says
        assert int(_metrics(out)[-1]["step"]) == kill + 1  # a row logged after the last checkpoint

    res = main(["--out", str(out), "--resume", "auto"])  # the run's own flags, --loader included
    assert res.step == MAX_STEPS
    text = (tmp_path / "killed" / "train.log").read_text()
    assert "resumed from" in text and "--resume: taking" in text  # the flags not given come from args.json
    if data_kind == "index":
        assert f"loader: {loader} (requested" in text

    a = W.load_checkpoint(W.ckpt_path(ref_out, MAX_STEPS))
    b = W.load_checkpoint(res.last_checkpoint)
    assert (a["epoch"], a["step_in_epoch"]) == (b["epoch"], b["step_in_epoch"])
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k  # bitwise
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for k, s in a["optimizer"]["state"].items():
        for name, v in s.items():
            assert torch.equal(v, b["optimizer"]["state"][k][name]), (k, name)

    # the metrics continue the killed run's without a duplicated step, with the same numbers
    ra, rb = _metrics(ref_out), _metrics(out)
    assert [r["step"] for r in rb] == [str(i) for i in range(1, MAX_STEPS + 1)]
    cols = ["loss", "bad_images", *(["val_loss", "val_r1", "val_r5"] if val else [])]
    assert [[r[c] for c in cols] for r in ra] == [[r[c] for c in cols] for r in rb]
    if data_kind == "index":
        assert int(rb[-1]["bad_images"]) >= 1  # the unreadable lateral was counted, and the count carried over
    if val:
        assert [r["step"] for r in rb if r["val_loss"]][:3] == ["2", "4", "6"]
        with open(os.path.join(ref_out, "best", "best.json")) as f:
            assert json.load(f) == json.loads((tmp_path / "killed" / "best" / "best.json").read_text())


def test_the_loader_may_change_on_resume(tmp_path, reference):
    """--loader does not change the data: a run made with pil resumes on nvjpeg without --allow-changed-args,
    and trains on the same batches (pixels may differ by a grey level, so the loss is close, not bitwise)."""
    ref_out, snaps, _ = reference("index", "pil", True)
    out = shutil.copytree(snaps[3], tmp_path / "killed")
    res = main(["--out", str(out), "--resume", "auto", "--loader", "nvjpeg"])
    assert res.step == MAX_STEPS
    assert "loader: nvjpeg (requested" in (tmp_path / "killed" / "train.log").read_text()
    ra, rb = _metrics(ref_out), _metrics(out)
    assert [r["step"] for r in rb] == [str(i) for i in range(1, MAX_STEPS + 1)]
    for x, y in zip(ra[3:], rb[3:]):
        assert float(y["loss"]) == pytest.approx(float(x["loss"]), rel=2e-2)


# -- a run that exists: the session's finished run (tiny_run), copied -------------------------------------------
def _resume_argv(out, vocab, *extra):
    return tiny_run_argv(out, vocab, "--resume", "auto", *extra)


REFUSALS = [  # (extra flags, fewer series in the data set, the message)
    *[pytest.param([flag, value], False, f"resuming would change the run: {flag} .*--allow-changed-args", id=flag)
      for flag, value in (("--lr", "1e-3"), ("--max-steps", "6"), ("--epochs", "3"), ("--warmup-frac", "0.1"),
                          ("--lambda-temporal", "0"), ("--clip-grad", "1"), ("--local-scope", "batch"),
                          ("--local-weighting", "uniform"))],
    pytest.param(["--temporal-shuffle"], False, "resuming would change the run: --temporal-shuffle .*--allow-changed",
                 id="--temporal-shuffle"),
    pytest.param(["--batch-series", "3"], False, "batch-series", id="--batch-series"),
    pytest.param(["--series-len", "3", "--allow-changed-args"], False,
                 "cannot resume with changed settings .*--series-len 4 -> 3", id="--series-len"),
    pytest.param(["--max-steps", "2", "--allow-changed-args"], False, "past the end of this run", id="past-the-end"),
    pytest.param(["--allow-changed-args"], True, "the data set has 6 series, the checkpoint's run had 8",
                 id="fewer-series"),
]


@pytest.mark.parametrize("extra, fewer_series, msg", REFUSALS)
def test_resume_refuses_a_changed_run(tmp_path, copy_run, vocab_path, monkeypatch, extra, fewer_series, msg):
    """A resume that would change what the run computes is refused before anything is written."""
    from medst_fast.train.data import RandomSeriesDataset

    out = copy_run(tmp_path / "r")
    args_before = (tmp_path / "r" / "args.json").read_bytes()
    metrics_before = (tmp_path / "r" / "metrics.csv").read_bytes()
    ckpts = W.list_checkpoints(out)
    if fewer_series:
        monkeypatch.setattr(RandomSeriesDataset, "__len__", lambda self: 6)  # the same flags, fewer series
    with pytest.raises(W.CheckpointError, match=msg):
        main(_resume_argv(out, vocab_path, *extra))
    assert (tmp_path / "r" / "args.json").read_bytes() == args_before  # a refused resume rewrites nothing
    assert (tmp_path / "r" / "metrics.csv").read_bytes() == metrics_before
    assert W.list_checkpoints(out) == ckpts


def test_allow_changed_args_resumes_with_the_change(tmp_path, copy_run, vocab_path):
    out = copy_run(tmp_path / "r")
    assert json.loads((tmp_path / "r" / "args.json").read_text())["lr"] == 4e-5
    res = main(_resume_argv(out, vocab_path, "--max-steps", "6", "--lambda-temporal", "0.5", "--local-scope", "batch",
                            "--allow-changed-args"))
    assert res.step == 6
    log_text = (tmp_path / "r" / "train.log").read_text()
    assert "--allow-changed-args: resuming" in log_text and "--lambda-temporal 1.0 -> 0.5" in log_text
    after = json.loads((tmp_path / "r" / "args.json").read_text())
    assert (after["max_steps"], after["lambda_temporal"], after["local_scope"]) == (6, 0.5, "batch")
    assert W.load_checkpoint(res.last_checkpoint)["config"]["loss"]["lambda_temporal"] == 0.5
    assert [r["step"] for r in _metrics(out)] == [str(i) for i in range(1, 7)]


def test_a_damaged_checkpoint_is_refused_by_path_and_skipped_by_auto(tmp_path, copy_run, vocab_path):
    out = copy_run(tmp_path / "r")
    c2, c4 = W.list_checkpoints(out)
    with open(c4, "r+b") as f:
        f.truncate(os.path.getsize(c4) // 3)
    # an explicit path must itself be intact
    with pytest.raises(W.CheckpointError, match="ckpt-00000004.pt: checkpoint is truncated"):
        main(tiny_run_argv(out, vocab_path, "--resume", c4))
    # auto falls back to the newest intact one (with a warning) instead of stopping
    res = main(_resume_argv(out, vocab_path))
    assert res.step == 4
    text = (tmp_path / "r" / "train.log").read_text()
    assert "skipping a damaged checkpoint" in text and "checkpoint is truncated" in text and "falling back to" in text
    assert f"resumed from {c2}" in text
    assert W.load_checkpoint(c4)["step"] == 4  # rewritten intact by the resumed run


def test_flipped_bytes_in_a_checkpoint_are_detected(tmp_path, copy_run):
    out = copy_run(tmp_path / "r")
    last = W.list_checkpoints(out)[-1]
    with open(last, "r+b") as f:
        f.seek(os.path.getsize(last) // 2)
        data = f.read(64)
        f.seek(os.path.getsize(last) // 2)
        f.write(bytes(b ^ 0xFF for b in data))
    with pytest.raises(W.CheckpointError, match="content hash mismatch") as e:
        W.load_checkpoint(last)
    assert "weights_only" not in str(e.value)


def test_stale_temps_from_killed_writes_are_removed(tmp_path, copy_run, vocab_path):
    out = tmp_path / "r"
    copy_run(out)
    d = out / "checkpoints"
    (d / ".tmp-ckpt-dead.pt").write_bytes(b"PK half")
    (d / "ckpt-00000099.pt.sha256").write_text("{}")  # hash of a checkpoint whose rename never happened
    os.makedirs(out / ".tmp-export-dead")
    (out / ".tmp-export-dead" / "model.safetensors").write_bytes(b"x")
    # a temp that a live writer holds (another process, flock) must survive the cleanup
    held = out / ".tmp-held"
    os.makedirs(held)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
                               "os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); "
                               "time.sleep(60)", str(held)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        main(_resume_argv(out, vocab_path, "--no-export"))  # nothing left to train: the cleanup is what runs
        assert held.is_dir()
    finally:
        holder.kill()
        holder.wait()
    assert not (d / ".tmp-ckpt-dead.pt").exists() and not (out / ".tmp-export-dead").exists()
    assert not (d / "ckpt-00000099.pt.sha256").exists()
    assert "removed 3 file(s) left by interrupted writes" in (out / "train.log").read_text()


def test_fresh_run_into_an_existing_run_needs_resume_or_overwrite(tmp_path, copy_run, vocab_path):
    """The CLI reaches the run-folder rule (its cases, --overwrite included: tests/test_train_run_dir.py)."""
    out = tmp_path / "r"
    copy_run(out)
    old_final = (out / "final" / "model.safetensors").read_bytes()
    with pytest.raises(R.RunFolderError, match="already holds a run .*--resume auto.*--overwrite"):
        main(tiny_run_argv(out, vocab_path, "--max-steps", "2", "--seed", "7"))
    assert (out / "final" / "model.safetensors").read_bytes() == old_final
    assert json.loads((out / "args.json").read_text())["seed"] == 42
