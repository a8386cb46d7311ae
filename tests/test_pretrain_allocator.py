"""The trainer's entry sets PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True for CUDA runs, only when the user
left every allocator variable unset, before anything touches CUDA memory."""
import os

import pytest
import torch

from medst_fast import pretrain


def test_setting_only_for_cuda_and_only_when_unset():
    assert pretrain.allocator_setting({}, uses_cuda=True) == "expandable_segments:True"
    assert pretrain.allocator_setting({}, uses_cuda=False) is None
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF"):
        assert pretrain.allocator_setting({name: "max_split_size_mb:256"}, uses_cuda=True) is None
        assert pretrain.allocator_setting({name: ""}, uses_cuda=True) is None  # set empty on purpose


@pytest.mark.parametrize("device,gpu,env,want,printed", [
    (None, True, {}, "expandable_segments:True", True),
    ("cuda", True, {"RANK": "1"}, "expandable_segments:True", False),  # every rank sets it, rank 0 says it
    ("cpu", True, {}, None, False),
    (None, False, {}, None, False),
    (None, True, {"PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync"}, None, False),
])
def test_configure_allocator(monkeypatch, capsys, device, gpu, env, want, printed):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    environ = dict(env)
    assert pretrain.configure_allocator(device, environ) == want
    if want:
        assert environ["PYTORCH_CUDA_ALLOC_CONF"] == want
    else:
        assert environ == env
    err = capsys.readouterr().err
    assert ("PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in err) == printed and err.count("\n") == int(printed)


def test_main_sets_it_before_the_trainer_runs(monkeypatch):
    from medst_fast.train import loop

    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF"):
        monkeypatch.setenv(name, "x")  # recorded, so that teardown restores this process's environment...
        monkeypatch.delenv(name)  # ...whatever main() writes into it
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen = {}

    def fake_train(args):
        seen["conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
        seen["device"] = args.device
        return "done"

    monkeypatch.setattr(loop, "train", fake_train)
    assert pretrain.main([]) == "done"
    assert seen == {"conf": "expandable_segments:True", "device": None}
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "garbage_collection_threshold:0.6")
    pretrain.main([])
    assert seen["conf"] == "garbage_collection_threshold:0.6"
