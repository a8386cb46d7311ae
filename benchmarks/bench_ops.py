"""Per-op benchmarks at the trainer's precision: fused local alignment and MoVE FFN against the PyTorch reference
path and eager paths laid out like the official Med-ST code, on the same device, in the same run (fwd + bwd).

    pytest benchmarks/bench_ops.py --benchmark [--bench-csv PATH] [--bench-quick]

Local alignment: fp32 token features (as the loss gets them) under bf16 autocast; the fused op with the
trainer's compute dtype (bf16 product operands, fp32 accumulation and softmax), the reference with the same
compute dtype, the official layout (bmm + softmax + bmm, nn.MultiheadAttention weights) and the same with a
1-head ``scaled_dot_product_attention`` for the token-to-patch context. MoVE FFN, two precisions: bf16
autocast over an fp32 residual stream with fp32 master weights (what the trainer runs) and pure bf16.
40 and 160 studies, half of them with a lateral. Each row: ms (median, min-max and n in the note), ratio =
speed-up, TFLOP/s of both sides (useful flops: tokens that exist), the path and compute dtype that ran. On a
machine without CUDA it runs tiny shapes only (the fused ops then take their reference path): those rows
check that the benchmark runs, they are not performance numbers. ``-k gemm_configs`` times each MoVE FFN GEMM
at every config of its candidate set against the config move_ffn's table picks (CUDA, or a tiny smoke run
under TRITON_INTERPRET=1).
"""
import contextlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from _common import bench, peak_gib, precision_name, quick, row, spread
from medst_fast.kernels import local_align as la
from medst_fast.kernels import move_ffn as mf
from medst_fast.kernels._utils import use_triton

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
AMP = torch.bfloat16 if CUDA else None  # the trainer's autocast dtype (--amp bf16); none on the CPU
STUDIES = (40, 160) if CUDA and not quick() else (2,)
N_FRONT = 197 if CUDA else 5  # CLS + 14 x 14 patches (ViT-B/16 at 224 px)
N_LAT = N_FRONT - 1


def autocast():
    return torch.autocast(DEV, dtype=AMP) if AMP is not None else contextlib.nullcontext()


def _finish(op, shape, timings, bench_results, precision, ran):
    """timings: {impl label: (ms dict, peak GiB, TFLOP/s)}; the first is ours, the others its baselines."""
    (ours, (t_ours, peak_ours, tf_ours)), *baselines = timings.items()
    rows = []
    for base, (t_base, peak_base, tf_base) in baselines:
        note = f"ours {spread(t_ours)}, baseline {spread(t_base)}; TFLOP/s {tf_ours:.3g} vs {tf_base:.3g}; ran: {ran}"
        if CUDA:
            note += f"; peak GiB {peak_ours:.3g} vs {peak_base:.3g}"
        rows.append(row("ops", op, shape, "ms", base, t_base["ms"], ours, t_ours["ms"], precision, note=note))
    bench_results.add(rows)
    return rows


def _time_all(impls, flops):
    timings = {}
    for label, run in impls.items():
        t = bench(run)
        timings[label] = (t, peak_gib(run), flops / t["ms"] / 1e9)
    return timings


# ---------------------------------------------------------------------------------------- local alignment
def official_style_local_loss(q, c, mha: nn.MultiheadAttention, tau: float, renorm: bool, sdpa: bool = False):
    """One direction as the official module computes it: bmm + softmax + bmm (or, ``sdpa``, one 1-head
    scaled_dot_product_attention for the same context), nn.MultiheadAttention for the token weights,
    cross_entropy over the (B, Tq, Tq) similarity in both directions."""
    B, Tq, _ = q.shape
    if sdpa:
        ctx = F.scaled_dot_product_attention(q[:, None], c[:, None], c[:, None], scale=1.0 / tau)[:, 0]
    else:
        attn = torch.softmax(torch.bmm(q, c.transpose(1, 2)) / tau, dim=-1)
        ctx = torch.bmm(attn, c)
    if renorm:
        ctx = F.normalize(ctx, dim=-1)
    a = F.normalize(q * ctx, dim=-1)
    _, w = mha(a.mean(1, keepdim=True), a, a)
    w = w.squeeze(1)
    w = w / w.sum(1, keepdim=True)
    s = torch.bmm(q, ctx.transpose(1, 2)) / tau
    tgt = torch.arange(Tq, device=q.device).repeat(B)
    row = F.cross_entropy(s.reshape(B * Tq, Tq).float(), tgt, reduction="none")
    col = F.cross_entropy(s.transpose(1, 2).reshape(B * Tq, Tq).float(), tgt, reduction="none")
    return (w.reshape(-1) * (row + col) / 2).sum() / B


