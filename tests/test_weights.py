"""medst_fast.weights: the checkpoint file format (version 1) as files on disk, written and read."""
import hashlib
import json
import os

import pytest
import torch

from medst_fast import weights as W


def _state(step):
    return {"format": 1, "model": {"w": torch.arange(4.0)}, "optimizer": {}, "step": step, "epoch": 0,
            "step_in_epoch": step, "rng": {"torch": torch.get_rng_state()}}


def test_a_version_1_checkpoint_written_by_hand_loads(tmp_path):
    """The format spelled out without the writer: ckpt-<8 digits>.pt (torch.save) beside a JSON sidecar
    {"sha256", "size"} of its bytes, under <run>/checkpoints/. Checkpoints of earlier versions look like this."""
    d = tmp_path / "checkpoints"
    d.mkdir()
    p = d / "ckpt-00000012.pt"
    torch.save(_state(12), p)
    data = p.read_bytes()
    (d / "ckpt-00000012.pt.sha256").write_text(json.dumps({"sha256": hashlib.sha256(data).hexdigest(),
                                                           "size": len(data)}))
    assert W.list_checkpoints(str(tmp_path)) == [str(p)]
    st = W.load_checkpoint(str(p))
    assert st["step"] == 12 and torch.equal(st["model"]["w"], torch.arange(4.0))
    path, st2 = W.load_resume("auto", str(tmp_path))
    assert path == str(p) and st2["step"] == 12


def test_the_writer_produces_that_format(tmp_path):
    path = W.save_checkpoint(_state(3), str(tmp_path), 3, keep=2)
    assert path == os.path.join(str(tmp_path), "checkpoints", "ckpt-00000003.pt")
    data = open(path, "rb").read()
    rec = json.loads(open(path + ".sha256").read())
    assert rec == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert torch.load(path, weights_only=True)["step"] == 3
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["ckpt-00000003.pt", "ckpt-00000003.pt.sha256"]


def test_a_changed_byte_is_refused_before_unpickling(tmp_path):
    path = W.save_checkpoint(_state(1), str(tmp_path), 1, keep=1)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 1
    open(path, "wb").write(bytes(data))
    with pytest.raises(W.CheckpointError, match="content hash mismatch"):
        W.load_checkpoint(path)
