"""Fused local-alignment loss (kernels/local_align.py) against its PyTorch reference.

The Triton kernels run on CPU tensors through Triton's interpreter, which only works when TRITON_INTERPRET=1
was set before Triton was first imported in the process. Setting it here would switch the whole test
session (every other test, and any CUDA kernel) to the interpreter, so the ``test_interp_*`` tests run in a
child pytest started with the variable set (``test_kernels_under_interpreter``); they also run directly
under ``TRITON_INTERPRET=1 pytest tests/test_kernels_local_align.py``.
"""
import os
import subprocess
import sys


import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from medst_fast.kernels import _utils

from _interp import HAS_TRITON, IN_INTERPRETER, run_interp_tests_in_child, triton_backend_counting
from medst_fast.kernels import local_align as la


needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton does not import here")




@pytest.mark.skipif(not HAS_TRITON, reason="Triton does not import here")
def test_kernels_under_interpreter():
    if IN_INTERPRETER:
        pytest.skip("already in the interpreter process: the test_interp_* tests run directly")
    run_interp_tests_in_child(__file__)


@pytest.fixture
def interpret(monkeypatch):
    """Run the Triton kernels on CPU tensors and count that they really ran."""
    yield from triton_backend_counting(monkeypatch, la, "_loss_fwd_triton", "_loss_bwd_triton")