def local_flops(B, W, P, d):
    # matmul flops of both directions: scores + context (2 x 2BTqTcd) and the Tq x Tq similarity (2BTq^2d)
    fwd = 2 * (2 * 2 * B * W * P * d) + 2 * B * W * W * d + 2 * B * P * P * d
    return 3 * fwd  # forward + backward (backward ~ 2x forward)


def local_alignment_case(B):
    """(impls, flops, shape, ran): fwd + bwd closures of every implementation on the same inputs."""
    W, P, d = (111, 2 * (N_FRONT - 1), 128) if CUDA else (11, 8, 32)
    words = F.normalize(torch.randn(B, W, d, device=DEV), dim=-1).requires_grad_()
    patches = F.normalize(torch.randn(B, P, d, device=DEV), dim=-1).requires_grad_()
    mha_w = nn.MultiheadAttention(d, 1, batch_first=True).to(DEV)
    mha_p = nn.MultiheadAttention(d, 1, batch_first=True).to(DEV)
    args_w = (mha_w.in_proj_weight, mha_w.in_proj_bias)
    args_p = (mha_p.in_proj_weight, mha_p.in_proj_bias)
    params = [words, patches, *args_w, *args_p]

    def step(loss_fn):
        def run():
            with autocast():
                loss = loss_fn()
            torch.autograd.grad(loss, params, allow_unused=True)
        return run

    ct = AMP  # what losses.local_loss passes: the forward's autocast dtype (None = exact fp32)
    fused_path = "triton" if use_triton(words, patches) else "reference-fallback"
    impls = {
        f"fused({fused_path})": step(lambda: la.token_align_loss(words, patches, None, None, *args_w, 0.1, True, ct)
                                     + la.token_align_loss(patches, words, None, None, *args_p, 0.1, False, ct)),
        "reference": step(lambda: la.token_align_loss_ref(words, patches, None, None, *args_w, 0.1, True, ct)
                          + la.token_align_loss_ref(patches, words, None, None, *args_p, 0.1, False, ct)),
        "official eager bmm": step(lambda: official_style_local_loss(words, patches, mha_w, 0.1, True)
                                   + official_style_local_loss(patches, words, mha_p, 0.1, False)),
        "official eager 1-head SDPA": step(lambda: official_style_local_loss(words, patches, mha_w, 0.1, True, True)
                                           + official_style_local_loss(patches, words, mha_p, 0.1, False, True)),
    }
    ran = f"fused {fused_path} compute_dtype {precision_name(ct)}; " + (
        f"baselines under autocast {precision_name(AMP)}" if AMP is not None else "no autocast: every side fp32")
    return impls, local_flops(B, W, P, d), f"B{B} W{W} P{P} d{d}", ran


@pytest.mark.parametrize("studies", STUDIES)
def test_local_alignment(bench_results, studies):
    impls, flops, shape, ran = local_alignment_case(studies)
    precision = f"{precision_name(AMP)} autocast, fp32 inputs" if AMP else "fp32"
    rows = _finish("local_align_fwd_bwd", shape, _time_all(impls, flops), bench_results, precision, ran)
    assert rows and all(r["ours_value"] > 0 for r in rows)


