"""train/run_dir.py: one trainer per run folder, stale temps cleared, no fresh run over another (no training)."""
import os
import subprocess
import sys

import pytest
from medst_fast.train import run_dir as R


def _a_finished_run(d):
    """The files a finished run leaves (written by hand: the rules read names, not contents)."""
    os.makedirs(d / "checkpoints")
    (d / "checkpoints" / "ckpt-00000004.pt").write_bytes(b"x")
    for n in ("args.json", "metrics.csv", "train.log", "wandb-id.txt"):
        (d / n).write_text("{}")
    for n in ("final", "final_encoder", "best", "tensorboard"):
        os.makedirs(d / n)
        (d / n / "model.safetensors").write_bytes(b"w")


def _files(d):
    return sorted(n for n in os.listdir(d) if n != ".lock")  # the lock file stays: it is opened, never removed


def _claim(d, resume=None, overwrite=False):
    lock, removed = R.claim(str(d), resume, overwrite, primary=True)
    lock.release()
    return removed


def test_a_fresh_run_is_refused_over_another_run_and_nothing_is_touched(tmp_path):
    d = tmp_path / "r"
    _a_finished_run(d)
    before = _files(d)
    with pytest.raises(R.RunFolderError, match=r"already holds a run \(args.json, metrics.csv, final, final_encoder, "
                                                 r"best, checkpoints/ckpt-00000004.pt\); continue it with --resume "
                                                 r"auto, or start over with --overwrite"):
        _claim(d)
    assert _files(d) == before
    _claim(d, resume="auto")  # continuing it is fine
    assert _files(d) == before


def test_overwrite_deletes_the_previous_runs_outputs_only(tmp_path):
    d = tmp_path / "r"
    _a_finished_run(d)
    (d / "notes.txt").write_text("mine")
    _claim(d, overwrite=True)
    assert _files(d) == ["notes.txt"]


def test_an_empty_or_new_folder_is_claimed(tmp_path):
    assert _claim(tmp_path / "new") == []
    assert os.path.isdir(tmp_path / "new")


def test_temps_of_killed_writers_are_removed_when_claimed(tmp_path):
    d = tmp_path / "r"
    os.makedirs(d / "checkpoints")
    (d / "checkpoints" / ".tmp-ckpt-abc.pt").write_bytes(b"half")
    (d / ".tmp-metrics.csv").write_text("half")
    removed = _claim(d, resume="auto")
    assert sorted(os.path.basename(p) for p in removed) == [".tmp-ckpt-abc.pt", ".tmp-metrics.csv"]
    assert not (d / "checkpoints" / ".tmp-ckpt-abc.pt").exists() and not (d / ".tmp-metrics.csv").exists()


def test_a_second_trainer_on_a_run_folder_is_refused(tmp_path):
    d = tmp_path / "r"
    os.makedirs(d)
    code = ("import sys, time; from medst_fast.train.run_dir import RunLock; RunLock(sys.argv[1]); "
            "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(d)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(R.RunFolderError, match=f"in use by another trainer \\(pid {holder.pid}\\)"):
            _claim(d)
    finally:
        holder.kill()
        holder.wait()
    lock = R.RunLock(str(d))  # in this process too
    try:
        with pytest.raises(R.RunFolderError, match="in use by another trainer in this process"):
            _claim(d)
    finally:
        lock.release()
    _claim(d)  # free again once the holder is gone
