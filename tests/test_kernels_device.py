"""Where and how the fused kernels launch: on their tensors' CUDA device, and with fp32 operands on the
tensor cores (TF32) exactly when torch.get_float32_matmul_precision() allows it.

The ``test_interp_*`` tests run the TF32 variants (their tiles and launch parameters) under Triton's CPU
interpreter in a child process (tests/_interp.py), where products stay exact; the ``cuda`` tests run them on
a GPU, where they are TF32, against the fp32 reference with a TF32 tolerance.
"""
import contextlib
import logging
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _interp import HAS_TRITON, IN_INTERPRETER, run_interp_tests_in_child, triton_backend_counting  # noqa: E402
from medst_fast.kernels import _utils  # noqa: E402
from medst_fast.kernels import local_align as la  # noqa: E402
from medst_fast.kernels import move_ffn as mf  # noqa: E402

# TF32 keeps 10 of fp32's 23 mantissa bits in each product operand: relative product error up to ~2^-11
# (~5e-4); fp32 accumulation. Relative to each output's largest entry, the reductions here stay within 5e-3.
TF32_RTOL = 5e-3


@pytest.fixture
def precision():
    """Set torch's fp32 matmul precision for one test and restore it (and the once-per-mode log) after."""
    old = torch.get_float32_matmul_precision()
    warned = set(_utils._warned)
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(old)
    _utils._warned.clear()
    _utils._warned.update(warned)


def _rel_err(got, ref):
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


# -- the device guard (item: a model on cuda:1 without torch.cuda.set_device) ----------------------------------
def test_launch_enters_the_guard_of_its_tensors_device(monkeypatch):
    seen = []

    @contextlib.contextmanager
    def spy_guard(device):
        seen.append(("enter", device))
        yield
        seen.append(("exit", device))

    class FakeKernel:
        def __getitem__(self, grid):
            def run(*args, **meta):
                seen.append(("launch", grid, meta))
            return run

    monkeypatch.setattr(_utils, "device_guard", spy_guard)
    monkeypatch.setattr(_utils, "jit_kernel", lambda fn: FakeKernel())
    x = torch.zeros(3, device="meta")
    _utils.launch(lambda: None, (2,), 7, x, torch.zeros(1), BLOCK=16)
    # the first tensor argument's device, entered around the launch (not before, not after)
    assert seen == [("enter", x.device), ("launch", (2,), {"BLOCK": 16}), ("exit", x.device)]
    with pytest.raises(ValueError, match="kernels/_utils.py: a kernel launch without a tensor argument"):
        _utils.launch(lambda: None, (1,), 3, 4)


def test_autotuned_launch_enters_the_guard_too(monkeypatch):
    seen = []

    @contextlib.contextmanager
    def spy_guard(device):
        seen.append(device)
        yield

    class FakeTuner:
        def __getitem__(self, grid):
            return lambda *a, **k: seen.append("launch")

    monkeypatch.setattr(_utils, "device_guard", spy_guard)
    monkeypatch.setattr(_utils, "autotuner", lambda *a, **k: FakeTuner())
    x = torch.zeros(2, device="meta")
    _utils.autotune_launch(lambda: None, lambda m: (1,), (), (), 0, x, 5)
    assert seen == [x.device, "launch"]


def test_device_guard_is_torch_cuda_device_for_cuda_only():
    g = _utils.device_guard(torch.device("cuda", 1))
    assert isinstance(g, torch.cuda.device) and g.idx == 1  # built, not entered: no GPU needed
    assert not isinstance(_utils.device_guard(torch.device("cpu")), torch.cuda.device)


