"""Modality-weighted local alignment, one direction (medst-spec.md §2.2).

For each sample b, query tokens Q (words or patches) attend over context tokens C of the other modality:

    ctx_i   = sum_j softmax_j(q_i . c_j / tau) c_j              (context positions outside c_mask excluded)
    ctx_i   = normalize(ctx_i) if renorm_context                 (word side: yes; patch side: no)
    a_i     = normalize(q_i * ctx_i)
    abar    = mean_i a_i                                         (over q_mask rows)
    w_i     = softmax_i((Wq abar + bq) . (Wk a_i + bk) / sqrt(d))  (the learned 1-head MHA weights)
    S_im    = q_i . ctx_m / tau
    loss    = (1/B) sum_b sum_i w_i (CE(S_i,:, i) + CE(S_:,i, i)) / 2   (rows/cols outside q_mask excluded)

The word side is ``token_align_loss(W, P, ...)``, the patch side ``token_align_loss(P, W, ...)``.
``q_mask=None`` / ``c_mask=None`` mean "every token takes part" (the official semantics, spec §2.2 (b)-(c)).

``token_align_loss_ref`` is the plain PyTorch reference. ``token_align_loss`` dispatches to the fused
Triton implementation when it is available (see kernels/_utils.py), else to the reference.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ._utils import jit_kernel, next_pow2, use_triton


def token_align_loss_ref(
    q: torch.Tensor,
    c: torch.Tensor,
    q_mask: Optional[torch.Tensor],
    c_mask: Optional[torch.Tensor],
    in_proj_weight: torch.Tensor,
    in_proj_bias: torch.Tensor,
    tau: float = 0.1,
    renorm_context: bool = True,
) -> torch.Tensor:
    """Reference. q: (B, Tq, d), c: (B, Tc, d), masks (B, T) bool or None; MHA in_proj (3d, d), (3d,)."""
    with torch.autocast(q.device.type, enabled=False):  # fp32 maths even when called under autocast
        return _token_align_loss_ref(q, c, q_mask, c_mask, in_proj_weight, in_proj_bias, tau, renorm_context)


def _token_align_loss_ref(q, c, q_mask, c_mask, in_proj_weight, in_proj_bias, tau, renorm_context):
    B, Tq, d = q.shape
    neg = torch.finfo(torch.float32).min
    qf, cf = q.float(), c.float()
    s = torch.bmm(qf, cf.transpose(1, 2)) / tau  # (B, Tq, Tc)
    if c_mask is not None:
        s = s.masked_fill(~c_mask[:, None, :], float("-inf"))
    ctx = torch.bmm(torch.softmax(s, dim=-1), cf)
    if renorm_context:
        ctx = F.normalize(ctx, dim=-1)
    a = F.normalize(qf * ctx, dim=-1)
    if q_mask is None:
        abar = a.mean(dim=1)
    else:
        m = q_mask.to(a.dtype)
        abar = (a * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1.0)
    wq, wk = in_proj_weight[:d].float(), in_proj_weight[d:2 * d].float()
    bq, bk = in_proj_bias[:d].float(), in_proj_bias[d:2 * d].float()
    qq = abar @ wq.t() + bq  # (B, d)
    kk = a @ wk.t() + bk  # (B, Tq, d)
    logits = torch.einsum("bd,btd->bt", qq, kk) / math.sqrt(d)
    if q_mask is not None:
        logits = logits.masked_fill(~q_mask, float("-inf"))
    w = torch.softmax(logits, dim=-1)  # (B, Tq)
    S = torch.bmm(qf, ctx.transpose(1, 2)) / tau  # (B, Tq, Tq)
    if q_mask is not None:
        pair = q_mask[:, :, None] & q_mask[:, None, :]
        S = S.masked_fill(~pair, neg)
    diag = torch.diagonal(S, dim1=1, dim2=2)
    row_ce = torch.logsumexp(S, dim=2) - diag
    col_ce = torch.logsumexp(S, dim=1) - diag
    per = w * (row_ce + col_ce) / 2
    if q_mask is not None:
        per = per.masked_fill(~q_mask, 0.0)
    return per.sum() / B


# ----------------------------------------------------------------------------------------------------------
# Fused path. The only O(T x T) objects are score tiles that live in registers inside the kernels below. One
# generic op covers all three big products of the loss:
#     softmax_rows(x, y, y_mask, scale) -> (out = softmax(x y^T * scale) y, lse = logsumexp(x y^T * scale))
#   ctx           = softmax_rows(q,   c, c_mask).out      (token -> context attention, values = keys)
#   row logsumexp = softmax_rows(q, ctx, q_mask).lse      (rows of S = q ctx^T / tau)
#   col logsumexp = softmax_rows(ctx, q, q_mask).lse      (columns of S)
# The diagonal S_ii, the normalisations and the learned weighting are (B, Tq, d) / (B, Tq) PyTorch ops.
# Backward recomputes score tiles from the saved per-row logsumexp (flash-attention style):
#   dS_ij = P_ij (dout_i . y_j - delta_i),  delta_i = dout_i . out_i - dlse_i
#   dx_i  = scale sum_j dS_ij y_j,          dy_j = scale sum_i dS_ij x_i + sum_i P_ij dout_i
# ----------------------------------------------------------------------------------------------------------

tl = None  # bound to triton.language by _utils.jit_kernel on first launch (keeps Triton an optional import)


def _softmax_rows_fwd_kernel(X, Y, MASK, OUT, LSE, Tx, Ty, D, scale,
                             HAS_MASK: tl.constexpr, WITH_OUT: tl.constexpr, PREC: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    dmask = rd < D
    x = tl.load(X + b * Tx * D + rm[:, None] * D + rd[None, :], mask=(rm[:, None] < Tx) & dmask[None, :],
                other=0.0).to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, Ty, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        valid = rn < Ty
        if HAS_MASK:
            valid = valid & (tl.load(MASK + b * Ty + rn, mask=rn < Ty, other=0) != 0)
        y = tl.load(Y + b * Ty * D + rn[:, None] * D + rd[None, :], mask=valid[:, None] & dmask[None, :],
                    other=0.0).to(tl.float32)
        s = tl.dot(x, tl.trans(y), input_precision=PREC) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows that have seen no valid key yet keep m = -inf; shift by 0 instead so exp() gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if WITH_OUT:
            acc = acc * alpha[:, None] + tl.dot(p, y, input_precision=PREC)
        m_i = m_new
    lse = m_i + tl.log(l_i)
    tl.store(LSE + b * Tx + rm, lse, mask=rm < Tx)
    if WITH_OUT:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(OUT + b * Tx * D + rm[:, None] * D + rd[None, :], out, mask=(rm[:, None] < Tx) & dmask[None, :])


def _softmax_rows_bwd_dx_kernel(X, Y, MASK, LSE, DELTA, DOUT, DX, Tx, Ty, D, scale,
                                HAS_MASK: tl.constexpr, WITH_OUT: tl.constexpr, PREC: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    xmask = (rm[:, None] < Tx) & (rd[None, :] < D)
    x = tl.load(X + b * Tx * D + rm[:, None] * D + rd[None, :], mask=xmask, other=0.0).to(tl.float32)
    lse = tl.load(LSE + b * Tx + rm, mask=rm < Tx, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # a row with no valid key has P = 0, not NaN
    delta = tl.load(DELTA + b * Tx + rm, mask=rm < Tx, other=0.0)
    if WITH_OUT:
        do = tl.load(DOUT + b * Tx * D + rm[:, None] * D + rd[None, :], mask=xmask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, Ty, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        valid = rn < Ty
        if HAS_MASK:
            valid = valid & (tl.load(MASK + b * Ty + rn, mask=rn < Ty, other=0) != 0)
        y = tl.load(Y + b * Ty * D + rn[:, None] * D + rd[None, :], mask=valid[:, None] & (rd[None, :] < D),
                    other=0.0).to(tl.float32)
        s = tl.dot(x, tl.trans(y), input_precision=PREC) * scale
        p = tl.where(valid[None, :], tl.exp(s - lse[:, None]), 0.0)
        if WITH_OUT:
            ds = p * (tl.dot(do, tl.trans(y), input_precision=PREC) - delta[:, None])
        else:
            ds = p * (-delta[:, None])
        acc += tl.dot(ds, y, input_precision=PREC)
    tl.store(DX + b * Tx * D + rm[:, None] * D + rd[None, :], acc * scale, mask=xmask)


def _softmax_rows_bwd_dy_kernel(X, Y, MASK, LSE, DELTA, DOUT, DY, Tx, Ty, D, scale,
                                HAS_MASK: tl.constexpr, WITH_OUT: tl.constexpr, PREC: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per block of y rows (keys), looping over x rows: the transpose of the dx kernel, so both
    # gradients are written once without atomics.
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rd = tl.arange(0, BLOCK_D)
    valid = rn < Ty
    if HAS_MASK:
        valid = valid & (tl.load(MASK + b * Ty + rn, mask=rn < Ty, other=0) != 0)
    ymask = (rn[:, None] < Ty) & (rd[None, :] < D)
    y = tl.load(Y + b * Ty * D + rn[:, None] * D + rd[None, :], mask=ymask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for m0 in range(0, Tx, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        xmask = (rm[:, None] < Tx) & (rd[None, :] < D)
        x = tl.load(X + b * Tx * D + rm[:, None] * D + rd[None, :], mask=xmask, other=0.0).to(tl.float32)
        lse = tl.load(LSE + b * Tx + rm, mask=rm < Tx, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
        delta = tl.load(DELTA + b * Tx + rm, mask=rm < Tx, other=0.0)
        st = tl.dot(y, tl.trans(x), input_precision=PREC) * scale  # (BLOCK_N, BLOCK_M) = S^T tile
        pt = tl.where(valid[:, None], tl.exp(st - lse[None, :]), 0.0)
        if WITH_OUT:
            do = tl.load(DOUT + b * Tx * D + rm[:, None] * D + rd[None, :], mask=xmask, other=0.0).to(tl.float32)
            dst = pt * (tl.dot(y, tl.trans(do), input_precision=PREC) - delta[None, :])
            acc += tl.dot(pt, do, input_precision=PREC)
        else:
            dst = pt * (-delta[None, :])
        acc += tl.dot(dst, x, input_precision=PREC) * scale
    tl.store(DY + b * Ty * D + rn[:, None] * D + rd[None, :], acc, mask=ymask)


_BLOCK = 64


def _launch_cfg(x: torch.Tensor, y: torch.Tensor):
    d = x.shape[-1]
    block_d = max(16, next_pow2(d))
    # fp32 inputs get exact fp32 products (the 1e-5 tolerance); bf16/fp16 inputs are already rounded, so
    # TF32 adds less error than their own quantisation and runs on the tensor cores.
    prec = "ieee" if (x.dtype == torch.float32 and y.dtype == torch.float32) else "tf32"
    return block_d, prec


def _mask_arg(mask: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return like  # never read: HAS_MASK=False
    return mask.contiguous().view(torch.uint8)


def _softmax_rows_triton(x, y, y_mask, scale: float, with_out: bool):
    B, Tx, D = x.shape
    Ty = y.shape[1]
    x, y = x.contiguous(), y.contiguous()
    block_d, prec = _launch_cfg(x, y)
    lse = torch.empty(B, Tx, device=x.device, dtype=torch.float32)
    out = torch.empty(B, Tx, D, device=x.device, dtype=torch.float32) if with_out else lse
    grid = (triton_cdiv(Tx, _BLOCK), B)
    jit_kernel(_softmax_rows_fwd_kernel)[grid](
        x, y, _mask_arg(y_mask, x), out, lse, Tx, Ty, D, float(scale), HAS_MASK=y_mask is not None,
        WITH_OUT=with_out, PREC=prec, BLOCK_M=_BLOCK, BLOCK_N=_BLOCK, BLOCK_D=block_d)
    return (out if with_out else x.new_empty(0, dtype=torch.float32)), lse


def _softmax_rows_bwd_triton(x, y, y_mask, lse, delta, dout, scale: float, with_out: bool):
    B, Tx, D = x.shape
    Ty = y.shape[1]
    x, y = x.contiguous(), y.contiguous()
    block_d, prec = _launch_cfg(x, y)
    dx = torch.empty(B, Tx, D, device=x.device, dtype=torch.float32)
    dy = torch.empty(B, Ty, D, device=x.device, dtype=torch.float32)
    m = _mask_arg(y_mask, x)
    do = dout.contiguous() if with_out else x
    common = dict(HAS_MASK=y_mask is not None, WITH_OUT=with_out, PREC=prec, BLOCK_M=_BLOCK, BLOCK_N=_BLOCK,
                  BLOCK_D=block_d)
    jit_kernel(_softmax_rows_bwd_dx_kernel)[(triton_cdiv(Tx, _BLOCK), B)](
        x, y, m, lse, delta, do, dx, Tx, Ty, D, float(scale), **common)
    jit_kernel(_softmax_rows_bwd_dy_kernel)[(triton_cdiv(Ty, _BLOCK), B)](
        x, y, m, lse, delta, do, dy, Tx, Ty, D, float(scale), **common)
    return dx, dy


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def softmax_rows_ref(x, y, y_mask, scale: float, with_out: bool):
    """PyTorch reference of the op (also its CPU path). Builds the (B, Tx, Ty) scores."""
    s = torch.bmm(x.float(), y.float().transpose(1, 2)) * scale
    if y_mask is not None:
        s = s.masked_fill(~y_mask[:, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    out = torch.bmm(torch.softmax(s, dim=-1), y.float()) if with_out else x.new_empty(0, dtype=torch.float32)
    return out, lse


def _softmax_rows_bwd_ref(x, y, y_mask, lse, delta, dout, scale: float, with_out: bool):
    xf, yf = x.float(), y.float()
    s = torch.bmm(xf, yf.transpose(1, 2)) * scale
    p = torch.exp(s - torch.where(torch.isneginf(lse), torch.inf, lse)[..., None])
    if y_mask is not None:
        p = p.masked_fill(~y_mask[:, None, :], 0.0)
    dp = torch.bmm(dout.float(), yf.transpose(1, 2)) if with_out else torch.zeros_like(p)
    ds = p * (dp - delta[..., None])
    dx = torch.bmm(ds, yf) * scale
    dy = torch.bmm(ds.transpose(1, 2), xf) * scale
    if with_out:
        dy = dy + torch.bmm(p.transpose(1, 2), dout.float())
    return dx, dy


@torch.library.custom_op("medst_fast::softmax_rows", mutates_args=())
def _softmax_rows_op(x: torch.Tensor, y: torch.Tensor, y_mask: Optional[torch.Tensor], scale: float,
                     with_out: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x, y):
        return _softmax_rows_triton(x, y, y_mask, scale, with_out)
    return softmax_rows_ref(x, y, y_mask, scale, with_out)


@_softmax_rows_op.register_fake
def _(x, y, y_mask, scale, with_out):
    B, Tx, D = x.shape
    out = x.new_empty(B, Tx, D, dtype=torch.float32) if with_out else x.new_empty(0, dtype=torch.float32)
    return out, x.new_empty(B, Tx, dtype=torch.float32)


@torch.library.custom_op("medst_fast::softmax_rows_bwd", mutates_args=())
def _softmax_rows_bwd_op(x: torch.Tensor, y: torch.Tensor, y_mask: Optional[torch.Tensor], lse: torch.Tensor,
                         delta: torch.Tensor, dout: Optional[torch.Tensor], scale: float,
                         with_out: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x, y):
        return _softmax_rows_bwd_triton(x, y, y_mask, lse, delta, dout, scale, with_out)
    return _softmax_rows_bwd_ref(x, y, y_mask, lse, delta, dout, scale, with_out)


@_softmax_rows_bwd_op.register_fake
def _(x, y, y_mask, lse, delta, dout, scale, with_out):
    return x.new_empty(x.shape, dtype=torch.float32), y.new_empty(y.shape, dtype=torch.float32)


def _softmax_rows_setup(ctx, inputs, output):
    x, y, y_mask, scale, with_out = inputs
    out, lse = output
    ctx.scale, ctx.with_out, ctx.has_mask = scale, with_out, y_mask is not None
    # Saved: the inputs, the (B, Tx, d) output and the (B, Tx) logsumexp. Never the scores.
    ctx.save_for_backward(x, y, y_mask if y_mask is not None else x.new_empty(0), out, lse)


def _softmax_rows_backward(ctx, dout, dlse):
    x, y, y_mask, out, lse = ctx.saved_tensors
    y_mask = y_mask if ctx.has_mask else None
    delta = -dlse if dlse is not None else torch.zeros_like(lse)
    if ctx.with_out and dout is not None:
        delta = delta + (dout.float() * out).sum(-1)
        with_out = True
    else:
        dout, with_out = None, False
    dx, dy = _softmax_rows_bwd_op(x, y, y_mask, lse, delta.contiguous(), dout, ctx.scale, with_out)
    return dx.to(x.dtype), dy.to(y.dtype), None, None, None


_softmax_rows_op.register_autograd(_softmax_rows_backward, setup_context=_softmax_rows_setup)


def softmax_rows(x, y, y_mask, scale: float, with_out: bool = True):
    """``(softmax(x y^T * scale) y, logsumexp(x y^T * scale))`` per batch row, keys outside ``y_mask`` excluded.

    x: (B, Tx, d), y: (B, Ty, d), y_mask: (B, Ty) bool or None. Returns fp32 (B, Tx, d) (empty when
    ``with_out=False``) and fp32 (B, Tx). Differentiable in x and y; custom op ``medst_fast::softmax_rows``.
    """
    return _softmax_rows_op(x, y, y_mask, float(scale), bool(with_out))


def _token_align_loss_fused(q, c, q_mask, c_mask, in_proj_weight, in_proj_bias, tau: float = 0.1,
                            renorm_context: bool = True) -> torch.Tensor:
    """Same value and gradients as :func:`token_align_loss_ref`, with no (B, Tq, Tc) or (B, Tq, Tq) tensor."""
    B, Tq, d = q.shape
    scale = 1.0 / tau
    ctx, _ = softmax_rows(q, c, c_mask, scale, True)  # (B, Tq, d) fp32
    if renorm_context:
        ctx = F.normalize(ctx, dim=-1)
    qf = q.float()
    qc = qf * ctx
    a = F.normalize(qc, dim=-1)
    if q_mask is None:
        abar = a.mean(dim=1)
    else:
        m = q_mask.to(a.dtype)
        abar = (a * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1.0)
    wq, wk = in_proj_weight[:d].float(), in_proj_weight[d:2 * d].float()
    bq, bk = in_proj_bias[:d].float(), in_proj_bias[d:2 * d].float()
    # (Wq abar + bq) . (Wk a_i + bk) = a_i . (Wk^T qq) + bk . qq: never forms the (B, Tq, d) keys.
    qq = abar @ wq.t() + bq  # (B, d)
    logits = (torch.einsum("btd,bd->bt", a, qq @ wk) + (qq @ bk)[:, None]) / math.sqrt(d)
    if q_mask is not None:
        logits = logits.masked_fill(~q_mask, float("-inf"))
    w = torch.softmax(logits, dim=-1)  # (B, Tq)
    _, lse_row = softmax_rows(q, ctx, q_mask, scale, False)  # logsumexp over columns m of S_i,m
    _, lse_col = softmax_rows(ctx, q, q_mask, scale, False)  # logsumexp over rows i of S_i,m
    diag = qc.sum(-1) * scale  # S_ii
    per = w * (lse_row + lse_col - 2.0 * diag) / 2
    if q_mask is not None:
        per = per.masked_fill(~q_mask, 0.0)
    return per.sum() / B


def token_align_loss(q, c, q_mask, c_mask, in_proj_weight, in_proj_bias, tau: float = 0.1,
                     renorm_context: bool = True) -> torch.Tensor:
    """Dispatching entry point (fused Triton kernel where available, reference otherwise)."""
    if use_triton(q, c) and _triton_impl is not None:
        return _triton_impl(q, c, q_mask, c_mask, in_proj_weight, in_proj_bias, tau, renorm_context)
    return token_align_loss_ref(q, c, q_mask, c_mask, in_proj_weight, in_proj_bias, tau, renorm_context)


# The dispatch hook: token_align_loss routes here whenever use_triton() says the fused kernels can run.
_triton_impl = _token_align_loss_fused