def make_inputs(B, Tq, Tc, d, q_mask_kind, c_mask_kind, dtype=torch.float32):
    # Unit-norm rows as in Med-ST (embeddings are L2-normalised before the loss), tau=0.1 logits in [-10, 10].
    q = F.normalize(torch.randn(B, Tq, d), dim=-1).to(dtype).requires_grad_()
    c = F.normalize(torch.randn(B, Tc, d), dim=-1).to(dtype).requires_grad_()
    w = (torch.randn(3 * d, d) / d ** 0.5).requires_grad_()
    b = (0.1 * torch.randn(3 * d)).requires_grad_()

    def mask(kind, T):
        if kind is None:
            return None
        m = torch.ones(B, T, dtype=torch.bool)
        if kind == "lateral":  # studies 0, 2, 4, ... have no lateral view: last half of the patches absent
            m[::2, T // 2:] = False
        elif kind == "words":  # reports of different lengths, at least one word each
            for i in range(B):
                m[i, max(1, T - 3 * i - 1):] = False
        return m

    return q, c, mask(q_mask_kind, Tq), mask(c_mask_kind, Tc), w, b


def loss_and_grads(fn, q, c, qm, cm, w, b, renorm, gout, *ct, **kw):
    """[loss, dq, dc, dw, db]. A keyword (weighting=...) goes to fn; with uniform weights the reference's
    in_proj is not in the graph, so its gradients read as zeros (materialize_grads)."""
    loss = fn(q, c, qm, cm, w, b, 0.1, renorm, *ct, **kw)
    grads = torch.autograd.grad(loss, (q, c, w, b), grad_outputs=gout, allow_unused=bool(kw),
                                materialize_grads=bool(kw))
    return [loss.detach().float()] + [g.float() for g in grads]


def assert_close_rel(got, ref, rtol, name):
    scale = ref.abs().max().item()
    err = (got - ref).abs().max().item()
    # An identically-zero reference (one query token: its loss is log 1 - 0) leaves fp32 round-off only.
    tol = rtol * scale if scale > 0 else 1e-6
    assert err <= tol, f"{name}: max err {err:.3e} vs scale {scale:.3e}"


# (B, Tq, Tc, d, q_mask, c_mask, renorm): word side (queries = words, context = patches with/without
# laterals) and patch side (queries = patches, context = words), odd sizes crossing the 64-row tiles.
CASES = [
    (1, 1, 24, 32, None, None, True),
    (3, 97, 50, 32, "words", "lateral", True),
    (3, 97, 50, 32, None, None, True),
    (7, 111, 26, 32, None, "lateral", True),
    (7, 13, 111, 32, "words", None, False),
    (3, 70, 97, 32, "lateral", "words", False),
    (1, 50, 1, 32, None, None, False),
]


@needs_triton
@pytest.mark.parametrize("B,Tq,Tc,d,qm,cm,renorm", CASES)
def test_interp_fused_matches_reference_fp32(interpret, B, Tq, Tc, d, qm, cm, renorm):
    q, c, q_mask, c_mask, w, b = make_inputs(B, Tq, Tc, d, qm, cm)
    gout = torch.tensor(1.7)
    ref = loss_and_grads(la.token_align_loss_ref, q, c, q_mask, c_mask, w, b, renorm, gout)
    got = loss_and_grads(la.token_align_loss, q, c, q_mask, c_mask, w, b, renorm, gout)
    assert interpret == {"fwd": 1, "bwd": 1}, "the fused kernels did not run"
    for name, g, r in zip(["loss", "dq", "dc", "d_in_proj_weight", "d_in_proj_bias"], got, ref):
        assert torch.isfinite(g).all(), name
        assert_close_rel(g, r, 1e-5, name)
    # rows [2d:] of the MHA in_proj (the value projection) do not enter the loss
    d_ = q.shape[-1]
    assert got[3][2 * d_:].abs().max() == 0 and got[4][2 * d_:].abs().max() == 0


@needs_triton
def test_interp_fused_full_size_word_side(interpret):
    """The real word-side shape: 111 words against 392 patches at d=128 (one study, half lateral absent)."""
    q, c, q_mask, c_mask, w, b = make_inputs(2, 111, 392, 128, "words", "lateral")
    gout = torch.tensor(0.9)
    ref = loss_and_grads(la.token_align_loss_ref, q, c, q_mask, c_mask, w, b, True, gout)
    got = loss_and_grads(la.token_align_loss, q, c, q_mask, c_mask, w, b, True, gout)
    for name, g, r in zip(["loss", "dq", "dc", "dw", "db"], got, ref):
        # 392-long fp32 reductions summed in a different (tiled) order than bmm's: both sides carry ~1e-5.
        assert_close_rel(g, r, 3e-5, name)


def _low_precision_rule(fn, B, Tq, Tc, d, qm, cm, renorm, ct, loss_seeds=4, zero=(), **kw):
    """err(fn with compute_dtype ct, fp32 ref) <= 2 * err(the reference with its bmm operands rounded to ct,
    forward and backward, fp32 ref) for the loss and every gradient; fp32 inputs, fp32 results.

    The loss is one number whose rounding error is a single random draw, so its rule takes the largest
    error over a few independent inputs; the gradients (many entries each) use the first inputs.
    ``zero``: outputs that must be exactly 0 on every path (the in_proj gradients of uniform weights)."""
    errs = {name: [0.0, 0.0] for name in ["loss", "dq", "dc", "dw", "db"]}
    for seed in range(loss_seeds):
        torch.manual_seed(seed)
        q, c, q_mask, c_mask, w, b = make_inputs(B, Tq, Tc, d, qm, cm)
        gout = torch.tensor(1.0)
        grads = seed == 0
        runs = []
        for f, extra in ((la.token_align_loss_ref, (None,)), (la.token_align_loss_ref, (ct,)), (fn, (ct,))):
            if grads:
                runs.append(loss_and_grads(f, q, c, q_mask, c_mask, w, b, renorm, gout, *extra, **kw))
            else:
                with torch.no_grad():
                    runs.append([f(q, c, q_mask, c_mask, w, b, 0.1, renorm, *extra, **kw).float()])
        ref, base, got = runs
        if grads:
            assert all(g.dtype == torch.float32 for g in got)
        for name, g, t, r in zip(errs, got, base, ref):
            errs[name][0] = max(errs[name][0], (g - r).abs().max().item())
            errs[name][1] = max(errs[name][1], (t - r).abs().max().item())
        if grads:
            for name in zero:
                i = list(errs).index(name)
                assert all((run[i] == 0).all() for run in runs), f"{name}: must be exactly 0"
    for name in zero:
        errs.pop(name)
    ratios = {}
    for name, (err_k, err_t) in errs.items():
        assert err_t > 0, f"{name}: the rounded reference shows no error; the comparison would be empty"
        assert err_k <= 2 * err_t, f"{name}: fused err {err_k:.3e} vs rounded-reference err {err_t:.3e}"
        ratios[name] = err_k / err_t
    return ratios


LOW_CASES = [(3, 97, 50, 32, "words", "lateral", True, torch.bfloat16),
             (2, 50, 11, 32, None, "words", False, torch.bfloat16),
             (2, 37, 70, 48, "lateral", None, True, torch.float16)]


@needs_triton
@pytest.mark.parametrize("B,Tq,Tc,d,qm,cm,renorm,ct", LOW_CASES)
def test_interp_fused_low_precision_rule(interpret, B, Tq, Tc, d, qm, cm, renorm, ct):
    _low_precision_rule(la.token_align_loss, B, Tq, Tc, d, qm, cm, renorm, ct)
    assert interpret == {"fwd": 4, "bwd": 1}, "the fused kernels did not run (4 inputs for the loss, 1 backward)"


@pytest.mark.parametrize("B,Tq,Tc,d,qm,cm,renorm,ct", LOW_CASES[:2])
def test_torch_twin_low_precision_rule(monkeypatch, B, Tq, Tc, d, qm, cm, renorm, ct):
    """The custom ops' PyTorch twin (CPU without the interpreter) follows the same rounding."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _low_precision_rule(la._token_align_loss_fused, B, Tq, Tc, d, qm, cm, renorm, ct)


# Uniform weighting (LossCfg.local_weighting): odd shapes, masks on and off, both context normalisations.
UNIFORM_CASES = [(3, 97, 50, 32, "words", "lateral", True), (7, 13, 111, 32, None, None, False),
                 (1, 1, 24, 32, None, None, True)]


def _assert_uniform_matches(got, ref, d):
    for name, g, r in zip(["loss", "dq", "dc", "d_in_proj_weight", "d_in_proj_bias"], got, ref):
        assert torch.isfinite(g).all(), name
        assert_close_rel(g, r, 1e-5, name)
    # the weights no longer depend on the in_proj: exactly zero gradients (the reference has none at all)
    assert got[3].abs().max() == 0 and got[4].abs().max() == 0


@needs_triton
@pytest.mark.parametrize("B,Tq,Tc,d,qm,cm,renorm", UNIFORM_CASES)
def test_interp_uniform_weighting_matches_reference_fp32(interpret, B, Tq, Tc, d, qm, cm, renorm):
    q, c, q_mask, c_mask, w, b = make_inputs(B, Tq, Tc, d, qm, cm)
    gout = torch.tensor(1.3)
    ref = loss_and_grads(la.token_align_loss_ref, q, c, q_mask, c_mask, w, b, renorm, gout, weighting="uniform")
    got = loss_and_grads(la.token_align_loss, q, c, q_mask, c_mask, w, b, renorm, gout, weighting="uniform")
    assert interpret == {"fwd": 1, "bwd": 1}, "the fused kernels did not run"
    _assert_uniform_matches(got, ref, d)
    learned = la.token_align_loss_ref(q, c, q_mask, c_mask, w, b, 0.1, renorm)
    if Tq > 1:  # the switch changes the loss (one token: both weightings are 1), by far more than round-off
        assert abs(learned.item() - ref[0].item()) > 1e-5 * abs(learned.item())


@needs_triton
@pytest.mark.parametrize("B,Tq,Tc,d,qm,cm,renorm,ct", [(3, 97, 50, 32, "words", "lateral", True, torch.bfloat16),
                                                       (2, 37, 70, 48, None, "words", False, torch.bfloat16)])
def test_interp_uniform_weighting_low_precision_rule(interpret, B, Tq, Tc, d, qm, cm, renorm, ct):
    _low_precision_rule(la.token_align_loss, B, Tq, Tc, d, qm, cm, renorm, ct, zero=("dw", "db"),
                        weighting="uniform")
    assert interpret["bwd"] == 1 and interpret["fwd"] == 4


@pytest.mark.parametrize("B,Tq,Tc,d,qm,cm,renorm", UNIFORM_CASES)
def test_torch_twin_uniform_weighting_matches_reference(monkeypatch, B, Tq, Tc, d, qm, cm, renorm):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, c, q_mask, c_mask, w, b = make_inputs(B, Tq, Tc, d, qm, cm)
    gout = torch.tensor(1.3)
    ref = loss_and_grads(la.token_align_loss_ref, q, c, q_mask, c_mask, w, b, renorm, gout, weighting="uniform")
    got = loss_and_grads(la._token_align_loss_fused, q, c, q_mask, c_mask, w, b, renorm, gout, weighting="uniform")
    _assert_uniform_matches(got, ref, d)


def test_unknown_weighting_or_scope_is_an_error_naming_the_file():
    q, c, _, _, w, b = make_inputs(1, 3, 4, 16, None, None)
    for fn in (la.token_align_loss, la.token_align_loss_ref):
        with pytest.raises(ValueError, match="local_align.py: weighting"):
            fn(q, c, None, None, w, b, 0.1, True, None, "mean")
        with pytest.raises(ValueError, match="local_align.py: scope"):
            fn(q, c, None, None, w, b, 0.1, True, None, "learned", "global")


# Batch scope (LossCfg.local_scope): every query attends over the context tokens of every sample. Odd shapes
# whose flattened B Tq / B Tc cross the tiles; masks on and off; both weightings; both normalisations.
BATCH_CASES = [(3, 37, 50, 32, "words", "lateral", True, "learned"),
               (5, 13, 29, 32, None, None, False, "learned"),
               (2, 50, 11, 32, "lateral", "words", True, "uniform"),
               (1, 20, 33, 32, None, "lateral", True, "learned")]


def _assert_all_close(got, ref, rtol=1e-5):
    for name, g, r in zip(["loss", "dq", "dc", "d_in_proj_weight", "d_in_proj_bias"], got, ref):
        assert torch.isfinite(g).all(), name
        assert_close_rel(g, r, rtol, name)


@needs_triton
@pytest.mark.parametrize("B,Tq,Tc,d,qm,cm,renorm,weighting", BATCH_CASES)
def test_interp_batch_scope_matches_reference_fp32(interpret, B, Tq, Tc, d, qm, cm, renorm, weighting):
    q, c, q_mask, c_mask, w, b = make_inputs(B, Tq, Tc, d, qm, cm)
    gout = torch.tensor(0.8)
    kw = dict(weighting=weighting, scope="batch")
    ref = loss_and_grads(la.token_align_loss_ref, q, c, q_mask, c_mask, w, b, renorm, gout, **kw)
    got = loss_and_grads(la.token_align_loss, q, c, q_mask, c_mask, w, b, renorm, gout, **kw)
    assert interpret == {"fwd": 1, "bwd": 1}, "the fused kernels did not run"
    # 2e-5: the in_proj bias gradient sums B Tq rows with cancellation; on torch 2.4's CPU reference (numpy
    # 1.26 under Triton 3.0) its fp32 round-off reached 1.06e-5 of the largest entry
    _assert_all_close(got, ref, rtol=2e-5)
    per_sample = la.token_align_loss_ref(q, c, q_mask, c_mask, w, b, 0.1, renorm, None, weighting)
    if B == 1:  # one sample: the scopes coincide
        assert_close_rel(got[0], per_sample.detach(), 1e-5, "B=1 loss")
    else:
        assert abs(got[0].item() - per_sample.item()) > 1e-3 * abs(per_sample.item())


@needs_triton
@pytest.mark.parametrize("B,Tq,Tc,d,qm,cm,renorm,ct", [(3, 37, 50, 32, "words", "lateral", True, torch.bfloat16),
                                                       (4, 29, 13, 48, "lateral", None, False, torch.bfloat16)])
def test_interp_batch_scope_low_precision_rule(interpret, B, Tq, Tc, d, qm, cm, renorm, ct):
    _low_precision_rule(la.token_align_loss, B, Tq, Tc, d, qm, cm, renorm, ct, scope="batch")
    assert interpret == {"fwd": 4, "bwd": 1}


class _Allocations(TorchDispatchMode):
    """The largest tensor any aten op outside a Triton launch returns (the interpreter's own copies of a
    launch's arguments excluded): every buffer the fused path allocates."""

    def __init__(self):
        super().__init__()
        self.largest, self.paused = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
        return out


@needs_triton
def test_interp_batch_scope_memory_is_linear_in_the_batch(interpret, monkeypatch):
    """No tensor of the batch scope's fused fwd + bwd, saved or temporary, comes near the (B Tq, B Tc)
    cross-sample score tensor: saved or temporary, each is at most B max(Tq, Tc) d (the inputs' size).
    The key-split partials are n_split B Tq d with n_split n_m <= _FILL_PROGRAMS, a fixed fill target that
    does not grow with B; at these tiny shapes it would make them the largest buffer, so the test asks for
    one split. The reference does build the score tensor."""
    monkeypatch.setattr(la, "_FILL_PROGRAMS", 1)
    B, Tq, Tc, d = 5, 37, 41, 16
    q, c, q_mask, c_mask, w, b = make_inputs(B, Tq, Tc, d, "words", "lateral")
    scores = B * Tq * B * Tc
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    alloc = _Allocations()

    def paused_launch(*a, _orig=la.launch, **k):
        alloc.paused = True
        try:
            return _orig(*a, **k)
        finally:
            alloc.paused = False

    monkeypatch.setattr(la, "launch", paused_launch)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with alloc:
            loss = la.token_align_loss(q, c, q_mask, c_mask, w, b, 0.1, True, scope="batch")
            loss.backward()
    assert interpret == {"fwd": 1, "bwd": 1}
    assert saved and max(saved) <= B * max(Tq, Tc) * d, saved
    assert 0 < alloc.largest <= B * max(Tq, Tc) * d < scores // B, (alloc.largest, scores)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        la.token_align_loss_ref(q, c, q_mask, c_mask, w, b, 0.1, True, scope="batch")
    assert max(saved) >= scores  # the check would catch the materialised scores


@pytest.mark.parametrize("B,Tq,Tc,d,qm,cm,renorm,weighting", BATCH_CASES)
def test_torch_twin_batch_scope_matches_reference(monkeypatch, B, Tq, Tc, d, qm, cm, renorm, weighting):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, c, q_mask, c_mask, w, b = make_inputs(B, Tq, Tc, d, qm, cm)
    gout = torch.tensor(0.8)
    kw = dict(weighting=weighting, scope="batch")
    ref = loss_and_grads(la.token_align_loss_ref, q, c, q_mask, c_mask, w, b, renorm, gout, **kw)
    got = loss_and_grads(la._token_align_loss_fused, q, c, q_mask, c_mask, w, b, renorm, gout, **kw)
    _assert_all_close(got, ref)


@pytest.mark.parametrize("B,Tq,Tc,d,qm,cm,renorm", CASES)
def test_torch_twin_matches_reference_fp32(monkeypatch, B, Tq, Tc, d, qm, cm, renorm):
    """The hand-written backward (the twin states what the kernels compute) against autograd of the reference."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, c, q_mask, c_mask, w, b = make_inputs(B, Tq, Tc, d, qm, cm)
    gout = torch.tensor(1.7)
    ref = loss_and_grads(la.token_align_loss_ref, q, c, q_mask, c_mask, w, b, renorm, gout)
    got = loss_and_grads(la._token_align_loss_fused, q, c, q_mask, c_mask, w, b, renorm, gout)
    for name, g, r in zip(["loss", "dq", "dc", "d_in_proj_weight", "d_in_proj_bias"], got, ref):
        assert_close_rel(g, r, 1e-5, name)


@needs_triton
def test_interp_no_quadratic_tensor_saved_for_backward(interpret):
    B, Tq, Tc, d = 2, 60, 70, 32  # Tq, Tc > 2d so a (B, Tq, Tc) or (B, Tq, Tq) tensor is the largest possible
    q, c, q_mask, c_mask, w, b = make_inputs(B, Tq, Tc, d, "words", "lateral")
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = la.token_align_loss(q, c, q_mask, c_mask, w, b, 0.1, True)
    assert saved, "nothing was saved: the hook did not see the graph"
    limit = B * Tq * min(Tq, Tc)
    big = [s for s in saved if torch.Size(s).numel() >= limit]
    assert not big, f"quadratic tensors saved for backward: {big}"
    loss.backward()
    # the reference does keep them, which is what the check must catch
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        la.token_align_loss_ref(q, c, q_mask, c_mask, w, b, 0.1, True)
    assert any(torch.Size(s).numel() >= limit for s in saved)


def _count_ops(fn, monkeypatch):
    """(aten ops, Triton launches) of fn(): aten ops include those inside the medst_fast custom ops, and
    exclude the interpreter's own tensor copies while a kernel runs."""
    from test_kernels_move_ffn import OpLog

    log, launches = OpLog(), []

    def counted_launch(*a, _orig=la.launch, **k):
        launches.append(a[0].__name__)
        log.paused = True
        try:
            return _orig(*a, **k)
        finally:
            log.paused = False

    monkeypatch.setattr(la, "launch", counted_launch)
    with log:
        fn()
    return len(log.ops), launches


SIDES = {"word": (111, 392, "words", "lateral", True), "patch": (392, 111, "lateral", "words", False)}


@needs_triton
@pytest.mark.parametrize("side", list(SIDES))
def test_interp_fused_launches_fewer_than_reference_ops(interpret, monkeypatch, side):
    """Triton launches + aten ops of the fused loss fwd+bwd < aten ops of the reference fwd+bwd."""
    Tq, Tc, qm, cm, renorm = SIDES[side]
    q, c, q_mask, c_mask, w, b = make_inputs(2, Tq // 4, Tc // 4, 32, qm, cm)

    def fwd_bwd(fn):
        return lambda: fn(q, c, q_mask, c_mask, w, b, 0.1, renorm).backward()

    ops, launches = _count_ops(fwd_bwd(la.token_align_loss), monkeypatch)
    ref_ops, ref_launches = _count_ops(fwd_bwd(la.token_align_loss_ref), monkeypatch)
    assert interpret == {"fwd": 1, "bwd": 1} and ref_launches == []
    assert len(launches) == 7, launches  # 4 forward, 3 backward
    print(f"{side} side: fused {len(launches)} Triton launches + {ops} aten ops; reference {ref_ops} aten ops")
    assert len(launches) + ops < ref_ops


def fused_matmul_flops(B, Tq, Tc, d):
    """The fused loss's matmul FLOPs (fwd + bwd), unpadded, counted from the kernels' products: attention
    forward 2 products (q c^T, P c), S forward 1, S backward 4 (each role recomputes its S tile and
    multiplies by G), attention backward 7 (dq programs: s, dP, dS c; dc programs: s, dP, P^T dctx, dS^T q),
    and the per-sample d x d products."""
    return B * (2 * d * (9 * Tq * Tc + 5 * Tq * Tq) + 2 * (4 * d * d + 2 * Tq * d)) + 2 * 2 * B * d * d


@needs_triton
def test_interp_fused_matmul_flops_vs_reference(interpret, monkeypatch):
    """Both directions at the real shapes: the fused loss's matmul FLOPs (the interpreter's tl.dot calls
    counted, padded tiles included; and the unpadded count from the kernels' structure) against the
    reference's (FlopCounterMode); the reference keeps the (B, T, T) scores, the fused loss recomputes tiles."""
    from triton.runtime.interpreter import InterpreterBuilder

    dots = []
    orig = InterpreterBuilder.create_dot

    def counting_dot(self, a, b, *rest):
        dots.append(2 * a.data.shape[0] * a.data.shape[1] * b.data.shape[1])
        return orig(self, a, b, *rest)

    monkeypatch.setattr(InterpreterBuilder, "create_dot", counting_dot)
    B, d = 2, 128
    fused = ref = useful = 0
    for Tq, Tc, qm, cm, renorm in SIDES.values():
        q, c, q_mask, c_mask, w, b = make_inputs(B, Tq, Tc, d, qm, cm)
        la.token_align_loss(q, c, q_mask, c_mask, w, b, 0.1, renorm).backward()
        counter = FlopCounterMode(display=False)
        with counter:
            la.token_align_loss_ref(q, c, q_mask, c_mask, w, b, 0.1, renorm).backward()
        ref += counter.get_total_flops()
        useful += fused_matmul_flops(B, Tq, Tc, d)
    fused = sum(dots)
    assert interpret == {"fwd": 2, "bwd": 2}
    assert useful <= fused <= 1.25 * useful, "the kernels' products are not the ones counted"
    scale = 64 / B
    print(f"matmul GFLOP at B=64, both directions: fused {useful * scale / 1e9:.1f} (interpreter tiles, padded: "
          f"{fused * scale / 1e9:.1f}), reference {ref * scale / 1e9:.1f}")
    assert useful < 1.5 * ref


def test_backend_switch_routes_to_reference(monkeypatch):
    # pretend CPU tensors may take the kernels, so that only the backend switch decides the route
    monkeypatch.setattr(_utils, "_interpret_enabled", lambda: True)
    called = []
    monkeypatch.setattr(la, "_triton_impl", lambda *a: called.append(1) or la.token_align_loss_ref(*a))
    q, c, q_mask, c_mask, w, b = make_inputs(2, 5, 7, 32, None, None)
    old = _utils.get_backend()
    try:
        _utils.set_backend("torch")
        la.token_align_loss(q, c, q_mask, c_mask, w, b)
        assert called == []
        if HAS_TRITON:
            _utils.set_backend("triton")
            la.token_align_loss(q, c, q_mask, c_mask, w, b)
            assert called == [1]
    finally:
        _utils.set_backend(old)
    with pytest.raises(ValueError, match="backend"):
        _utils.set_backend("cuda")


def test_env_var_selects_reference():
    code = (
        "import medst_fast\n"
        "from medst_fast.kernels import local_align as la\n"
        "assert medst_fast.get_backend() == 'torch', medst_fast.get_backend()\n"
        "la._triton_impl = None\n"  # would crash if the dispatch still tried the fused path
        "import torch\n"
        "q = torch.randn(1, 3, 16); c = torch.randn(1, 4, 16)\n"
        "print(float(la.token_align_loss(q, c, None, None, torch.randn(48, 16), torch.zeros(48))))\n"
    )
    env = dict(os.environ, MEDST_FAST_KERNELS="0", TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    float(r.stdout.strip().splitlines()[-1])


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(la, "_triton_impl", None)  # must not be reached on CPU tensors
    q, c, _, _, w, b = make_inputs(2, 5, 7, 32, None, None)
    la.token_align_loss(q, c, None, None, w, b).backward()
    assert q.grad is not None


@pytest.mark.parametrize("entry", ["dispatch", "fused_ops"])
def test_torch_compile_fullgraph(monkeypatch, entry):
    """Dynamo traces the dispatch and the custom ops (fake + autograd registrations) without graph breaks."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch._dynamo.reset()
    fn = la.token_align_loss if entry == "dispatch" else la._token_align_loss_fused
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    q, c, q_mask, c_mask, w, b = make_inputs(3, 9, 12, 32, "words", "lateral")
    gout = torch.tensor(1.0)
    ref = loss_and_grads(la.token_align_loss_ref, q, c, q_mask, c_mask, w, b, True, gout)
    got = loss_and_grads(compiled, q, c, q_mask, c_mask, w, b, True, gout)
    for name, g, r in zip(["loss", "dq", "dc", "dw", "db"], got, ref):
        assert_close_rel(g, r, 1e-5, name)


@pytest.mark.cuda
@pytest.mark.parametrize("B,Tq,Tc,d,qm,cm,renorm", CASES + [(64, 111, 392, 128, "words", "lateral", True),
                                                          (64, 392, 111, 128, "lateral", "words", False)])
def test_cuda_fused_matches_reference(B, Tq, Tc, d, qm, cm, renorm):
    old = _utils.get_backend()
    _utils.set_backend("triton")
    try:
        q, c, q_mask, c_mask, w, b = make_inputs(B, Tq, Tc, d, qm, cm)
        q, c, w, b = (t.detach().cuda().requires_grad_() for t in (q, c, w, b))
        q_mask = q_mask.cuda() if q_mask is not None else None
        c_mask = c_mask.cuda() if c_mask is not None else None
        gout = torch.tensor(1.3, device="cuda")
        ref = loss_and_grads(la.token_align_loss_ref, q, c, q_mask, c_mask, w, b, renorm, gout)
        got = loss_and_grads(la.token_align_loss, q, c, q_mask, c_mask, w, b, renorm, gout)
        for name, g, r in zip(["loss", "dq", "dc", "d_in_proj_weight", "d_in_proj_bias"], got, ref):
            assert_close_rel(g, r, 1e-4, name)
    finally:
        _utils.set_backend(old)


@pytest.mark.cuda
@pytest.mark.parametrize("B,Tq,Tc,qm,cm,renorm", [(40, 111, 392, "words", "lateral", True),
                                                  (40, 392, 111, "lateral", "words", False)])
def test_cuda_fused_bf16_rule(B, Tq, Tc, qm, cm, renorm):
    """The wgmma path at the real shapes: within 2x the error of the bf16-rounded reference, every output."""
    old = _utils.get_backend()
    _utils.set_backend("triton")
    try:
        q, c, q_mask, c_mask, w, b = make_inputs(B, Tq, Tc, 128, qm, cm)
        q, c, w, b = (t.detach().cuda().requires_grad_() for t in (q, c, w, b))
        q_mask, c_mask = q_mask.cuda(), c_mask.cuda()
        gout = torch.tensor(1.0, device="cuda")
        ref = loss_and_grads(la.token_align_loss_ref, q, c, q_mask, c_mask, w, b, renorm, gout)
        base = loss_and_grads(la.token_align_loss_ref, q, c, q_mask, c_mask, w, b, renorm, gout, torch.bfloat16)
        got = loss_and_grads(la.token_align_loss, q, c, q_mask, c_mask, w, b, renorm, gout, torch.bfloat16)
        for name, g, t, r in zip(["loss", "dq", "dc", "dw", "db"], got, base, ref):
            ek, et = (g - r).abs().max().item(), (t - r).abs().max().item()
            assert ek <= 2 * et + 1e-6, f"{name}: fused err {ek:.3e} vs rounded reference err {et:.3e}"
    finally:
        _utils.set_backend(old)


@pytest.mark.cuda
@pytest.mark.parametrize("weighting,scope", [("uniform", "sample"), ("learned", "batch"), ("uniform", "batch")])
@pytest.mark.parametrize("B,Tq,Tc,qm,cm,renorm", [(40, 111, 392, "words", "lateral", True),
                                                  (40, 392, 111, "lateral", "words", False)])
def test_cuda_research_switches(B, Tq, Tc, qm, cm, renorm, weighting, scope):
    """The switches on the compiled kernels at the real shapes: fp32 against the reference, bf16 by the 2x
    rule (the in_proj gradients of uniform weights exactly 0 on both)."""
    old = _utils.get_backend()
    _utils.set_backend("triton")
    kw = dict(weighting=weighting, scope=scope)
    try:
        q, c, q_mask, c_mask, w, b = make_inputs(B, Tq, Tc, 128, qm, cm)
        q, c, w, b = (t.detach().cuda().requires_grad_() for t in (q, c, w, b))
        q_mask, c_mask = q_mask.cuda(), c_mask.cuda()
        gout = torch.tensor(1.0, device="cuda")
        ref = loss_and_grads(la.token_align_loss_ref, q, c, q_mask, c_mask, w, b, renorm, gout, None, **kw)
        got = loss_and_grads(la.token_align_loss, q, c, q_mask, c_mask, w, b, renorm, gout, None, **kw)
        for name, g, r in zip(["loss", "dq", "dc", "dw", "db"], got, ref):
            assert_close_rel(g, r, 1e-4, name)
        base = loss_and_grads(la.token_align_loss_ref, q, c, q_mask, c_mask, w, b, renorm, gout, torch.bfloat16, **kw)
        low = loss_and_grads(la.token_align_loss, q, c, q_mask, c_mask, w, b, renorm, gout, torch.bfloat16, **kw)
        for name, g, t, r in zip(["loss", "dq", "dc", "dw", "db"], low, base, ref):
            ek, et = (g - r).abs().max().item(), (t - r).abs().max().item()
            assert ek <= 2 * et + 1e-6, f"{name}: fused err {ek:.3e} vs rounded reference err {et:.3e}"
        if weighting == "uniform":
            assert all((g == 0).all() for g in got[3:] + low[3:])
    finally:
        _utils.set_backend(old)


@pytest.mark.cuda
def test_cuda_batch_scope_peak_memory():
    """The batch scope's fused fwd + bwd at B = 40 (word side) peaks far below the (B Tq, B Tc) fp32 scores."""
    old = _utils.get_backend()
    _utils.set_backend("triton")
    try:
        B, Tq, Tc, d = 40, 111, 392, 128
        q, c, q_mask, c_mask, w, b = make_inputs(B, Tq, Tc, d, "words", "lateral")
        q, c, w, b = (t.detach().cuda().requires_grad_() for t in (q, c, w, b))
        q_mask, c_mask = q_mask.cuda(), c_mask.cuda()
        for _ in range(2):  # the second pass measures: kernels compiled, allocator warm
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            la.token_align_loss(q, c, q_mask, c_mask, w, b, 0.1, True, torch.bfloat16, scope="batch").backward()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        scores = B * Tq * B * Tc * 4
        print(f"batch scope fwd+bwd peak {peak / 2**20:.1f} MiB; the score tensor alone {scores / 2**20:.1f} MiB")
        assert peak < scores / 4  # inputs, grads and the O(B T d) buffers: tens of MiB
    finally:
        _utils.set_backend(old)