def _local_align_inputs(device, B=3, Tq=37, Tc=50, d=32):
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(B, Tq, d, generator=g), dim=-1).to(device).requires_grad_()
    c = F.normalize(torch.randn(B, Tc, d, generator=g), dim=-1).to(device).requires_grad_()
    w = (torch.randn(3 * d, d, generator=g) / d ** 0.5).to(device).requires_grad_()
    b = (0.1 * torch.randn(3 * d, generator=g)).to(device).requires_grad_()
    cm = torch.ones(B, Tc, dtype=torch.bool)
    cm[::2, Tc // 2:] = False
    qm = torch.ones(B, Tq, dtype=torch.bool)
    qm[1, Tq - 5:] = False
    return q, c, qm.to(device), cm.to(device), w, b


def _loss_grads(fn, q, c, qm, cm, w, b):
    loss = fn(q, c, qm, cm, w, b, 0.1, True)
    return [loss.detach()] + list(torch.autograd.grad(loss, (q, c, w, b)))


@pytest.mark.cuda
def test_fused_ops_on_a_second_gpu_without_set_device():
    """Tensors on cuda:1 while cuda:0 is current: the fused ops give the reference's results there."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA devices, {torch.cuda.device_count()} visible")
    assert torch.cuda.current_device() == 0
    dev = torch.device("cuda", 1)
    q, c, qm, cm, w, b = _local_align_inputs(dev)
    got = _loss_grads(la.token_align_loss, q, c, qm, cm, w, b)
    ref = _loss_grads(la.token_align_loss_ref, q, c, qm, cm, w, b)
    for g, r in zip(got, ref):
        assert g.device == dev and _rel_err(g, r) <= 1e-4
    vid = torch.tensor([0] * 5 + [1] * 4 + [0] * 5, device=dev)
    x = torch.randn(vid.numel(), 32, device=dev)
    params = [p.to(dev) for p in (1 + 0.2 * torch.randn(2, 32), 0.1 * torch.randn(2, 32), torch.randn(2, 64, 32) / 6,
                                  0.1 * torch.randn(2, 64), torch.randn(2, 32, 64) / 8, 0.1 * torch.randn(2, 32))]
    out = mf.move_ffn(x, vid, *params)
    torch.cuda.synchronize(dev)
    assert _rel_err(out, mf.move_ffn_ref(x, vid, *params)) <= 1e-4
    assert torch.cuda.current_device() == 0  # the guard put the current device back


# -- fp32 precision: TF32 tiles when torch allows them ---------------------------------------------------------
@pytest.mark.parametrize("setting,mode", [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")])
def test_precision_setting_picks_the_fp32_variant(precision, setting, mode):
    precision(setting)
    assert _utils.fp32_dot_mode() == mode
    assert _utils.dot_precision(torch.float32) == mode
    kind = "tf32" if mode == "tf32" else "fp32"
    assert _utils.fp32_kind(torch.float32) == kind
    # bf16 / fp16 operands are unaffected
    assert _utils.fp32_kind(torch.bfloat16) == _utils.fp32_kind(torch.float16) == "mma"
    assert mf.gemm_config(torch.float32, 1000, 768, 3072) == mf.GEMM_CONFIGS[kind][0]
    assert mf.wgrad_config(torch.float32, 1000, 768, 3072) == mf.WGRAD_CONFIGS[kind][0]
    if not _utils.interpreting():
        assert la._tiles(torch.float32) is la._TILES[kind]
    assert la._tiles(torch.bfloat16) is la._TILES["interp" if _utils.interpreting() else "mma"]


def test_precision_choice_is_logged_once_per_mode(precision, caplog):
    _utils._warned.difference_update({("fp32", "ieee"), ("fp32", "tf32")})
    with caplog.at_level(logging.INFO, logger="medst_fast"):
        precision("highest")
        for _ in range(3):
            _utils.dot_precision(torch.float32)
        precision("high")
        for _ in range(3):
            _utils.fp32_kind(torch.float32)
    lines = [r.getMessage() for r in caplog.records if "fp32 fused ops use" in r.getMessage()]
    assert len(lines) == 2, lines
    assert "exact fp32 products" in lines[0] and "TF32 tensor-core products" in lines[1]


def test_tf32_tiles_fit_the_kernels():
    """The TF32 families keep the shapes the kernels need: wgmma rows (multiples of 64), the slot tile."""
    t = la._TILES["tf32"]
    assert t.block_m % 64 == 0 and t.block_n >= 16 and set(t.launch) == set(la._TILES["mma"].launch)
    (g,) = mf.GEMM_CONFIGS["tf32"]
    (w,) = mf.WGRAD_CONFIGS["tf32"]
    assert g.block_k >= 16 and mf.BLOCK_M % w.block_r == 0


@pytest.mark.skipif(not HAS_TRITON, reason="Triton does not import here")
def test_kernels_under_interpreter():
    if IN_INTERPRETER:
        pytest.skip("already in the interpreter process: the test_interp_* tests run directly")
    run_interp_tests_in_child(__file__)


def _spy_launches(monkeypatch, module):
    seen = []
    orig = module.launch

    def spy(fn, grid, *args, **meta):
        seen.append((fn.__name__, meta))
        return orig(fn, grid, *args, **meta)

    monkeypatch.setattr(module, "launch", spy)
    return seen


@pytest.fixture
def interpret_la(monkeypatch):
    yield from triton_backend_counting(monkeypatch, la, "_loss_fwd_triton", "_loss_bwd_triton")


@pytest.fixture
def interpret_mf(monkeypatch):
    yield from triton_backend_counting(monkeypatch, mf, "_fwd_triton", "_bwd_triton")


def test_interp_tf32_local_align_matches_reference(interpret_la, precision, monkeypatch):
    precision("high")
    seen = _spy_launches(monkeypatch, la)
    q, c, qm, cm, w, b = _local_align_inputs("cpu", B=3, Tq=97, Tc=70)
    got = _loss_grads(la.token_align_loss, q, c, qm, cm, w, b)
    precision("highest")
    ref = _loss_grads(la.token_align_loss_ref, q, c, qm, cm, w, b)
    assert interpret_la == {"fwd": 1, "bwd": 1}
    tiled = {name: meta for name, meta in seen if "PREC" in meta}
    assert set(tiled) == {"_attn_fwd_kernel", "_s_fwd_kernel", "_s_bwd_kernel", "_attn_bwd_kernel"}, set(tiled)
    assert all(m["PREC"] == "tf32" for m in tiled.values())
    assert tiled["_attn_fwd_kernel"]["BLOCK_M"] == la._TILES["tf32"].block_m
    for name, g, r in zip(["loss", "dq", "dc", "dw", "db"], got, ref):
        assert torch.isfinite(g).all() and _rel_err(g, r) <= TF32_RTOL, name


def test_interp_tf32_move_ffn_matches_reference(interpret_mf, precision, monkeypatch):
    precision("high")
    seen = _spy_launches(monkeypatch, mf)
    vid = torch.tensor(([0] * 9 + [1] * 9 + [0] * 9) * 5)
    g = torch.Generator().manual_seed(1)
    D, H = 32, 96
    x = torch.randn(vid.numel(), D, generator=g).requires_grad_()
    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    params = [t.requires_grad_() for t in (1 + 0.2 * rnd(2, D), 0.1 * rnd(2, D), rnd(2, H, D) / D ** 0.5,
                                           0.1 * rnd(2, H), rnd(2, D, H) / H ** 0.5, 0.1 * rnd(2, D))]
    gout = torch.randn(vid.numel(), D, generator=g)
    out = mf.move_ffn(x, vid, *params)
    got = [out.detach()] + list(torch.autograd.grad(out, [x] + params, gout))
    precision("highest")
    out_r = mf.move_ffn_ref(x, vid, *params)
    ref = [out_r.detach()] + list(torch.autograd.grad(out_r, [x] + params, gout))
    assert interpret_mf == {"fwd": 1, "bwd": 1}
    gemms = [meta for name, meta in seen if name in ("_grouped_mm_kernel", "_grouped_wgrad_kernel")]
    assert gemms and all(m["PREC"] == "tf32" for m in gemms)
    want = mf._gemm_meta(mf.GEMM_CONFIGS["tf32"][0], H, D)[0]
    assert any(m["BLOCK_K"] == want["BLOCK_K"] and m["BLOCK_N"] == want["BLOCK_N"]
               for name, m in seen if name == "_grouped_mm_kernel")
    for i, (a, r) in enumerate(zip(got, ref)):
        assert torch.isfinite(a).all() and _rel_err(a, r) <= TF32_RTOL, i


@pytest.mark.cuda
@pytest.mark.parametrize("setting,rtol", [("high", TF32_RTOL), ("highest", 1e-4)])
def test_fp32_fused_ops_follow_the_precision_setting_on_gpu(precision, setting, rtol):
    """On a GPU: TF32 tiles within the TF32 tolerance under 'high', exact-fp32 parity under 'highest'."""
    dev = torch.device("cuda")
    q, c, qm, cm, w, b = _local_align_inputs(dev, B=4, Tq=111, Tc=392, d=128)
    precision(setting)
    got = _loss_grads(la.token_align_loss, q, c, qm, cm, w, b)
    precision("highest")
    ref = _loss_grads(la.token_align_loss_ref, q, c, qm, cm, w, b)
    for name, g, r in zip(["loss", "dq", "dc", "dw", "db"], got, ref):
        assert _rel_err(g, r) <= rtol, (setting, name, _rel_err(g, r))


@pytest.mark.parametrize("amp,logged", [("bf16", True), ("none", False)])
def test_cpu_autocast_says_it_is_slower_than_fp32(tmp_path, vocab_path, caplog, amp, logged):
    from test_train_step_fast_path import build_trainer

    with caplog.at_level(logging.WARNING, logger="medst_fast"):
        t, _ = build_trainer(tmp_path / "run", vocab_path, "--amp", amp)
    t.close()
    lines = [r.getMessage() for r in caplog.records if "CPU autocast is slower than fp32" in r.getMessage()]
    assert len(lines) == (1 if logged else 0), lines