# ------------------------------------------------------------------------------------------------- MoVE FFN
class _Mlp(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, h), nn.GELU(), nn.Linear(h, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def move_ffn_case(studies, pure_bf16: bool):
    """(impls, flops, shape, ran, precision). ``pure_bf16``: every tensor bf16, no autocast; else the trainer's
    way: fp32 residual stream and fp32 master weights under bf16 autocast (fp32 throughout on the CPU)."""
    D, H = (768, 3072) if CUDA else (32, 64)
    n_lat = studies // 2 or 1  # half the studies have a lateral
    N = N_FRONT + N_LAT
    dt = torch.bfloat16 if pure_bf16 else torch.float32
    use_amp = not pure_bf16 and AMP is not None
    amp = autocast if use_amp else contextlib.nullcontext
    norm, norm_l = nn.LayerNorm(D, eps=1e-6).to(DEV, dt), nn.LayerNorm(D, eps=1e-6).to(DEV, dt)
    mlp, mlp_l = _Mlp(D, H).to(DEV, dt), _Mlp(D, H).to(DEV, dt)
    # The official layout: (B, N, D) with every study's lateral slots (zeros where there is none).
    x3 = torch.randn(studies, N, D, device=DEV, dtype=dt, requires_grad=True)
    keep = torch.ones(studies, N, dtype=torch.bool)
    keep[n_lat:, N_FRONT:] = False
    vid3 = torch.cat([torch.zeros(N_FRONT), torch.ones(N_LAT)]).long().repeat(studies, 1)
    vid = vid3[keep].to(DEV)
    stack = lambda a, b: torch.stack([a, b]).detach().requires_grad_()  # noqa: E731
    ln_w, ln_b = stack(norm.weight, norm_l.weight), stack(norm.bias, norm_l.bias)
    w1, b1 = stack(mlp.fc1.weight, mlp_l.fc1.weight), stack(mlp.fc1.bias, mlp_l.fc1.bias)
    w2, b2 = stack(mlp.fc2.weight, mlp_l.fc2.weight), stack(mlp.fc2.bias, mlp_l.fc2.bias)
    x = x3.detach()[keep.to(DEV)].contiguous().requires_grad_()  # packed: absent laterals are not tokens
    routing = mf.build_routing(vid)
    gy3, gy = torch.randn_like(x3), torch.randn_like(x)
    packed = [x, ln_w, ln_b, w1, b1, w2, b2]
    official = [x3, *norm.parameters(), *norm_l.parameters(), *mlp.parameters(), *mlp_l.parameters()]

    def official_fwd():  # the official MoVE block: strided slices, two experts, cat, one residual add
        f, lat = x3[:, :N_FRONT], x3[:, N_FRONT:]
        return x3 + torch.cat([mlp(norm(f)), mlp_l(norm_l(lat))], dim=1)

    def grad(fn, params, g):
        def run():
            with amp():
                y = fn()
            torch.autograd.grad(y, params, g)
        return run

    path = "triton" if use_triton(x) else "reference-fallback"
    impls = {
        f"fused({path})": grad(lambda: mf.move_ffn(x, vid, ln_w, ln_b, w1, b1, w2, b2, 1e-6, routing=routing),
                               packed, gy),
        "reference": grad(lambda: mf.move_ffn_ref(x, vid, ln_w, ln_b, w1, b1, w2, b2, 1e-6), packed, gy),
        "official eager (padded laterals)": grad(official_fwd, official, gy3),
    }
    flops = 3 * 2 * 2 * x.shape[0] * D * H  # two GEMMs, forward + backward, over the tokens that exist
    ct = mf.resolve_compute_dtype(x, None) if not use_amp else AMP
    if pure_bf16:
        precision = "bf16 (pure)"
    else:
        precision = f"{precision_name(AMP)} autocast, fp32 residual + master weights" if use_amp else "fp32"
    ran = f"fused {path} compute_dtype {precision_name(ct)}; residual {precision_name(dt)}"
    shape = f"{studies} studies ({n_lat} with lateral), {x.shape[0]} tokens, D{D} H{H}"
    return impls, flops, shape, ran, precision


@pytest.mark.parametrize("pure_bf16", [False, True], ids=["autocast", "pure_bf16"])
@pytest.mark.parametrize("studies", STUDIES)
def test_move_ffn(bench_results, studies, pure_bf16):
    impls, flops, shape, ran, precision = move_ffn_case(studies, pure_bf16)
    rows = _finish("move_ffn_fwd_bwd", shape, _time_all(impls, flops), bench_results, precision, ran)
    assert rows and all(r["ours_value"] > 0 for r in rows)


# ------------------------------------------------------------------------- MoVE FFN: every config of the sets
def _ffn_gemms(studies, D, H, ct):
    """The six GEMM launches of one MoVE FFN fwd+bwd, on random operands laid out as the op lays them out:
    name -> (which set, N, K, useful flops, launch). Padding slots do no useful work: flops count tokens."""
    n_tok = studies * 197 + (studies // 2) * 196
    vid = torch.cat([torch.zeros(studies * 197), torch.ones((studies // 2) * 196)]).long()
    r = mf.build_routing(vid).to(DEV)
    slots, tiles = r.rows.numel(), r.tile_expert.numel()
    rnd = lambda *s: torch.randn(*s, device=DEV).to(ct)  # noqa: E731
    w1, w2 = rnd(2, H, D) / D ** 0.5, rnd(2, D, H) / H ** 0.5
    h, g, z1, dz1 = rnd(slots, D), rnd(slots, H), rnd(slots, H), rnd(slots, H)
    x, dy = torch.randn(n_tok, D, device=DEV), rnd(n_tok, D)
    b1, b2 = torch.zeros(2, H, device=DEV), torch.zeros(2, D, device=DEV)
    out_g, out_z, out_dz = torch.empty_like(g), torch.empty_like(z1), torch.empty_like(dz1)
    out_x = torch.empty_like(x)
    dh = torch.empty(slots, D, device=DEV)
    part = torch.empty(tiles, H, device=DEV)
    rows, te, seg = r.rows, r.tile_expert, r.seg
    gemm = lambda n, k: 2 * n_tok * n * k  # noqa: E731
    return {
        "fc1+gelu": ("gemm", H, D, gemm(H, D), lambda: mf._mm(h, rows, te, w1, H, D, out_g, b_ncontig=False, epi=1,
                                                              bias=b1, aux=out_z)),
        "fc2+residual": ("gemm", D, H, gemm(D, H), lambda: mf._mm(g, rows, te, w2, D, H, out_x, b_ncontig=False,
                                                                  epi=2, bias=b2, res=x)),
        "dz1": ("gemm", H, D, gemm(H, D), lambda: mf._mm(dy, rows, te, w2, H, D, out_dz, b_ncontig=True,
                                                         gather=True, epi=3, aux=z1, part=part)),
        "dh": ("gemm", D, H, gemm(D, H), lambda: mf._mm(dz1, rows, te, w1, D, H, dh, b_ncontig=True)),
        "dW2": ("wgrad", D, H, gemm(D, H), lambda: mf._wgrad(dy, rows, g, seg, D, H, gather=True)),
        "dW1": ("wgrad", H, D, gemm(H, D), lambda: mf._wgrad(dz1, rows, h, seg, H, D, gather=False)),
    }, slots


def _cfg_label(cfg) -> str:
    if isinstance(cfg, mf.WgradConfig):
        return f"R{cfg.block_r} {cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}"
    return f"{mf.BLOCK_M}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}"


def test_move_ffn_gemm_configs(bench_results):
    """Each GEMM of the MoVE FFN at every config of its candidate set, at 40 and 160 studies (half with a
    lateral): one row per (GEMM, config), baseline = the table's pick in the same run, ratio > 1 = this config
    beats the table (then benchmarks' winners go into move_ffn._GEMM_TABLE / _WGRAD_TABLE). TFLOP/s of both in
    the note. The Triton kernels only: CUDA, or the interpreter (TRITON_INTERPRET=1) on tiny shapes."""
    from medst_fast.kernels import _utils

    if not (CUDA or (_utils.interpreting() and _utils.interpreter_ready())):
        pytest.skip("the Triton GEMMs need CUDA (or TRITON_INTERPRET=1 for a tiny smoke run)")
    ct = torch.bfloat16
    D, H, studies_list = (768, 3072, (40, 160)) if CUDA else (32, 64, (1,))
    sets = {"gemm": mf.GEMM_CONFIGS["mma"], "wgrad": mf.WGRAD_CONFIGS["mma"]}
    for studies in studies_list:
        gemms, slots = _ffn_gemms(studies, D, H, ct)
        rows = []
        for name, (which, n, k, flops, fn) in gemms.items():
            pick = (mf.gemm_config if which == "gemm" else mf.wgrad_config)(ct, slots, n, k)
            t_pick = bench(fn)
            for cfg in sets[which]:
                with mf.forced_configs(**{which: cfg}):
                    t = bench(fn)
                tf, tf_pick = flops / t["ms"] / 1e9, flops / t_pick["ms"] / 1e9
                rows.append(row("ops", "move_ffn_gemm_config", f"S{studies} {name} N{n} K{k} slots{slots}", "ms",
                                f"table pick {_cfg_label(pick)}", t_pick["ms"], _cfg_label(cfg), t["ms"],
                                precision_name(ct), note=f"TFLOP/s {tf:.4g} vs table pick {tf_pick:.4g}"))
        bench_results.add(rows)
