"""Training checkpoints: atomic writes, rotation, weights_only loading, RNG round trips, damaged files."""
import os
import random

import numpy as np
import pytest
import torch

from medst_fast.pretrain import main
from medst_fast.train import checkpoint as ck
from medst_fast import weights as W


def _state(step, x=1.0):
    return {"format": W.FORMAT_VERSION, "model": {"w": torch.full((3,), x)}, "optimizer": {}, "step": step,
            "epoch": 0, "step_in_epoch": step, "rng": ck.capture_rng()}


def test_rotation_keeps_last_k(tmp_path):
    for s in range(1, 6):
        W.save_checkpoint(_state(s), str(tmp_path), s, keep=2)
    assert [os.path.basename(p) for p in W.list_checkpoints(str(tmp_path))] == ["ckpt-00000004.pt", "ckpt-00000005.pt"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [  # each kept checkpoint with its hash, nothing else
        "ckpt-00000004.pt", "ckpt-00000004.pt.sha256", "ckpt-00000005.pt", "ckpt-00000005.pt.sha256"]
    assert W.resolve_resume("auto", str(tmp_path)).endswith("ckpt-00000005.pt")
    assert W.resolve_resume("auto", str(tmp_path / "nothing")) is None


def test_interrupted_write_leaves_previous(tmp_path, monkeypatch):
    W.save_checkpoint(_state(1), str(tmp_path), 1, keep=1)

    def dying_save(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of torch.save

    monkeypatch.setattr(W.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        W.save_checkpoint(_state(2), str(tmp_path), 2, keep=1)
    # no partial file, the old one kept with its hash
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["ckpt-00000001.pt", "ckpt-00000001.pt.sha256"]
    assert W.load_checkpoint(W.list_checkpoints(str(tmp_path))[0])["step"] == 1


def test_weights_only_and_rng_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.randn(), torch.randn(2), np.random.randn()  # numpy with a cached gaussian
    path = W.save_checkpoint(_state(7), str(tmp_path), 7, keep=3)
    want = (random.random(), np.random.randn(3).tolist(), torch.randn(3).tolist())
    torch.load(path, weights_only=True)  # plain data only: no pickled code needed
    st = W.load_checkpoint(path)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    ck.restore_rng(st["rng"])
    assert (random.random(), np.random.randn(3).tolist(), torch.randn(3).tolist()) == want


@pytest.mark.parametrize("damage,expect", [("truncate", "is truncated"), ("garbage", "content hash mismatch"),
                                           ("empty", "is truncated"), ("longer", "is corrupted")])
def test_corrupted_file_gives_clear_error(tmp_path, damage, expect):
    W.save_checkpoint(_state(1), str(tmp_path), 1, keep=3)
    p2 = W.save_checkpoint(_state(2), str(tmp_path), 2, keep=3)
    data = open(p2, "rb").read()
    with open(p2, "wb") as f:
        f.write({"truncate": data[: len(data) // 2], "garbage": os.urandom(len(data)), "empty": b"",
                 "longer": data + b"\0"}[damage])
    with pytest.raises(W.CheckpointError) as e:
        W.load_checkpoint(p2)
    msg = str(e.value)
    assert p2 in msg and expect in msg and "ckpt-00000001.pt" in msg and "weights_only" not in msg
    assert os.path.isfile(W.ckpt_path(str(tmp_path), 1))


def test_not_a_training_checkpoint(tmp_path):
    p = tmp_path / "x.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, p)
    with pytest.raises(W.CheckpointError, match="no content hash"):
        W.load_checkpoint(str(p))
    W.write_hash_file(str(p))
    with pytest.raises(W.CheckpointError, match="missing fields"):
        W.load_checkpoint(str(p))
    with pytest.raises(W.CheckpointError, match="not found"):
        W.resolve_resume(str(tmp_path / "nope.pt"), str(tmp_path))


def _argv(out, vocab, *extra):
    return ["--dataset-type", "random", "--vocab", vocab, "--out", str(out), "--workers", "0", "--batch-series", "3",
            "--log-every", "2", "--no-export", *extra]


def test_trainer_corrupted_resume(tmp_path, vocab_path):
    out = tmp_path / "run"
    res = main(_argv(out, vocab_path, "--max-steps", "4", "--save-every", "2"))
    assert res.step == 4
    ckpts = W.list_checkpoints(str(out))
    assert [os.path.basename(p) for p in ckpts] == ["ckpt-00000002.pt", "ckpt-00000004.pt"]
    with open(ckpts[-1], "r+b") as f:
        f.truncate(1000)
    # an explicit path must itself be intact
    with pytest.raises(W.CheckpointError, match="ckpt-00000004.pt: checkpoint is truncated"):
        main(_argv(out, vocab_path, "--max-steps", "4", "--resume", ckpts[-1]))
    # auto falls back to the newest intact one (with a warning) instead of stopping
    res = main(_argv(out, vocab_path, "--max-steps", "4", "--resume", "auto"))
    assert res.step == 4 and os.path.isfile(ckpts[0])
    assert "falling back to" in (out / "train.log").read_text()
    assert W.load_checkpoint(ckpts[-1])["step"] == 4  # rewritten intact by the resumed run
    with pytest.raises(W.CheckpointError, match="batch-series"):
        main(_argv(out, vocab_path, "--max-steps", "4", "--resume", "auto") + ["--batch-series", "2"])
