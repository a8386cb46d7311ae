"""MoVE FFN op (kernels/move_ffn.py) against its PyTorch reference.

The ``test_interp_*`` tests run the Triton kernels on CPU tensors in a child pytest started with
TRITON_INTERPRET=1 (Triton must see the variable before its first import; setting it in this process would
switch the whole session to the interpreter). See tests/test_kernels_local_align.py for the same pattern.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from medst_fast.kernels import _utils

from _interp import HAS_TRITON, IN_INTERPRETER, run_interp_tests_in_child, triton_backend_counting
from medst_fast.kernels import move_ffn as mf




@pytest.mark.skipif(not HAS_TRITON, reason="Triton does not import here")
def test_kernels_under_interpreter():
    if IN_INTERPRETER:
        pytest.skip("already in the interpreter process: the test_interp_* tests run directly")
    run_interp_tests_in_child(__file__)


@pytest.fixture
def interpret(monkeypatch):
    yield from triton_backend_counting(monkeypatch, mf, "_fwd_triton", "_bwd_triton")


def packed_views(studies, patches, lateral_every):
    """view ids of packed studies [CLS, frontal patches, lateral patches if present], study-major."""
    ids = []
    for s in range(studies):
        ids += [0] * (1 + patches)
        if lateral_every and s % lateral_every == 0:
            ids += [1] * patches
    return torch.tensor(ids)


def make_params(D, H, dtype=torch.float32):
    p = [1 + 0.2 * torch.randn(2, D), 0.1 * torch.randn(2, D), torch.randn(2, H, D) / D ** 0.5,
         0.1 * torch.randn(2, H), torch.randn(2, D, H) / H ** 0.5, 0.1 * torch.randn(2, D)]
    return [t.to(dtype).requires_grad_() for t in p]


NAMES = ["out", "dx", "d_ln_w", "d_ln_b", "d_fc1_w", "d_fc1_b", "d_fc2_w", "d_fc2_b"]


def run(fn, x, vid, params, gout):
    out = fn(x, vid, *params, 1e-6)
    grads = torch.autograd.grad(out, [x] + params, gout)
    return [out.detach().float()] + [g.float() for g in grads]


def bf16_copy(x32, p32):
    """bf16 leaf copies of the fp32 input and parameters (the low-precision side of the error rule)."""
    return x32.detach().bfloat16().requires_grad_(), [p.detach().bfloat16().requires_grad_() for p in p32]


def assert_bf16_rule(got, torch_bf16, ref, label=""):
    """err(kernel, fp32 ref) <= 2 * err(torch bf16, fp32 ref) + 1e-6 for the output and every gradient."""
    for name, g, t, r in zip(NAMES, got, torch_bf16, ref):
        err_k, err_t = (g - r).abs().max().item(), (t - r).abs().max().item()
        assert err_k <= 2 * err_t + 1e-6, f"{label}{name}: kernel err {err_k:.3e} vs torch bf16 err {err_t:.3e}"


def assert_close_rel(got, ref, rtol, name):
    scale = ref.abs().max().item()
    err = (got - ref).abs().max().item()
    tol = rtol * scale if scale > 0 else 1e-6
    assert err <= tol, f"{name}: max err {err:.3e} vs scale {scale:.3e}"


# (studies, patches per view, lateral on every k-th study (0 = none), D, H)
CASES = [
    (1, 4, 0, 32, 64),     # one frontal-only study: the lateral expert gets no tokens
    (1, 6, 1, 48, 80),     # one two-view study, D and H not powers of two
    (3, 9, 2, 32, 96),     # studies 0 and 2 with a lateral
    (13, 11, 2, 32, 64),   # the frontal group (156 tokens) crosses a 128-slot tile
    (12, 12, 1, 64, 128),  # both groups cross a tile boundary
]


@pytest.mark.parametrize("studies,patches,lat,D,H", CASES)
def test_interp_triton_matches_reference_fp32(interpret, studies, patches, lat, D, H):
    vid = packed_views(studies, patches, lat)
    x = torch.randn(vid.numel(), D, requires_grad=True)
    params = make_params(D, H)
    gout = torch.randn_like(x)
    ref = run(mf.move_ffn_ref, x, vid, params, gout)
    got = run(mf.move_ffn, x, vid, params, gout)
    assert interpret == {"fwd": 1, "bwd": 1}, "the Triton kernels did not run"
    for name, g, r in zip(NAMES, got, ref):
        assert torch.isfinite(g).all(), name
        assert_close_rel(g, r, 1e-5, name)


@pytest.mark.parametrize("studies,patches,lat", [(3, 9, 2), (1, 6, 0)])
def test_interp_triton_bf16_error_rule(interpret, studies, patches, lat):
    """err(kernel, fp32 ref) <= 2 * err(torch bf16, fp32 ref) + 1e-6 for the output and every gradient."""
    D, H = 32, 64
    vid = packed_views(studies, patches, lat)
    x32 = torch.randn(vid.numel(), D, requires_grad=True)
    p32 = make_params(D, H)
    gout32 = torch.randn_like(x32)
    x16, p16 = bf16_copy(x32, p32)
    ref = run(mf.move_ffn_ref, x32, vid, p32, gout32)
    torch_bf16 = run(mf.move_ffn_ref, x16, vid, p16, gout32.bfloat16())
    got = run(mf.move_ffn, x16, vid, p16, gout32.bfloat16())
    assert interpret["fwd"] == 1
    assert_bf16_rule(got, torch_bf16, ref)


def _autocast_rule(fn, studies, patches, lat, D, H, check_dtypes=True):
    """Mixed precision as the trainer runs it: fp32 residual stream and master weights under bf16 autocast.

    err(fn, fp32 ref) <= 2 * err(eager module under CPU autocast, fp32 ref) for the output and every gradient,
    and every result keeps fp32 (output, dx, parameter gradients)."""
    vid = packed_views(studies, patches, lat)
    x = torch.randn(vid.numel(), D, requires_grad=True)
    params = make_params(D, H)
    gout = torch.randn_like(x)
    ref = run(mf.move_ffn_ref, x, vid, params, gout)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = run(mf.move_ffn_ref, x, vid, params, gout)
        out = fn(x, vid, *params, 1e-6)
        grads = torch.autograd.grad(out, [x] + params, gout)
    if check_dtypes:
        assert out.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    got = [out.detach()] + list(grads)
    ratios = {}
    for name, g, t, r in zip(NAMES, got, eager, ref):
        err_k, err_t = (g - r).abs().max().item(), (t - r).abs().max().item()
        assert err_t > 0, f"{name}: the eager autocast run shows no bf16 error; the comparison would be empty"
        assert err_k <= 2 * err_t, f"{name}: fused err {err_k:.3e} vs eager autocast err {err_t:.3e}"
        ratios[name] = err_k / err_t
    return ratios


@pytest.mark.parametrize("studies,patches,lat,D,H", [(3, 9, 2, 48, 80), (1, 6, 0, 32, 64)])
def test_interp_triton_autocast_bf16_rule(interpret, studies, patches, lat, D, H):
    _autocast_rule(mf.move_ffn, studies, patches, lat, D, H)
    assert interpret == {"fwd": 1, "bwd": 1}, "the Triton kernels did not run"


@pytest.mark.parametrize("studies,patches,lat,D,H", [(3, 9, 2, 48, 80), (7, 5, 1, 64, 128)])
def test_torch_twin_autocast_bf16_rule(monkeypatch, studies, patches, lat, D, H):
    """The op's PyTorch twin (CPU without the interpreter) under autocast: same rule, fp32 results."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _autocast_rule(lambda x, v, *p: mf.move_ffn_slots(x, mf.build_routing(v), *p), studies, patches, lat, D, H)


