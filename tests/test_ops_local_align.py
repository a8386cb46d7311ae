"""Fused local-alignment loss (kernels/local_align.py) against its PyTorch reference.

The Triton kernels run on CPU tensors through Triton's interpreter, which only works when TRITON_INTERPRET=1
was set before Triton was first imported in the process. Setting it here would switch the whole test
session (every other test, and any CUDA kernel) to the interpreter, so the ``test_interp_*`` tests run in a
child pytest started with the variable set (``test_kernels_under_interpreter``); they also run directly
under ``TRITON_INTERPRET=1 pytest tests/test_ops_local_align.py``.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

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
    yield from triton_backend_counting(monkeypatch, la, "_softmax_rows_triton", "_softmax_rows_bwd_triton")


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


def loss_and_grads(fn, q, c, qm, cm, w, b, renorm, gout):
    loss = fn(q, c, qm, cm, w, b, 0.1, renorm)
    grads = torch.autograd.grad(loss, (q, c, w, b), grad_outputs=gout)
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
    assert interpret["fwd"] == 3 and interpret["bwd"] == 3, "the fused kernels did not run"
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


@needs_triton
@pytest.mark.parametrize("B,Tq,Tc,qm,cm,renorm", [(3, 97, 50, "words", "lateral", True), (2, 50, 11, None, "words", False)])
def test_interp_fused_bf16_error_rule(interpret, B, Tq, Tc, qm, cm, renorm):
    """err(kernel on bf16 inputs, fp32 ref) <= 2 * err(torch on the same bf16 inputs, fp32 ref) + 1e-6."""
    q32, c32, q_mask, c_mask, w, b = make_inputs(B, Tq, Tc, 32, qm, cm)
    q16 = q32.detach().bfloat16().requires_grad_()
    c16 = c32.detach().bfloat16().requires_grad_()
    gout = torch.tensor(1.0)
    ref = loss_and_grads(la.token_align_loss_ref, q32, c32, q_mask, c_mask, w, b, renorm, gout)
    torch_bf16 = loss_and_grads(la.token_align_loss_ref, q16, c16, q_mask, c_mask, w, b, renorm, gout)
    got = loss_and_grads(la.token_align_loss, q16, c16, q_mask, c_mask, w, b, renorm, gout)
    assert interpret["fwd"] == 3
    for name, g, t, r in zip(["loss", "dq", "dc", "dw", "db"], got, torch_bf16, ref):
        err_k = (g - r).abs().max().item()
        err_t = (t - r).abs().max().item()
        assert err_k <= 2 * err_t + 1e-6, f"{name}: kernel err {err_k:.3e} vs torch bf16 err {err_t:.3e}"


@needs_triton
def test_interp_softmax_rows_op_matches_reference(interpret):
    """The building block alone, both outputs and both gradients, with a key mask."""
    x = torch.randn(3, 70, 32, requires_grad=True)
    y = torch.randn(3, 45, 32, requires_grad=True)
    m = torch.rand(3, 45) > 0.4
    m[:, 0] = True
    do, dl = torch.randn(3, 70, 32), torch.randn(3, 70)
    o, lse = la.softmax_rows(x, y, m, 0.7, True)
    gx, gy = torch.autograd.grad((o * do).sum() + (lse * dl).sum(), (x, y))
    o_r, lse_r = la.softmax_rows_ref(x, y, m, 0.7, True)
    gx_r, gy_r = torch.autograd.grad((o_r * do).sum() + (lse_r * dl).sum(), (x, y))
    for name, g, r in [("out", o, o_r), ("lse", lse, lse_r), ("dx", gx, gx_r), ("dy", gy, gy_r)]:
        assert_close_rel(g.detach(), r.detach(), 1e-5, name)


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
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
