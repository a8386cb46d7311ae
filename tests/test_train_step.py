"""train/step.py's StepStats and train/faults.py's StepAccount: the step's numbers and the decision they lead to."""
import logging
import math

import pytest
import torch

from medst_fast.train import faults as F
from medst_fast.train.step import LOSS_TERMS, DeviceStats, StepStats

NAN, INF = float("nan"), float("inf")


def _stats(**kw):
    base = dict(nonfinite=0.0, stop=0.0, loss=6.0, ita=1.0, local=2.0, temporal=3.0, cross_local=0.0, studies=8.0,
                weights_bad=0.0, grad_norm=1.5)
    return StepStats(**dict(base, **kw))


def test_pack_and_unpack_keep_every_field_in_place():
    """The device vector that is all-reduced, read back field by field: each name lands in its own slot."""
    values = {n: float(i + 1) for i, n in enumerate(StepStats.names())}
    vec = StepStats.pack(**{n: torch.tensor([v]) for n, v in values.items()})
    assert vec.dtype == torch.float64 and vec.shape == (len(values),)
    assert StepStats.unpack(vec.tolist()) == StepStats(**values)


def test_device_stats_parts_name_the_loss_terms():
    dev = DeviceStats(torch.zeros(1), torch.tensor([6.0]), torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([8.0]))
    parts = dev.parts()
    assert [float(parts[k]) for k in LOSS_TERMS] == [1.0, 2.0, 3.0, 4.0]
    assert float(parts["loss"]) == 6.0 and float(parts["studies"]) == 8.0


def test_per_rank_means_and_a_skipped_step():
    assert _stats().per_rank(2) == {"loss": 3.0, "ita": 0.5, "local": 1.0, "temporal": 1.5, "cross_local": 0.0}
    s = StepStats.skipped(stop=1.0)
    assert s.stop == 1.0 and s.studies == 0.0 and math.isnan(s.loss) and s.nonfinite == 0.0


def _account(n=3, fp16=False):
    return F.StepAccount(max_bad_steps=n, fp16=fp16, last_ckpt="/r/checkpoints/ckpt-00000002.pt",
                         loader_bad=lambda: {"missing_image": 4, "dropped_study": 0}, index_meta="/d/meta.json")


def test_a_finite_step_updates_and_resets_the_runs_in_a_row():
    acc = _account()
    assert acc.decide(1, _stats(nonfinite=1.0), 1, 1e-3, None) == F.SKIP
    assert acc.decide(2, _stats(), 1, 1e-3, None) == F.UPDATE
    assert (acc.bad_run, acc.skipped_run, acc.updates_run, acc.bad_total) == (0, 0, 1, 1)


@pytest.mark.parametrize("bad", [dict(nonfinite=1.0), dict(grad_norm=NAN), dict(grad_norm=INF)])
def test_a_nonfinite_loss_or_gradient_is_skipped_then_stops_the_run(bad, caplog):
    acc = _account(n=3)
    with caplog.at_level(logging.WARNING, logger="medst_fast"):
        assert acc.decide(1, _stats(**bad), 1, 1e-3, None) == F.SKIP
        assert acc.decide(2, _stats(**bad), 1, 1e-3, None) == F.SKIP
    assert "update skipped (2 in a row, 2 in total)" in caplog.text
    with pytest.raises(F.TrainingDiverged, match=r"NaN/inf in 3 consecutive steps \(up to step 3, limit "
                                                 r"--max-bad-steps 3\).*ckpt-00000002.pt"):
        acc.decide(3, _stats(**bad), 1, 1e-3, None)


def test_fp16_overflow_is_the_scalers_business_not_a_bad_step():
    acc = _account(n=2, fp16=True)
    for step in range(1, 5):
        assert acc.decide(step, _stats(grad_norm=INF), 1, 1e-3, None) == F.SKIP
    assert (acc.scaler_skips, acc.bad_total, acc.skipped_run) == (4, 0, 0)
    assert acc.decide(5, _stats(nonfinite=1.0, grad_norm=INF), 1, 1e-3, None) == F.SKIP  # a NaN loss is not
    assert acc.bad_total == 1
    assert "4 fp16 gradient overflow(s)" in acc.no_update_cause()


def test_weights_made_nonfinite_by_the_last_update_stop_at_once():
    with pytest.raises(F.TrainingDiverged, match=r"the update of step 6 made the weights NaN/inf \(lr 0.01, "
                                                 r"--clip-grad None\)"):
        _account().decide(7, _stats(weights_bad=1.0), 1, 1e-2, None)


def test_unusable_batches_in_a_row_stop_naming_the_cause():
    acc = _account(n=2)
    acc.bad_batch_step(1, 1, "all 2 studies unreadable")
    with pytest.raises(F.NoUpdates, match=r"2 steps in a row made no update \(up to step 2, limit --max-bad-steps 2\)"
                                          r"\. Cause: 2 unusable batch\(es\) in total, last: on another rank; "
                                          r"loader counts: missing_image 4; .*/d/meta.json field 'image_root'"):
        acc.bad_batch_step(2, 1, "on another rank")


def test_oom_message_names_only_the_flags_not_in_use():
    import argparse

    a = argparse.Namespace(batch_series=8, accum_steps=1, amp="bf16", grad_checkpointing=True)
    msg = F.oom_message(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB\nmore"), a, "in step 3", "c.pt")
    assert msg.startswith("out of memory in step 3 (CUDA out of memory. Tried to allocate 2 GiB).")
    assert "--batch-series (now 8" in msg and "--amp" not in msg and "--grad-checkpointing" not in msg
    a.amp, a.grad_checkpointing = "none", False
    msg = F.oom_message(RuntimeError("x"), a, "in step 3", "c.pt")
    assert "--amp bf16 (now none)" in msg and "--grad-checkpointing" in msg
