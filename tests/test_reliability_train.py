"""Trainer reliability: no silent wrong result in steps, checkpoints, resume, run folders, flags and batches."""
import torch

from medst_fast.train.loop import batch_to


def test_batch_to_keeps_a_host_copy_of_has_lateral():
    lat = torch.tensor([True, False, True])
    b = batch_to({"has_lateral": lat, "frontal": torch.zeros(3, 1, 4, 4), "n_full_series": 0}, torch.device("cpu"))
    assert b["has_lateral_host"] is lat and b["has_lateral_host"].device.type == "cpu"
    assert torch.equal(b["has_lateral"], lat) and b["n_full_series"] == 0
    assert "has_lateral_host" not in batch_to({"frontal": torch.zeros(1)}, torch.device("cpu"))
