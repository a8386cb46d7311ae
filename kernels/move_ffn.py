"""MoVE feed-forward (mixture of view experts, medst-spec §1.1): per token, its view's LayerNorm -> fc1 + bias
-> exact GELU -> fc2 + bias, plus the residual, over a packed token buffer.

    out[t] = x[t] + fc2_e(gelu(fc1_e(LN_e(x[t]))))      e = view_id[t] (0 frontal incl. CLS, 1 lateral)

``move_ffn_ref`` is the plain PyTorch reference. ``move_ffn`` runs the Triton path where available:

* Routing (:func:`build_routing`, built once per forward and shared by all blocks): tokens grouped by expert
  into a padded slot layout whose every BLOCK_M tile belongs to one expert. Built from tensor ops only (no
  host sync): the slot count is the upper bound ``(cdiv(N, BLOCK_M) + E - 1) * BLOCK_M``; tiles past the
  last used one carry expert -1 and every kernel returns on them.
* Forward: LayerNorm kernel gathers token rows into the slot layout; grouped GEMM fc1 with fused
  bias + GELU epilogue; grouped GEMM fc2 with fused bias + residual epilogue scattering straight back to
  token order. No slice/cat copies of the token buffer.
* Backward: grouped GEMM dz1 = (dy W2_e) * gelu'(z1) (gathers dy by slot); grouped GEMM dh = dz1 W1_e;
  weight/bias gradients by a per-expert reduction kernel over each expert's slot segment; LayerNorm
  backward scatters dx (+ the residual's dy) to token order and writes per-program partial LN-weight sums.
All products accumulate in fp32; intermediates (h, z1, gelu(z1), dz1) are stored in the input dtype.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ._utils import interpreting, jit_kernel, next_pow2, use_triton

tl = None  # bound to triton.language by _utils.jit_kernel on first launch (keeps Triton an optional import)

N_EXPERTS = 2
BLOCK_M = 64  # slot tile height: the routing pads every expert's token group to a multiple of this


def move_ffn_ref(x, view_id, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b, ln_eps: float = 1e-6) -> torch.Tensor:
    """Reference. x: (N, D); view_id: (N,) int in {0, 1}; weights stacked per expert (see :func:`move_ffn`)."""
    out = x
    for e in range(ln_w.shape[0]):
        idx = (view_id == e).nonzero().squeeze(1)
        xe = x.index_select(0, idx)
        h = F.layer_norm(xe, (x.shape[1],), ln_w[e], ln_b[e], ln_eps)
        y = F.linear(F.gelu(F.linear(h, fc1_w[e], fc1_b[e])), fc2_w[e], fc2_b[e])
        out = out.index_add(0, idx, y.to(x.dtype))
    return out


class MoveRouting(NamedTuple):
    rows: torch.Tensor  # (n_tiles * BLOCK_M,) int32: token index of each slot, -1 for padding
    tile_expert: torch.Tensor  # (n_tiles,) int32: expert of each slot tile, -1 past the used tiles
    seg: torch.Tensor  # (E + 1,) int32: slot offsets of the expert segments (multiples of BLOCK_M)


def build_routing(view_id: torch.Tensor, n_experts: int = N_EXPERTS, block_m: int = BLOCK_M) -> MoveRouting:
    """Group tokens by view into BLOCK_M-aligned expert segments; no host synchronisation.

    Build once per forward pass and pass the result to every block's :func:`move_ffn` call.
    """
    if view_id.dim() != 1 or view_id.dtype.is_floating_point or view_id.dtype == torch.bool:
        raise ValueError(f"kernels/move_ffn.py: view_id must be a 1-D integer tensor, got {view_id.dtype} "
                         f"{tuple(view_id.shape)}")
    n = view_id.numel()
    dev = view_id.device
    v = view_id.long()
    counts = torch.bincount(v, minlength=n_experts)[:n_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    zero = torch.zeros(1, dtype=torch.long, device=dev)
    seg = torch.cat([zero, padded.cumsum(0)])
    first = torch.cat([zero, counts.cumsum(0)])[:-1]  # first sorted position of each expert's tokens
    order = torch.sort(v, stable=True).indices
    sv = v[order]
    dest = seg[sv] + torch.arange(n, device=dev) - first[sv]
    n_tiles = (n + block_m - 1) // block_m + n_experts - 1
    rows = torch.full((n_tiles * block_m,), -1, dtype=torch.int32, device=dev)
    rows = rows.index_put((dest,), order.to(torch.int32))
    starts = torch.arange(n_tiles, device=dev) * block_m
    te = torch.bucketize(starts, seg[1:], right=True)
    tile_expert = torch.where(te >= n_experts, -1, te).to(torch.int32)
    return MoveRouting(rows, tile_expert, seg.to(torch.int32))


# ------------------------------------------------------------------------------------------------ kernels
def _ln_fwd_kernel(X, ROWS, TILE_E, LNW, LNB, H, MEAN, RSTD, D, eps,
                   SUB: tl.constexpr, RNE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # SUB slot rows per program (a full BLOCK_M x D tile would not fit in registers at D = 768).
    pid = tl.program_id(0)
    tile = pid // (BLOCK_M // SUB)
    e = tl.load(TILE_E + tile)
    if e >= 0:
        slots = pid * SUB + tl.arange(0, SUB)
        r = tl.load(ROWS + slots)
        cols = tl.arange(0, BLOCK_D)
        cm = cols < D
        m2 = (r[:, None] >= 0) & cm[None, :]
        x = tl.load(X + r.to(tl.int64)[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        mean = tl.sum(x, 1) / D
        xc = tl.where(cm[None, :], x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / D + eps)
        w = tl.load(LNW + e * D + cols, mask=cm, other=0.0).to(tl.float32)
        b = tl.load(LNB + e * D + cols, mask=cm, other=0.0).to(tl.float32)
        h = xc * rstd[:, None] * w[None, :] + b[None, :]
        h = tl.where(r[:, None] >= 0, h, 0.0)  # padding slots are exact zeros: the weight-gradient sums read them
        if RNE:  # interpreter only: its bf16 stores truncate; round to nearest even first
            h_u = h.to(tl.uint32, bitcast=True)
            h = ((h_u + 0x7FFF + ((h_u >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        tl.store(H + slots.to(tl.int64)[:, None] * D + cols[None, :], h, mask=cm[None, :])
        tl.store(MEAN + slots, mean)
        tl.store(RSTD + slots, rstd)


def _ln_bwd_kernel(DH, X, ROWS, TILE_E, LNW, MEAN, RSTD, DOUT, DX, DWP, DBP, D,
                   SUB: tl.constexpr, RNE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    tile = pid // (BLOCK_M // SUB)
    e = tl.load(TILE_E + tile)
    if e >= 0:
        slots = pid * SUB + tl.arange(0, SUB)
        r = tl.load(ROWS + slots)
        cols = tl.arange(0, BLOCK_D)
        cm = cols < D
        valid = r >= 0
        m2 = valid[:, None] & cm[None, :]
        r64 = r.to(tl.int64)
        x = tl.load(X + r64[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        dh = tl.load(DH + slots.to(tl.int64)[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + slots)
        rstd = tl.load(RSTD + slots)
        w = tl.load(LNW + e * D + cols, mask=cm, other=0.0).to(tl.float32)
        xhat = tl.where(m2, (x - mean[:, None]) * rstd[:, None], 0.0)
        gw = dh * w[None, :]
        c1 = tl.sum(xhat * gw, 1) / D
        c2 = tl.sum(gw, 1) / D
        dx = (gw - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        dy = tl.load(DOUT + r64[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        dx = dx + dy  # + the residual branch
        if RNE:  # interpreter only: its bf16 stores truncate; round to nearest even first
            dx_u = dx.to(tl.uint32, bitcast=True)
            dx = ((dx_u + 0x7FFF + ((dx_u >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        tl.store(DX + r64[:, None] * D + cols[None, :], dx, mask=m2)
        tl.store(DWP + pid * D + cols, tl.sum(dh * xhat, 0), mask=cm)
        tl.store(DBP + pid * D + cols, tl.sum(dh, 0), mask=cm)


def _grouped_mm_kernel(A, ROWS, TILE_E, B, BIAS, C, AUX, RES, N, K, stride_be, stride_bn, stride_bk,
                       A_GATHER: tl.constexpr, EPI: tl.constexpr, IEEE: tl.constexpr, RNE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C[m, n] = epilogue(sum_k A[m, k] B_e[n, k]) for the slot tile m of expert e = TILE_E[tile].

    EPI 0: C = acc.  1: AUX = acc + bias_e (pre-activation), C = gelu(AUX).
    2: C[ROWS[m]] = acc + bias_e + RES[ROWS[m]] (scatter to token order).  3: C = acc * gelu'(AUX).
    A_GATHER: A is in token order and is read through ROWS (padding slots read zeros).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(TILE_E + pid_m)
    if e >= 0:
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        if A_GATHER or EPI == 2:
            r = tl.load(ROWS + rm)
        if A_GATHER:
            a_row = r.to(tl.int64)
            a_ok = r >= 0
        else:
            a_row = rm.to(tl.int64)
            a_ok = rm >= 0
        nm = rn < N
        b_base = B + e.to(tl.int64) * stride_be
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            km = kk < K
            a = tl.load(A + a_row[:, None] * K + kk[None, :], mask=a_ok[:, None] & km[None, :], other=0.0)
            b = tl.load(b_base + kk[:, None] * stride_bk + rn[None, :] * stride_bn, mask=km[:, None] & nm[None, :],
                        other=0.0)
            if IEEE:
                acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(a, b.to(a.dtype))
        c_off = rm.to(tl.int64)[:, None] * N + rn[None, :]
        if EPI == 0:
            tl.store(C + c_off, acc, mask=nm[None, :])
        elif EPI == 1:
            z = acc + tl.load(BIAS + e * N + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
            if RNE:  # interpreter only: its bf16 stores truncate; round to nearest even first
                z_u = z.to(tl.uint32, bitcast=True)
                z = ((z_u + 0x7FFF + ((z_u >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
            tl.store(AUX + c_off, z, mask=nm[None, :])
            # exact GELU from the stored (input-dtype) pre-activation, so backward's gelu' sees the same z
            z = tl.load(AUX + c_off, mask=nm[None, :], other=0.0).to(tl.float32)
            g = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
            if RNE:  # interpreter only: its bf16 stores truncate; round to nearest even first
                g_u = g.to(tl.uint32, bitcast=True)
                g = ((g_u + 0x7FFF + ((g_u >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
            tl.store(C + c_off, g, mask=nm[None, :])
        elif EPI == 2:
            ok = (r >= 0)[:, None] & nm[None, :]
            o_off = r.to(tl.int64)[:, None] * N + rn[None, :]
            res = tl.load(RES + o_off, mask=ok, other=0.0).to(tl.float32)
            y = acc + tl.load(BIAS + e * N + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
            # round the branch to the output dtype before the residual add, as the eager module does
            if RNE:  # interpreter only: its bf16 casts truncate; round to nearest even
                y_u = y.to(tl.uint32, bitcast=True)
                y = ((y_u + 0x7FFF + ((y_u >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
            else:
                y = y.to(C.dtype.element_ty).to(tl.float32)
            y = res + y
            if RNE:  # interpreter only: its bf16 stores truncate; round to nearest even first
                y_u = y.to(tl.uint32, bitcast=True)
                y = ((y_u + 0x7FFF + ((y_u >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
            tl.store(C + o_off, y, mask=ok)
        else:
            z = tl.load(AUX + c_off, mask=nm[None, :], other=0.0).to(tl.float32)
            cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
            pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
            dz = acc * (cdf + z * pdf)
            if RNE:  # interpreter only: its bf16 stores truncate; round to nearest even first
                dz_u = dz.to(tl.uint32, bitcast=True)
                dz = ((dz_u + 0x7FFF + ((dz_u >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
            tl.store(C + c_off, dz, mask=nm[None, :])


def _grouped_wgrad_kernel(A, ROWS, BM, SEG, DW, DB, N, K,
                          A_GATHER: tl.constexpr, IEEE: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """DW[e, n, k] = sum over expert e's slots m of A[m, n] BM[m, k]; DB[e, n] = sum_m A[m, n] (pid_k == 0)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    e = tl.program_id(2)
    start = tl.load(SEG + e)
    end = tl.load(SEG + e + 1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    nm = rn < N
    km = rk < K
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    dbias = tl.zeros([BLOCK_N], tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        if A_GATHER:
            r = tl.load(ROWS + rm)
            a_row = r.to(tl.int64)
            a_ok = r >= 0
        else:
            a_row = rm.to(tl.int64)
            a_ok = rm >= 0
        a = tl.load(A + a_row[:, None] * N + rn[None, :], mask=a_ok[:, None] & nm[None, :], other=0.0)
        b = tl.load(BM + rm.to(tl.int64)[:, None] * K + rk[None, :], mask=km[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(tl.trans(a).to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(a), b.to(a.dtype))
        dbias += tl.sum(a.to(tl.float32), 0)
    tl.store(DW + e * N * K + rn[:, None] * K + rk[None, :], acc, mask=nm[:, None] & km[None, :])
    if pid_k == 0:
        tl.store(DB + e * N + rn, dbias, mask=nm)


# ---------------------------------------------------------------------------------------------- launchers
_SUB = 4


def _ieee(a: torch.Tensor) -> bool:
    # fp32 inputs get exact fp32 products (the tests' 1e-5); bf16/fp16 tiles feed the tensor cores as is.
    # Triton's CPU interpreter has no bf16 matmul (numpy holds bf16 as raw uint16), so there the tiles are
    # upcast: the same products, exactly, as bf16 x bf16 with fp32 accumulation.
    return a.dtype == torch.float32 or interpreting()


def _rne(t: torch.Tensor) -> bool:
    return t.dtype == torch.bfloat16 and interpreting()


def _gemm_blocks(n: int, k: int):
    return min(128, max(16, next_pow2(n))), min(64, max(16, next_pow2(k)))


def _mm(a, rows, tile_expert, w, stride_be, stride_bn, stride_bk, n, k, c, *, gather=False, epi=0, bias=None,
        aux=None, res=None):
    bn, bk = _gemm_blocks(n, k)
    grid = (tile_expert.numel(), triton_cdiv(n, bn))
    jit_kernel(_grouped_mm_kernel)[grid](
        a, rows, tile_expert, w, bias if bias is not None else w, c, aux if aux is not None else c,
        res if res is not None else c, n, k, stride_be, stride_bn, stride_bk,
        A_GATHER=gather, EPI=epi, IEEE=_ieee(a), RNE=_rne(c if epi != 0 else a), BLOCK_M=BLOCK_M, BLOCK_N=bn, BLOCK_K=bk)


def _wgrad(a, rows, bm, seg, n, k, gather):
    bn, bk = min(64, max(16, next_pow2(n))), min(64, max(16, next_pow2(k)))
    dw = torch.empty(N_EXPERTS, n, k, device=a.device, dtype=torch.float32)
    db = torch.empty(N_EXPERTS, n, device=a.device, dtype=torch.float32)
    grid = (triton_cdiv(n, bn), triton_cdiv(k, bk), N_EXPERTS)
    jit_kernel(_grouped_wgrad_kernel)[grid](a, rows, bm, seg, dw, db, n, k, A_GATHER=gather, IEEE=_ieee(a),
                                            BLOCK_M=BLOCK_M, BLOCK_N=bn, BLOCK_K=bk)
    return dw, db


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _fwd_triton(x, rows, tile_expert, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b, eps):
    n_slots, (n_tok, d), hdim = rows.numel(), x.shape, fc1_w.shape[1]
    dev, dt = x.device, x.dtype
    h = torch.empty(n_slots, d, device=dev, dtype=dt)
    mean = torch.empty(n_slots, device=dev, dtype=torch.float32)
    rstd = torch.empty(n_slots, device=dev, dtype=torch.float32)
    jit_kernel(_ln_fwd_kernel)[(n_slots // _SUB,)](x, rows, tile_expert, ln_w, ln_b, h, mean, rstd, d, float(eps),
                                                   SUB=_SUB, RNE=_rne(x), BLOCK_M=BLOCK_M, BLOCK_D=next_pow2(d))
    z1 = torch.empty(n_slots, hdim, device=dev, dtype=dt)
    g = torch.empty(n_slots, hdim, device=dev, dtype=dt)
    # fc1_w (E, H, D): B_e[n=h, k=d]
    _mm(h, rows, tile_expert, fc1_w, hdim * d, d, 1, hdim, d, g, epi=1, bias=fc1_b, aux=z1)
    out = torch.empty_like(x)
    # fc2_w (E, D, H): B_e[n=d, k=h]
    _mm(g, rows, tile_expert, fc2_w, d * hdim, hdim, 1, d, hdim, out, epi=2, bias=fc2_b, res=x)
    return out, h, mean, rstd, z1, g


def _bwd_triton(dout, x, rows, tile_expert, seg, ln_w, fc1_w, fc2_w, h, mean, rstd, z1, g):
    n_slots, (n_tok, d), hdim = rows.numel(), x.shape, fc1_w.shape[1]
    dev = x.device
    dout = dout.contiguous()
    dz1 = torch.empty(n_slots, hdim, device=dev, dtype=x.dtype)
    # dz1[m, h] = sum_d dy[m, d] W2_e[d, h] * gelu'(z1): B_e[n=h, k=d] = fc2_w[e, d, h]
    _mm(dout, rows, tile_expert, fc2_w, d * hdim, 1, hdim, hdim, d, dz1, gather=True, epi=3, aux=z1)
    dh = torch.empty(n_slots, d, device=dev, dtype=torch.float32)
    # dh[m, d] = sum_h dz1[m, h] W1_e[h, d]: B_e[n=d, k=h] = fc1_w[e, h, d]
    _mm(dz1, rows, tile_expert, fc1_w, hdim * d, 1, d, d, hdim, dh)
    dw2, db2 = _wgrad(dout, rows, g, seg, d, hdim, gather=True)
    dw1, db1 = _wgrad(dz1, rows, h, seg, hdim, d, gather=False)
    n_prog = n_slots // _SUB
    dx = torch.empty_like(x)
    dwp = torch.zeros(n_prog, d, device=dev, dtype=torch.float32)
    dbp = torch.zeros(n_prog, d, device=dev, dtype=torch.float32)
    jit_kernel(_ln_bwd_kernel)[(n_prog,)](dh, x, rows, tile_expert, ln_w, mean, rstd, dout, dx, dwp, dbp, d,
                                          SUB=_SUB, RNE=_rne(x), BLOCK_M=BLOCK_M, BLOCK_D=next_pow2(d))
    prog_e = tile_expert.long().clamp_min(0).repeat_interleave(BLOCK_M // _SUB)  # unused programs wrote zeros
    dlnw = torch.zeros(N_EXPERTS, d, device=dev, dtype=torch.float32).index_add_(0, prog_e, dwp)
    dlnb = torch.zeros(N_EXPERTS, d, device=dev, dtype=torch.float32).index_add_(0, prog_e, dbp)
    return dx, dlnw, dlnb, dw1, db1, dw2, db2


# The same slot-layout computation in PyTorch: the ops' implementation where the kernels cannot run (CPU
# without the interpreter, e.g. torch.compile tests), and a second check of the layout logic.
def _per_expert(ec, fn):
    # every slot through every expert, keeping its own: 2x the flops but no (slots, H, D) weight gather
    out = fn(0)
    for i in range(1, N_EXPERTS):
        out = torch.where((ec == i)[:, None], fn(i), out)
    return out


def _slot_expert(rows, tile_expert):
    return tile_expert.long().repeat_interleave(rows.numel() // tile_expert.numel())


def _fwd_torch(x, rows, tile_expert, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b, eps):
    e = _slot_expert(rows, tile_expert)
    ok = (rows >= 0) & (e >= 0)
    ec = e.clamp_min(0)
    xs = torch.where(ok[:, None], x[rows.long().clamp_min(0)], 0).float()
    mean = xs.mean(1)
    rstd = torch.rsqrt(xs.var(1, unbiased=False) + eps)
    h = ((xs - mean[:, None]) * rstd[:, None] * ln_w[ec].float() + ln_b[ec].float()) * ok[:, None]
    h = h.to(x.dtype)
    z1 = _per_expert(ec, lambda i: h.float() @ fc1_w[i].float().t() + fc1_b[i].float()).to(x.dtype)
    g = F.gelu(z1.float()).to(x.dtype)
    y = _per_expert(ec, lambda i: g.float() @ fc2_w[i].float().t() + fc2_b[i].float()).to(x.dtype)
    out = x.index_add(0, rows.long()[ok], y[ok])
    return out, h, mean, rstd, z1, g


def _bwd_torch(dout, x, rows, tile_expert, seg, ln_w, fc1_w, fc2_w, h, mean, rstd, z1, g):
    e = _slot_expert(rows, tile_expert)
    ok = (rows >= 0) & (e >= 0)
    ec = e.clamp_min(0)
    dy = torch.where(ok[:, None], dout[rows.long().clamp_min(0)], 0).float()
    zf = z1.float()
    gelu_grad = 0.5 * (1 + torch.erf(zf / math.sqrt(2))) + zf * torch.exp(-0.5 * zf * zf) / math.sqrt(2 * math.pi)
    dz1 = (_per_expert(ec, lambda i: dy @ fc2_w[i].float()) * gelu_grad * ok[:, None]).to(x.dtype)
    dh = _per_expert(ec, lambda i: dz1.float() @ fc1_w[i].float())
    oh = F.one_hot(ec, N_EXPERTS).float() * ok[:, None]  # (M, E)
    dw2 = torch.einsum("me,md,mh->edh", oh, dy, g.float())
    db2 = oh.t() @ dy
    dw1 = torch.einsum("me,mh,md->ehd", oh, dz1.float(), h.float())
    db1 = oh.t() @ dz1.float()
    xs = torch.where(ok[:, None], x[rows.long().clamp_min(0)], 0).float()
    xhat = (xs - mean[:, None]) * rstd[:, None] * ok[:, None]
    gw = dh * ln_w[ec].float()
    dxs = (gw - xhat * (xhat * gw).mean(1, keepdim=True) - gw.mean(1, keepdim=True)) * rstd[:, None]
    dx = dout.float().index_add(0, rows.long()[ok], dxs[ok]).to(x.dtype)
    dlnw = oh.t() @ (dh * xhat)
    dlnb = oh.t() @ dh
    return dx, dlnw, dlnb, dw1, db1, dw2, db2


# ------------------------------------------------------------------------------------- custom ops + autograd
@torch.library.custom_op("medst_fast::move_ffn_fwd", mutates_args=())
def _move_ffn_fwd_op(x: torch.Tensor, rows: torch.Tensor, tile_expert: torch.Tensor, seg: torch.Tensor,
                     ln_w: torch.Tensor, ln_b: torch.Tensor, fc1_w: torch.Tensor, fc1_b: torch.Tensor,
                     fc2_w: torch.Tensor, fc2_b: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor,
                                                                                    torch.Tensor, torch.Tensor,
                                                                                    torch.Tensor, torch.Tensor]:
    fn = _fwd_triton if use_triton(x) else _fwd_torch
    return fn(x, rows, tile_expert, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b, eps)


@_move_ffn_fwd_op.register_fake
def _(x, rows, tile_expert, seg, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b, eps):
    m, hdim = rows.shape[0], fc1_w.shape[1]
    f32 = torch.float32
    return (torch.empty_like(x), x.new_empty(m, x.shape[1]), x.new_empty(m, dtype=f32), x.new_empty(m, dtype=f32),
            x.new_empty(m, hdim), x.new_empty(m, hdim))


@torch.library.custom_op("medst_fast::move_ffn_bwd", mutates_args=())
def _move_ffn_bwd_op(dout: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, tile_expert: torch.Tensor,
                     seg: torch.Tensor, ln_w: torch.Tensor, fc1_w: torch.Tensor, fc2_w: torch.Tensor,
                     h: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, z1: torch.Tensor,
                     g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                               torch.Tensor, torch.Tensor, torch.Tensor]:
    fn = _bwd_triton if use_triton(x) else _bwd_torch
    return fn(dout, x, rows, tile_expert, seg, ln_w, fc1_w, fc2_w, h, mean, rstd, z1, g)


@_move_ffn_bwd_op.register_fake
def _(dout, x, rows, tile_expert, seg, ln_w, fc1_w, fc2_w, h, mean, rstd, z1, g):
    f32 = torch.float32
    e, d, hdim = ln_w.shape[0], x.shape[1], fc1_w.shape[1]
    return (torch.empty_like(x), x.new_empty(e, d, dtype=f32), x.new_empty(e, d, dtype=f32),
            x.new_empty(e, hdim, d, dtype=f32), x.new_empty(e, hdim, dtype=f32), x.new_empty(e, d, hdim, dtype=f32),
            x.new_empty(e, d, dtype=f32))


def _setup(ctx, inputs, output):
    x, rows, tile_expert, seg, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b, eps = inputs
    _, h, mean, rstd, z1, g = output
    ctx.dtypes = (ln_w.dtype, ln_b.dtype, fc1_w.dtype, fc1_b.dtype, fc2_w.dtype, fc2_b.dtype)
    ctx.save_for_backward(x, rows, tile_expert, seg, ln_w, fc1_w, fc2_w, h, mean, rstd, z1, g)


def _backward(ctx, dout, *_unused):
    x, rows, tile_expert, seg, ln_w, fc1_w, fc2_w, h, mean, rstd, z1, g = ctx.saved_tensors
    dx, dlnw, dlnb, dw1, db1, dw2, db2 = _move_ffn_bwd_op(dout, x, rows, tile_expert, seg, ln_w, fc1_w, fc2_w, h,
                                                          mean, rstd, z1, g)
    grads = [t.to(dt) for t, dt in zip((dlnw, dlnb, dw1, db1, dw2, db2), ctx.dtypes)]
    return (dx, None, None, None, *grads, None)


_move_ffn_fwd_op.register_autograd(_backward, setup_context=_setup)


def move_ffn(x, view_id, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b, ln_eps: float = 1e-6,
             routing: Optional[MoveRouting] = None) -> torch.Tensor:
    """MoVE FFN with residual over a packed token buffer.

    Args:
        x: (N, D) tokens, any order.
        view_id: (N,) int, 0 = frontal (incl. CLS), 1 = lateral.
        ln_w, ln_b: (2, D) per-expert LayerNorm; fc1_w (2, H, D), fc1_b (2, H), fc2_w (2, D, H), fc2_b (2, D).
        ln_eps: LayerNorm epsilon (1e-6 in Med-ST's ViT).
        routing: :func:`build_routing(view_id)`, built once per forward and shared by the blocks; built here
            when omitted (Triton path only).

    Returns:
        (N, D) ``x + FFN_view(LN_view(x))`` with exact GELU.
    """
    if x.dim() != 2 or ln_w.shape != (N_EXPERTS, x.shape[1]) or fc1_w.dim() != 3 or fc1_w.shape[2] != x.shape[1]:
        raise ValueError(f"kernels/move_ffn.py: expected x (N, D), ln_w ({N_EXPERTS}, D), fc1_w ({N_EXPERTS}, H, D); "
                         f"got x {tuple(x.shape)}, ln_w {tuple(ln_w.shape)}, fc1_w {tuple(fc1_w.shape)}")
    if not use_triton(x):
        return move_ffn_ref(x, view_id, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b, ln_eps)
    if routing is None:
        routing = build_routing(view_id)
    args = [t.contiguous() for t in (x, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b)]
    return _move_ffn_fwd_op(args[0], routing.rows, routing.tile_expert, routing.seg, *args[1:], float(ln_eps))[0]


def move_ffn_slots(x, routing: MoveRouting, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b, ln_eps: float = 1e-6):
    """The custom op itself (Triton or its PyTorch slot-layout twin): for tests and torch.compile checks."""
    return _move_ffn_fwd_op(x, routing.rows, routing.tile_expert, routing.seg, ln_w, ln_b, fc1_w, fc1_b, fc2_w,
                            fc2_b, float(ln_eps))[0]
