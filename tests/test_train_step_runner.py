"""A non-finite gradient is a skipped step, never an update, decided at the step's one host sync.

The gradient norm that clipping needs is computed on the device before the step's stats all-reduce and rides
in it; the optimizer then clips with that device value. These tests drive the trainer's own step
(Training._use_batches, as the loop calls it) on the tiny model.
"""
import copy
import logging
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_train_step_fast_path import OpCounter, build_trainer  # noqa: E402


def _training(run):
    """The loop's per-process context, as train() makes it before the first step."""
    from medst_fast.train.loop import Training
    from medst_fast.train.state import TrainState

    return Training(run, TrainState())


def _batches(t, n):
    it = iter(t.loader)
    return [next(it) for _ in range(n)]


def _state(t):
    return (copy.deepcopy(t.model.state_dict()), copy.deepcopy(t.optimizer.state_dict()))


def _assert_same(a, b):
    (ma, oa), (mb, ob) = a, b
    assert ma.keys() == mb.keys()
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
    assert oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        for k, v in oa["state"][i].items():
            assert torch.equal(v, ob["state"][i][k]), (i, k)


@pytest.mark.parametrize("clip", [None, "1.0"])
def test_nonfinite_gradient_skips_the_step(tmp_path, vocab_path, caplog, clip):
    """A finite loss with one NaN gradient (a hook): weights, BatchNorm statistics and AdamW state stay
    bitwise what they were; the step is counted and logged; the next step updates again."""
    extra = ("--clip-grad", clip) if clip else ()
    t, _ = build_trainer(tmp_path / "run", vocab_path, *extra)
    tr = _training(t)
    try:
        b1, b2, b3 = _batches(t, 3)
        s = tr._use_batches([b1], 1e-3)  # a good step first: AdamW has state to keep
        assert s.nonfinite == 0 and tr.account.bad_total == 0
        before = _state(t)
        p = next(p for p in t.model.parameters() if p.requires_grad)
        h = p.register_hook(lambda g: torch.full_like(g, float("nan")))
        try:
            with caplog.at_level(logging.WARNING, logger="medst_fast"):
                s = tr._use_batches([b2], 1e-3)
        finally:
            h.remove()
        assert s.nonfinite == 0 and s.loss == s.loss, "the loss itself was finite"
        _assert_same(_state(t), before)
        assert all(q.grad is None for q in t.model.parameters())
        assert tr.account.bad_total == 1 and tr.account.bad_run == 1
        assert any("non-finite gradient" in r.getMessage() and "update skipped" in r.getMessage()
                   for r in caplog.records), [r.getMessage() for r in caplog.records]
        tr._use_batches([b3], 1e-3)
        assert tr.account.bad_run == 0
        after = t.model.state_dict()
        assert any(not torch.equal(after[k], before[0][k]) for k in after)  # updated again
    finally:
        tr.close()
        t.close()


def test_clipping_matches_clip_grad_norm(tmp_path, vocab_path):
    """grad_norm + optimizer_step's clip give the gradients torch.nn.utils.clip_grad_norm_ gives."""
    t, batch = build_trainer(tmp_path / "run", vocab_path, "--clip-grad", "0.01")
    try:
        r = t.runner
        b = t.model.prepare_batch(batch)
        r.forward_backward([b])
        norm = r.grad_norm()
        grads = [p.grad.clone() for p in r.params if p.grad is not None]
        ps = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for q, g in zip(ps, grads):
            q.grad = g.clone()
        total = torch.nn.utils.clip_grad_norm_(ps, 0.01)
        assert float(norm) == pytest.approx(float(total), rel=1e-6) and float(norm) > 0.01  # it does clip
        # optimizer_step scales the gradients in place before AdamW reads them: capture them there
        seen = {}
        orig = r.opt.step

        def spy(*a, **k):
            seen["g"] = [p.grad.clone() for p in r.params if p.grad is not None]
            return orig(*a, **k)

        r.opt.step = spy
        r.optimizer_step(1e-4)
        for got, q in zip(seen["g"], ps):
            torch.testing.assert_close(got, q.grad, rtol=1e-6, atol=0)
    finally:
        t.close()


def test_gradient_norm_and_clipping_force_no_host_sync(tmp_path, vocab_path):
    """grad_norm and the clip in optimizer_step never make the host wait (the norm is read back only with
    the step's stats). AdamW itself is left out: on the CPU its per-parameter step counter is read on the host."""
    t, batch = build_trainer(tmp_path / "run", vocab_path, "--clip-grad", "1.0")
    try:
        r = t.runner
        r.forward_backward([t.model.prepare_batch(batch)])
        r.opt.step = lambda *a, **k: None
        c = OpCounter()
        with c:
            r.grad_norm()
            r.optimizer_step(1e-3)
        assert c.counts["aten::_foreach_norm"] > 0 and c.counts["aten::_foreach_mul_"] > 0  # it ran
        assert c.syncs() == {}, c.syncs()
    finally:
        t.close()