def test_autocast_does_not_recast_the_op(monkeypatch):
    """Autocast registers nothing for the op: under bf16 autocast an explicit fp32 compute dtype gives the same
    bits as without autocast, and the saved intermediates keep the compute dtype."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    vid = packed_views(3, 5, 2)
    r = mf.build_routing(vid)
    x = torch.randn(vid.numel(), 32)
    params = [p.detach() for p in make_params(32, 64)]
    plain = mf.move_ffn_slots(x, r, *params, compute_dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        same = mf.move_ffn_slots(x, r, *params, compute_dtype=torch.float32)
        outs = mf._move_ffn_fwd_op(x, r.rows, r.tile_expert, r.seg, *params, 1e-6, torch.bfloat16)
    assert torch.equal(plain, same)
    assert [t.dtype for t in outs[:6]] == [torch.float32, torch.bfloat16, torch.float32, torch.float32,
                                           torch.bfloat16, torch.bfloat16]
    assert mf.resolve_compute_dtype(x, None) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mf.resolve_compute_dtype(x, None) == torch.bfloat16
    with pytest.raises(ValueError, match="compute_dtype"):
        mf.resolve_compute_dtype(x, torch.int8)


@pytest.mark.parametrize("x_dtype,w_dtype,ct", [(torch.float32, torch.float32, torch.float32),
                                                (torch.float32, torch.float32, torch.bfloat16),
                                                (torch.bfloat16, torch.bfloat16, torch.bfloat16)])
def test_fake_impls_match_real_for_every_dtype_mix(monkeypatch, x_dtype, w_dtype, ct):
    """torch.library.opcheck: schema, fake tensors (shapes and dtypes of every output), autograd registration."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    vid = packed_views(2, 5, 1)
    r = mf.build_routing(vid)
    x = torch.randn(vid.numel(), 16, dtype=x_dtype, requires_grad=True)
    params = [p.detach().to(w_dtype).requires_grad_() for p in make_params(16, 32)]
    args = (x, r.rows, r.tile_expert, r.seg, *params, 1e-6, ct)
    torch.library.opcheck(mf._move_ffn_fwd_op, args, test_utils=("test_schema", "test_faketensor",
                                                                 "test_autograd_registration"))
    outs = mf._move_ffn_fwd_op(*args)
    dout = torch.randn_like(x)
    w1 = outs[6] if outs[6].numel() else params[2]
    w2 = outs[7] if outs[7].numel() else params[4]
    bwd_args = (dout, x.detach(), r.rows, r.tile_expert, r.seg, params[0].detach(), w1.detach(), w2.detach(),
                *[t.detach() for t in outs[1:6]])
    torch.library.opcheck(mf._move_ffn_bwd_op, bwd_args, test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------- the GEMM candidate sets
N_SET = max(len(mf.GEMM_CONFIGS["mma"]), len(mf.WGRAD_CONFIGS["mma"]))


def _set_pair(i):
    gemm, wgrad = mf.GEMM_CONFIGS["mma"], mf.WGRAD_CONFIGS["mma"]
    return gemm[i % len(gemm)], wgrad[i % len(wgrad)]


@pytest.mark.parametrize("i", range(N_SET))
def test_interp_every_gemm_config_bf16_rule(interpret, monkeypatch, i):
    """Each config of the mma sets, forced, under the interpreter at one small odd shape (D, H not powers of two,
    the frontal segment crossing a slot tile): the bf16 error rule for the output and every gradient, and the
    launches really used the forced tiles (fitted to the shape)."""
    D, H = 96, 160
    gemm, wgrad = _set_pair(i)
    tiles = []

    def recording(fn, grid, *a, _orig=mf.launch, **meta):
        if fn.__name__ in ("_grouped_mm_kernel", "_grouped_wgrad_kernel"):
            tiles.append((fn.__name__, a[10] if fn.__name__ == "_grouped_mm_kernel" else a[5],
                          a[11] if fn.__name__ == "_grouped_mm_kernel" else a[6],
                          tuple(meta.get(k) for k in ("BLOCK_R", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"))))
        return _orig(fn, grid, *a, **meta)

    monkeypatch.setattr(mf, "launch", recording)
    vid = packed_views(13, 11, 2)  # 156 frontal + 77 lateral tokens
    x32 = torch.randn(vid.numel(), D, requires_grad=True)
    p32 = make_params(D, H)
    gout32 = torch.randn_like(x32)
    x16, p16 = bf16_copy(x32, p32)
    ref = run(mf.move_ffn_ref, x32, vid, p32, gout32)
    torch_bf16 = run(mf.move_ffn_ref, x16, vid, p16, gout32.bfloat16())
    with mf.forced_configs(gemm=gemm, wgrad=wgrad):
        got = run(mf.move_ffn, x16, vid, p16, gout32.bfloat16())
    assert interpret == {"fwd": 1, "bwd": 1}, "the Triton kernels did not run"
    for name, g in zip(NAMES, got):
        assert torch.isfinite(g).all(), name
    assert_bf16_rule(got, torch_bf16, ref, f"config {i} ")
    want = set()
    for kernel, n, k in (("_grouped_mm_kernel", H, D), ("_grouped_mm_kernel", D, H)):
        m, w, st = mf._gemm_meta(gemm, n, k)
        want.add((kernel, n, k, (None, m["BLOCK_N"], m["BLOCK_K"], w, st)))
    for n, k in ((D, H), (H, D)):
        m, w, st = mf._wgrad_meta(wgrad, n, k)
        want.add(("_grouped_wgrad_kernel", n, k, (m["BLOCK_R"], m["BLOCK_N"], m["BLOCK_K"], w, st)))
    assert set(tiles) == want and len(tiles) == 6


def test_config_sets_are_small_and_keep_the_slot_tile():
    for sets in (mf.GEMM_CONFIGS, mf.WGRAD_CONFIGS):
        assert set(sets) == {"mma", "tf32", "fp32"} and 3 <= len(sets["mma"]) <= 5
        assert len(sets["fp32"]) == len(sets["tf32"]) == 1
        assert len(set(sets["mma"])) == len(sets["mma"])
    # the routing pads every expert segment to BLOCK_M; the weight-gradient steps must divide it
    assert mf.BLOCK_M == 128 and all(mf.BLOCK_M % c.block_r == 0 for k in ("mma", "tf32") for c in mf.WGRAD_CONFIGS[k])


def test_table_lookup_is_keyed_on_token_bucket_n_k():
    assert [mf.token_bucket(s) for s in (0, 16383, 16384, 32767, 32768, 10 ** 7)] == [0, 0, 1, 1, 2, 2]
    for table, sets in ((mf._GEMM_TABLE, mf.GEMM_CONFIGS), (mf._WGRAD_TABLE, mf.WGRAD_CONFIGS)):
        assert table and all(0 <= b <= len(mf.TOKEN_BUCKETS) and 0 <= i < len(sets["mma"])
                             for (b, n, k), i in table.items())
    bf = torch.bfloat16
    for (b, n, k), i in mf._GEMM_TABLE.items():
        slots = (0,) + mf.TOKEN_BUCKETS
        assert mf.gemm_config(bf, slots[b], n, k) == mf.GEMM_CONFIGS["mma"][i]
    for (b, n, k), i in mf._WGRAD_TABLE.items():
        assert mf.wgrad_config(bf, ((0,) + mf.TOKEN_BUCKETS)[b], n, k) == mf.WGRAD_CONFIGS["mma"][i]
    # shapes outside the table, and every exact-fp32 shape, take the kind's first config
    assert mf.gemm_config(bf, 1000, 96, 160) == mf.GEMM_CONFIGS["mma"][0]
    assert mf.gemm_config(torch.float32, 40000, 768, 3072) == mf.GEMM_CONFIGS["fp32"][0]
    assert mf.wgrad_config(torch.float16, 1000, 96, 160) == mf.WGRAD_CONFIGS["mma"][0]
    # the table does choose by the token count somewhere (else it would not be keyed on it)
    assert len({mf.gemm_config(bf, s, 768, 3072) for s in (0,) + mf.TOKEN_BUCKETS}) > 1


def test_forced_configs_are_checked_and_restored():
    bf = torch.bfloat16
    c = mf.GEMM_CONFIGS["mma"][-1]
    with mf.forced_configs(gemm=c):
        assert mf.gemm_config(bf, 1000, 768, 3072) == c
        assert mf.wgrad_config(bf, 1000, 768, 3072) == mf.wgrad_config(bf, 1000, 768, 3072)  # not forced: table
        with pytest.raises(ValueError, match="move_ffn.py.*not in the 'fp32' set"):
            mf.gemm_config(torch.float32, 1000, 768, 3072)  # an mma tile was never compiled for exact fp32
    assert mf.gemm_config(bf, 1000, 768, 3072) == mf.GEMM_CONFIGS["mma"][mf._GEMM_TABLE[(0, 768, 3072)]]
    with pytest.raises(ValueError, match="not in the 'mma' set"):
        with mf.forced_configs(wgrad=mf.WgradConfig(128, 256, 256, 8, 3)):
            mf.wgrad_config(bf, 1000, 768, 3072)
    assert mf._forced == {"gemm": None, "wgrad": None}


def test_autotune_only_on_cuda_and_only_when_asked(monkeypatch):
    bf = torch.bfloat16
    monkeypatch.setenv(mf.AUTOTUNE_ENV, "1")
    assert not mf.autotune_enabled(torch.empty(1), bf, "gemm")  # CPU tensor: never benchmarks
    assert not mf.autotune_enabled(torch.empty(1, device="meta"), bf, "gemm")

    class FakeCuda:
        is_cuda = True

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert mf.autotune_enabled(FakeCuda(), bf, "gemm") and mf.autotune_enabled(FakeCuda(), torch.float16, "wgrad")
    assert not mf.autotune_enabled(FakeCuda(), torch.float32, "gemm")  # one config: nothing to tune
    with mf.forced_configs(gemm=mf.GEMM_CONFIGS["mma"][1]):
        assert not mf.autotune_enabled(FakeCuda(), bf, "gemm") and mf.autotune_enabled(FakeCuda(), bf, "wgrad")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not mf.autotune_enabled(FakeCuda(), bf, "gemm")  # the interpreter: nothing to time
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv(mf.AUTOTUNE_ENV, "0")
    assert not mf.autotune_enabled(FakeCuda(), bf, "gemm")  # the default: the table


@pytest.mark.skipif(not HAS_TRITON or IN_INTERPRETER, reason="needs Triton's compiled JIT (not the interpreter)")
def test_autotuner_is_built_over_the_whole_set(monkeypatch):
    """The autotuner holds exactly the set's configs (fitted, duplicates dropped) and keys on N, K and the
    kernel variant; one autotuner per token bucket. Built on CPU; nothing launches."""
    monkeypatch.setattr(_utils, "_autotuners", {})
    key = ("N", "K", "EPI", "A_GATHER", "B_NCONTIG")
    cands = mf._candidates(mf.GEMM_CONFIGS["mma"], mf._gemm_meta, 768, 3072)
    at = _utils.autotuner(mf._grouped_mm_kernel, cands, key, 0)
    got = [(c.kwargs, c.num_warps, c.num_stages) for c in at.configs]
    assert got == [({"BLOCK_N": c.block_n, "BLOCK_K": c.block_k}, c.num_warps, c.num_stages)
                   for c in mf.GEMM_CONFIGS["mma"]]
    assert list(at.keys) == list(key)
    assert _utils.autotuner(mf._grouped_mm_kernel, cands, key, 0) is at
    assert _utils.autotuner(mf._grouped_mm_kernel, cands, key, 1) is not at
    # at a tiny shape the fitted configs collapse: the same tile is not benchmarked twice
    small = mf._candidates(mf.GEMM_CONFIGS["mma"], mf._gemm_meta, 32, 32)
    assert len(small) == len({(c.num_warps, c.num_stages) for c in mf.GEMM_CONFIGS["mma"]}) < len(cands)
    wg = mf._candidates(mf.WGRAD_CONFIGS["mma"], mf._wgrad_meta, 3072, 768)
    assert len(wg) == len(mf.WGRAD_CONFIGS["mma"])


def test_interp_routing_reused_across_blocks(interpret):
    """One routing, two stacked blocks with different weights: equals two reference blocks."""
    vid = packed_views(3, 5, 2)
    x = torch.randn(vid.numel(), 32, requires_grad=True)
    p1, p2 = make_params(32, 64), make_params(32, 64)
    r = mf.build_routing(vid)
    y = mf.move_ffn(mf.move_ffn(x, vid, *p1, 1e-6, routing=r), vid, *p2, 1e-6, routing=r)
    y_ref = mf.move_ffn_ref(mf.move_ffn_ref(x, vid, *p1, 1e-6), vid, *p2, 1e-6)
    assert_close_rel(y.detach(), y_ref.detach(), 1e-5, "out")
    g, g_ref = torch.autograd.grad(y.sum(), x)[0], torch.autograd.grad(y_ref.sum(), x)[0]
    assert_close_rel(g, g_ref, 1e-5, "dx")


SYNC_OPS = {"aten::nonzero", "aten::bincount", "aten::repeat_interleave", "aten::_unique", "aten::_unique2",
            "aten::unique_dim", "aten::unique_consecutive", "aten::masked_select", "aten::_local_scalar_dense",
            "aten::item"}


class OpLog(TorchDispatchMode):
    """Every aten op issued, including inside medst_fast custom ops; paused while a Triton kernel runs (the
    interpreter's own tensor copies are not the op's)."""

    def __init__(self):
        super().__init__()
        self.ops, self.paused = [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused:
            self.ops.append((func, args, kwargs))
        if func.namespace == "medst_fast":  # run its Python implementation here, so its own ops are seen too
            impl = torch._library.custom_ops._maybe_get_opdef(func)._init_fn
            with self:
                return impl(*args, **kwargs)
        return func(*args, **kwargs)


def host_sync_ops(ops):
    """The ops that make a CUDA stream wait for the host (data-dependent shapes or a read of a value)."""
    bad = []
    for func, args, kwargs in ops:
        name = func._schema.name
        if name in SYNC_OPS:
            bad.append(str(func))
        elif name in ("aten::index", "aten::index_put", "aten::index_put_"):
            idx = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in idx):
                bad.append(f"{func} with a boolean mask")
    return bad


def _ffn_fwd_bwd_ops(monkeypatch, fn):
    vid = packed_views(5, 9, 2)
    r = mf.build_routing(vid)  # on the host, as the collate does: not part of the step
    x = torch.randn(vid.numel(), 32, requires_grad=True)
    params = make_params(32, 64)
    log = OpLog()

    def paused_launch(*a, _orig=mf.launch, **k):
        log.paused = True
        try:
            return _orig(*a, **k)
        finally:
            log.paused = False

    monkeypatch.setattr(mf, "launch", paused_launch)
    with log:
        out = fn(x, vid, r, params)
        torch.autograd.grad(out, [x] + params, torch.randn_like(out))
    return log.ops


def test_host_sync_check_catches_sync_ops():
    log = OpLog()
    with log:
        v = torch.tensor([0, 1, 1, 0])
        torch.bincount(v)
        v[v > 0]
        float(v.sum())
    assert len(host_sync_ops(log.ops)) == 3, host_sync_ops(log.ops)


def test_torch_twin_issues_no_host_sync(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ops = _ffn_fwd_bwd_ops(monkeypatch, lambda x, v, r, p: mf.move_ffn_slots(x, r, *p))
    assert any(f._schema.name == "aten::einsum" for f, _, _ in ops), "the twin's ops were not seen"
    assert host_sync_ops(ops) == []


def test_interp_triton_issues_no_host_sync(interpret, monkeypatch):
    ops = _ffn_fwd_bwd_ops(monkeypatch, lambda x, v, r, p: mf.move_ffn(x, v, *p, 1e-6, routing=r))
    assert interpret == {"fwd": 1, "bwd": 1}
    names = {f._schema.name for f, _, _ in ops}
    assert {"aten::empty", "aten::clone"} <= names, "the ops inside the custom ops were not seen"
    assert host_sync_ops(ops) == []


def test_routing_on_host_and_tile_count_fixed_by_token_count():
    """Built on CPU, moved as a whole; the shapes depend only on (N, n_experts, block_m), not on the view mix."""
    shapes = set()
    for lat in (0, 1, 2, 3):
        vid = packed_views(9, 13, lat)[:117]
        r = mf.build_routing(vid)
        assert r.rows.device.type == "cpu" and r.rows.dtype == torch.int32
        shapes.add((r.rows.shape, r.tile_expert.shape, r.seg.shape))
    assert shapes == {(torch.Size([(-(-117 // mf.BLOCK_M) + 1) * mf.BLOCK_M]), torch.Size([2]), torch.Size([3]))}
    r2 = r.to("cpu")
    assert isinstance(r2, mf.MoveRouting) and all(torch.equal(a, b) for a, b in zip(r, r2))


@pytest.mark.parametrize("studies,patches,lat", [(1, 4, 0), (3, 9, 2), (7, 5, 1)])
def test_routing_layout(studies, patches, lat):
    vid = packed_views(studies, patches, lat)
    r = mf.build_routing(vid)
    rows, te, seg = r.rows.long(), r.tile_expert.long(), r.seg.long()
    # every token sits in exactly one slot, inside the segment of its own expert
    assert sorted(rows[rows >= 0].tolist()) == list(range(vid.numel()))
    slot_e = te.repeat_interleave(mf.BLOCK_M)
    assert torch.equal(slot_e[rows >= 0], vid[rows[rows >= 0]])
    for e in range(2):
        n_e = int((vid == e).sum())
        assert int(seg[e + 1] - seg[e]) == -(-n_e // mf.BLOCK_M) * mf.BLOCK_M
        assert (te[seg[e] // mf.BLOCK_M: seg[e + 1] // mf.BLOCK_M] == e).all()
    assert (te[seg[2] // mf.BLOCK_M:] == -1).all()
    # tokens keep their order within an expert (stable grouping)
    for e in range(2):
        seg_rows = rows[seg[e]:seg[e + 1]]
        seg_rows = seg_rows[seg_rows >= 0]
        assert torch.equal(seg_rows, (vid == e).nonzero().squeeze(1))


@pytest.mark.parametrize("studies,patches,lat", [(1, 4, 0), (3, 9, 2)])
def test_slot_layout_torch_twin_matches_reference(monkeypatch, studies, patches, lat):
    """The op's PyTorch implementation (used where the kernels cannot run) against move_ffn_ref."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    vid = packed_views(studies, patches, lat)
    x = torch.randn(vid.numel(), 48, requires_grad=True)
    params = make_params(48, 80)
    gout = torch.randn_like(x)
    r = mf.build_routing(vid)
    ref = run(mf.move_ffn_ref, x, vid, params, gout)
    got = run(lambda x, v, *p: mf.move_ffn_slots(x, r, *p), x, vid, params, gout)
    for name, g, rr in zip(NAMES, got, ref):
        assert_close_rel(g, rr, 1e-5, name)


def test_backend_switch_and_cpu_fallback(monkeypatch):
    vid = packed_views(2, 4, 1)
    x = torch.randn(vid.numel(), 32)
    params = [p.detach() for p in make_params(32, 64)]
    called = []
    monkeypatch.setattr(mf, "_move_ffn_fwd_op", lambda *a: called.append(1) or (mf.move_ffn_ref(
        a[0], vid, *a[4:10], a[10]),))
    monkeypatch.setattr(_utils, "_interpret_enabled", lambda: True)
    old = _utils.get_backend()
    try:
        _utils.set_backend("torch")
        out = mf.move_ffn(x, vid, *params, 1e-6)
        assert called == []
        if HAS_TRITON:
            _utils.set_backend("triton")
            out2 = mf.move_ffn(x, vid, *params, 1e-6)
            assert called == [1]
            assert torch.allclose(out, out2)
    finally:
        _utils.set_backend(old)
    monkeypatch.setattr(_utils, "_interpret_enabled", lambda: False)
    called.clear()
    mf.move_ffn(x, vid, *params, 1e-6)  # CPU tensors without the interpreter: reference path
    assert called == []


def test_bad_shapes_raise_clear_errors():
    vid = packed_views(1, 4, 1)
    params = [p.detach() for p in make_params(32, 64)]
    with pytest.raises(ValueError, match="move_ffn.py"):
        mf.move_ffn(torch.randn(2, vid.numel(), 32), vid, *params)
    with pytest.raises(ValueError, match="view_id"):
        mf.build_routing(vid.float())


def test_torch_compile_fullgraph_custom_op(monkeypatch):
    """Dynamo traces the custom op through its fake and autograd registrations (CPU: its PyTorch twin)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch._dynamo.reset()
    vid = packed_views(3, 4, 2)
    r = mf.build_routing(vid)
    x = torch.randn(vid.numel(), 32, requires_grad=True)
    params = make_params(32, 64)
    gout = torch.randn_like(x)
    compiled = torch.compile(lambda x, v, *p: mf.move_ffn_slots(x, r, *p), fullgraph=True, backend="aot_eager")
    got = run(compiled, x, vid, params, gout)
    ref = run(mf.move_ffn_ref, x, vid, params, gout)
    for name, g, rr in zip(NAMES, got, ref):
        assert_close_rel(g, rr, 1e-5, name)


def _cuda(ts):
    return [t.detach().cuda().requires_grad_() for t in ts]


@pytest.mark.cuda
@pytest.mark.parametrize("studies,patches,lat,D,H", CASES + [(64, 196, 2, 768, 3072)])
def test_cuda_triton_matches_reference(studies, patches, lat, D, H):
    """On the GPU: fp32 against the reference, then the bf16 rule at the real ViT-B shape."""
    old = _utils.get_backend()
    _utils.set_backend("triton")
    try:
        vid = packed_views(studies, patches, lat).cuda()
        x32, = _cuda([torch.randn(vid.numel(), D)])
        p32 = _cuda(make_params(D, H))
        gout = torch.randn_like(x32)
        ref = run(mf.move_ffn_ref, x32, vid, p32, gout)
        got = run(mf.move_ffn, x32, vid, p32, gout)
        for name, g, r in zip(NAMES, got, ref):
            assert_close_rel(g, r, 1e-4, name)  # cuBLAS (reference) and Triton reduce in different orders
        x16, p16 = bf16_copy(x32, p32)
        tb = run(mf.move_ffn_ref, x16, vid, p16, gout.bfloat16())
        kb = run(mf.move_ffn, x16, vid, p16, gout.bfloat16())
        assert_bf16_rule(kb, tb, ref)
    finally:
        _utils.set_backend(old)


@pytest.mark.cuda
@pytest.mark.parametrize("studies", [40, 160])
def test_cuda_every_gemm_config_and_the_autotuner_vit_b(monkeypatch, studies):
    """On the GPU at ViT-B: each config of the sets forced, and MEDST_FAST_AUTOTUNE=1, against the reference
    (bf16 rule); forcing the table's own pick gives the table's bits, and the autotuner picks from the set."""
    old = _utils.get_backend()
    _utils.set_backend("triton")
    try:
        vid = packed_views(studies, 196, 2).cuda()
        x32, = _cuda([torch.randn(vid.numel(), 768)])
        p32 = _cuda(make_params(768, 3072))
        gout = torch.randn_like(x32)
        r = mf.build_routing(vid.cpu()).to("cuda")
        ref = run(mf.move_ffn_ref, x32, vid, p32, gout)
        x16, p16 = bf16_copy(x32, p32)
        tb = run(mf.move_ffn_ref, x16, vid, p16, gout.bfloat16())
        fused = lambda *a: mf.move_ffn(*a, routing=r)  # noqa: E731
        table = run(fused, x16, vid, p16, gout.bfloat16())
        results = {}
        for i in range(N_SET):
            with mf.forced_configs(*_set_pair(i)):
                results[f"config {i}"] = run(fused, x16, vid, p16, gout.bfloat16())
        monkeypatch.setenv(mf.AUTOTUNE_ENV, "1")
        results["autotuned"] = run(fused, x16, vid, p16, gout.bfloat16())
        for label, got in results.items():
            assert_bf16_rule(got, tb, ref, f"{label} ")
        picked = [at.best_config for at in _utils._autotuners.values() if at.base_fn.__name__ == "_grouped_mm_kernel"]
        sets = {(c.block_n, c.block_k, c.num_warps, c.num_stages) for c in mf.GEMM_CONFIGS["mma"]}
        assert picked and all((c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) in sets
                              for c in picked)
        # the default is a pure lookup: after all that, the table's path gives the same bits again
        monkeypatch.delenv(mf.AUTOTUNE_ENV)
        assert all(torch.equal(a, b) for a, b in zip(table, run(fused, x16, vid, p16, gout.bfloat16())))
    finally:
        _utils.set_backend(old)


@pytest.mark.cuda
def test_cuda_autocast_bf16_rule_vit_b():
    """The trainer's case on the GPU: fp32 stream and master weights under bf16 autocast, ViT-B shapes."""
    old = _utils.get_backend()
    _utils.set_backend("triton")
    try:
        vid = packed_views(64, 196, 2).cuda()
        x = torch.randn(vid.numel(), 768, device="cuda", requires_grad=True)
        params = _cuda(make_params(768, 3072))
        gout = torch.randn_like(x)
        ref = run(mf.move_ffn_ref, x, vid, params, gout)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            eager = run(mf.move_ffn_ref, x, vid, params, gout)
            got = run(lambda *a: mf.move_ffn(*a, routing=mf.build_routing(vid.cpu()).to("cuda")), x, vid, params, gout)
        for name, g, t, r in zip(NAMES, got, eager, ref):
            ek, et = (g - r).abs().max().item(), (t - r).abs().max().item()
            assert ek <= 2 * et + 1e-6, f"{name}: fused err {ek:.3e} vs eager autocast err {et:.3e}"
    finally:
        _utils.set_backend(old)
