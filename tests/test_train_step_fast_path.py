"""The fast path is the path the CLI takes: the trainer's own step under ``--amp bf16`` runs the fused MoVE FFN
and the fused local alignment, forward and backward, with no host-syncing op, within the bf16 accuracy rule.

The step is built exactly as ``python -m medst_fast.pretrain`` builds it (build_run from parsed CLI
arguments); ops are counted with a TorchDispatchMode. The Triton cases run in a child process under
TRITON_INTERPRET=1 (Triton reads the variable only at its first import).
"""
import copy
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from _interp import interp_env

HERE = os.path.dirname(os.path.abspath(__file__))
# ops that make the host wait for the device (or whose output size depends on device values)
SYNC_OPS = ("aten::nonzero", "aten::_local_scalar_dense", "aten::bincount", "aten::unique", "aten::_unique",
            "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive", "aten::masked_select",
            "aten::repeat_interleave")
FUSED_OPS = ("medst_fast::move_ffn_fwd", "medst_fast::move_ffn_bwd", "medst_fast::token_align_fwd",
             "medst_fast::token_align_bwd")


class OpCounter(TorchDispatchMode):
    """Counts every dispatched op by name; boolean-mask indexing is counted as ``bool_index``."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        overload = func._overloadpacket.__name__
        self.counts[name] += 1
        if name == "aten::repeat_interleave" and func._overloadname == "self_int":
            self.counts[name] -= 1  # a constant repeat count needs no device value
        if overload in ("index", "index_put", "index_put_", "_index_put_impl_"):
            idx = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(t is not None and t.dtype == torch.bool for t in idx):
                self.counts["bool_index"] += 1
        return func(*args, **(kwargs or {}))

    def syncs(self):
        return {k: v for k, v in self.counts.items() if (k in SYNC_OPS or k == "bool_index") and v}


def build_trainer(out, vocab, *extra):
    """The trainer the CLI builds (parse_args -> build_run), tiny shapes, one batch ready."""
    from medst_fast.train.args import parse_args
    from medst_fast.train.build import build_run
    from medst_fast.train.step import batch_to

    argv = ["--dataset-type", "random", "--random-series", "8", "--vocab", vocab, "--out", str(out),
            "--workers", "0", "--batch-series", "2", "--model-override", "vision.img_size=32",
            "--model-override", "text.max_length=32", "--device", "cpu", *extra]
    t = build_run(parse_args(argv))
    batch = batch_to(next(iter(t.loader)), t.device)
    return t, batch


def step_grads(trainer, batch, counter=None):
    """One forward + loss + backward of the trainer's StepRunner; returns (loss, {param: grad})."""
    runner = trainer.runner
    runner.opt.zero_grad(set_to_none=True)
    state = copy.deepcopy(trainer.model.state_dict())  # BatchNorm statistics move in every train forward
    torch.manual_seed(1234)  # the text tower's dropout draws the same masks in every run
    if counter is None:
        stats = runner.forward_backward([batch])
    else:
        with counter:
            stats = runner.forward_backward([batch])
    grads = {n: p.grad.detach().float().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.load_state_dict(state)
    runner.opt.zero_grad(set_to_none=True)
    return float(stats.loss), grads


def test_trainer_step_has_no_sync_ops(tmp_path, vocab_path):
    """Packed encoder + losses + backward, reference ops (no Triton on the CPU): zero sync-forcing ops."""
    t, batch = build_trainer(tmp_path / "run", vocab_path, "--amp", "bf16")
    try:
        assert bool(batch["has_lateral"].any()) and not bool(batch["has_lateral"].all()), "want mixed laterals"
        t.model.packed = True
        batch = t.model.prepare_batch(batch)
        c = OpCounter()
        step_grads(t, batch, c)
        assert c.counts["aten::convolution"] > 0 and c.counts["aten::index_copy"] > 0  # the packed path ran
        assert c.syncs() == {}, c.syncs()
    finally:
        t.close()


CHILD = r"""
import math, sys, torch
sys.path.insert(0, {here!r})
import medst_fast
from test_train_step_fast_path import OpCounter, build_trainer, step_grads, FUSED_OPS
from medst_fast.kernels import _utils
assert _utils.interpreter_ready()
t, batch = build_trainer({out!r}, {vocab!r}, "--amp", "bf16")
assert bool(batch["has_lateral"].any()) and not bool(batch["has_lateral"].all())
# The CLI's own choices: packing follows the fused kernels (interpreter here, CUDA on a GPU).
assert t.model._packs(batch), "packing is not on where the fused kernels run"
fused_batch = t.model.prepare_batch(batch)
assert fused_batch["packing"].routing is not None
c = OpCounter()
loss_f, g_f = step_grads(t, fused_batch, c)
print("COUNTS", {{k: c.counts[k] for k in FUSED_OPS}})
for k in FUSED_OPS:
    assert c.counts[k] > 0, (k, dict(c.counts))
assert c.syncs() == {{}}, c.syncs()
# accuracy: fp32 reference (no autocast, reference ops) vs plain PyTorch under the same bf16 autocast
medst_fast.set_backend("torch")
t.model.packed = False
loss_p, g_p = step_grads(t, batch)
t.runner.dtype = None
loss_r, g_r = step_grads(t, batch)
e_f, e_p = abs(loss_f - loss_r), abs(loss_p - loss_r)
print("LOSS", loss_r, loss_f, loss_p)
assert e_f <= 2 * e_p + 1e-6 * abs(loss_r), (e_f, e_p)
assert set(g_f) == set(g_r) == set(g_p)
num_f = den_p = 0.0
worst = 0.0
for n in g_r:
    r = g_r[n]
    ef, ep = (g_f[n] - r).norm().item(), (g_p[n] - r).norm().item()
    num_f += ef ** 2
    den_p += ep ** 2
    worst = max(worst, ef / (ep + 1e-6 * r.norm().item() + 1e-12))
tot = math.sqrt(num_f) / math.sqrt(den_p)
print("GRAD_RATIO", tot, worst)
assert tot <= 2.0, tot
print("OK")
"""


def test_trainer_step_runs_fused_ops_under_interpreter(tmp_path, vocab_path):
    pytest.importorskip("triton")
    env = interp_env()  # TRITON_INTERPRET=1 + the Triton 3.6 / numpy >= 2.4 start-up fix
    code = CHILD.format(here=HERE, out=str(tmp_path / "run"), vocab=vocab_path)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env, cwd=HERE)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "OK" in r.stdout, r.stdout[-3000:]
