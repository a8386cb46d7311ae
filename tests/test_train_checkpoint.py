"""Training checkpoints: atomic writes, rotation, weights_only loading, RNG round trips, damaged files."""
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch

from medst_fast.data import index as index_mod

from medst_fast.train import rng

from medst_fast.train import state as state_mod
from medst_fast import weights as W


def _state(step, x=1.0):
    return {"format": W.FORMAT_VERSION, "model": {"w": torch.full((3,), x)}, "optimizer": {}, "step": step,
            "epoch": 0, "step_in_epoch": step, "rng": rng.capture_rng()}


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
    rng.restore_rng(st["rng"])
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


# -- the index a run trained on is part of the run ------------------------------------------------------------------
def _copy_index(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_index_fingerprint_sees_changed_reports_not_a_moved_image_root(tmp_path, tiny_index):
    from medst_fast.data.index import SeriesIndex

    base = index_mod.index_fingerprint(tiny_index)
    assert index_mod.index_fingerprint(_copy_index(tiny_index, tmp_path / "same")) == base
    moved = _copy_index(tiny_index, tmp_path / "moved")  # the images copied elsewhere, the index pointed at them
    meta = json.loads(open(os.path.join(moved, "meta.json")).read())
    meta["image_root"] = "/scratch/images"
    open(os.path.join(moved, "meta.json"), "w").write(json.dumps(meta))
    assert index_mod.index_fingerprint(moved) == base
    changed = tmp_path / "changed"  # every report rewritten, the same series: the count check cannot see it
    idx = SeriesIndex.load(tiny_index)
    for s in idx.studies:
        s.text = "no acute cardiopulmonary process."
    idx.save(str(changed))
    assert len(SeriesIndex.load(str(changed)).series["train"]) == len(idx.series["train"])
    assert index_mod.index_fingerprint(str(changed)) != base


def test_resume_check_refuses_another_index_unless_allowed(caplog):
    p = "/r/checkpoints/ckpt-00000002.pt"
    state_mod.check_data_fingerprint(p, "a" * 64, "a" * 64, "/data/idx", allow_changed=False)  # the same index
    state_mod.check_data_fingerprint(p, None, "b" * 64, "/data/idx", allow_changed=False)  # an older checkpoint: no field
    with pytest.raises(W.CheckpointError, match=r"ckpt-00000002.pt: resuming would change the run: the index "
                                                 r"/data/idx differs .*--allow-changed-args"):
        state_mod.check_data_fingerprint(p, "a" * 64, "b" * 64, "/data/idx", allow_changed=False)
    state_mod.check_data_fingerprint(p, "a" * 64, "b" * 64, "/data/idx", allow_changed=True)
    assert "--allow-changed-args: resuming" in caplog.text and "aaaaaaaaaaaa -> bbbbbbbbbbbb" in caplog.text
