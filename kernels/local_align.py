"""Modality-weighted local alignment, one direction (docs/method.md §3.2).

For each sample b, query tokens Q (words or patches) attend over context tokens C of the other modality:

    ctx_i   = sum_j softmax_j(q_i . c_j / tau) c_j              (context positions outside c_mask excluded)
    ctx_i   = normalize(ctx_i) if renorm_context                 (word side: yes; patch side: no)
    a_i     = normalize(q_i * ctx_i)
    abar    = mean_i a_i                                         (over q_mask rows)
    w_i     = softmax_i((Wq abar + bq) . (Wk a_i + bk) / sqrt(d))  (the learned 1-head MHA weights)
    S_im    = q_i . ctx_m / tau
    loss    = (1/B) sum_b sum_i w_i (CE(S_i,:, i) + CE(S_:,i, i)) / 2   (rows/cols outside q_mask excluded)

The word side is ``token_align_loss(W, P, ...)``, the patch side ``token_align_loss(P, W, ...)``.
``q_mask=None`` / ``c_mask=None`` mean "every token takes part" (the official semantics, docs/method.md §6.1.1, §6.1.2).

``weighting="uniform"`` (a research switch, LossCfg.local_weighting) replaces the learned w_i by the plain
mean over the q_mask rows, w_i = 1 / #valid (1 / Tq without a mask): the control for "does the learned
weighting matter". The in_proj parameters then get zero gradients from the fused op (none from the reference).

``scope="batch"`` (LossCfg.local_scope) widens the pool a token's context is drawn from to the whole batch:
every report's words attend over every image's valid patches (and every patch over every report's words):

    ctx_{b,i} = sum_{b',j} softmax_{(b',j)}(q_{b,i} . c_{b',j} / tau) c_{b',j}   (all b', j with c_mask[b', j])

and everything after it (a_i, abar, w_i, S, both cross-entropies, the 1/B mean) is the per-sample loss
above, still contrasting the tokens of one sample. This is a true generalisation: restricting the softmax to
b' = b (a block-diagonal key mask) gives the per-sample loss exactly, and at B = 1 the two are the same.
It changes one thing only, where the context may come from; if the local loss learns which region of *its
own* image a word describes, widening the pool to other studies should cost accuracy. (The other reading,
one context per (token, image) pair with a cross-sample contrast, would change the contrast as well, which
the global ITA loss already does across studies, and needs B^2 T d contexts.) The fused path runs the
attention over the flattened batch, flash-style: memory stays O(B T d), no (B T, B T_c) score tensor exists.

``token_align_loss_ref`` is the plain PyTorch reference. ``token_align_loss`` dispatches to the fused
Triton implementation when it is available (see kernels/_utils.py), else to the reference.

Precision (``compute_dtype``): None or fp32 is exact fp32 (ieee products, the parity path). bf16 / fp16 make
the three big products (q c^T, P c, q ctx^T, and their backward products) take operands rounded to that
dtype, with fp32 accumulation, the probability tile P rounded for the P @ c product as flash attention does;
everything else (normalisations, the weighting softmax, logsumexps, cross-entropies) stays fp32. The inputs
stay fp32 and are cast as they are loaded inside the kernels: no extra (B, T, d) copies or cast launches,
and the elementwise parts read the unrounded values. The reference takes the same argument (its bmm
operands, forward and backward, rounded the same way), which is the baseline of the accuracy tests.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ._utils import (as_operand, check_compute_dtype, dot_precision, fp32_kind, interpreting, launch, next_pow2,
                     tl_dtype, triton_helper, use_triton)

tl = None  # bound to triton.language by _utils.jit_kernel on first launch (keeps Triton an optional import)

_EPS = 1e-12  # F.normalize's eps


_WEIGHTINGS = ("learned", "uniform")


def _uniform(weighting: str) -> bool:
    if weighting not in _WEIGHTINGS:
        raise ValueError(f"kernels/local_align.py: weighting must be one of {_WEIGHTINGS}, got {weighting!r}")
    return weighting == "uniform"


_SCOPES = ("sample", "batch")


def _batch_scope(scope: str) -> bool:
    if scope not in _SCOPES:
        raise ValueError(f"kernels/local_align.py: scope must be one of {_SCOPES}, got {scope!r}")
    return scope == "batch"


def _compute_dtype(compute_dtype: Optional[torch.dtype]) -> torch.dtype:
    return torch.float32 if compute_dtype is None else check_compute_dtype(compute_dtype, "kernels/local_align.py")


def _rounded(t: torch.Tensor, ct: torch.dtype) -> torch.Tensor:
    """fp32 ``t`` with its values rounded to ``ct`` (identity for fp32)."""
    return t if ct == torch.float32 else t.to(ct).float()


class _RoundedBmm(torch.autograd.Function):
    """bmm whose operands are rounded to the compute dtype, fp32 accumulation, forward and backward: what a
    bf16 tensor-core bmm computes (its fp32 output aside)."""

    @staticmethod
    def forward(ctx, a, b, ct):
        ctx.save_for_backward(a, b)
        ctx.ct = ct
        return torch.bmm(_rounded(a, ct), _rounded(b, ct))

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        g = _rounded(g, ctx.ct)
        return (torch.bmm(g, _rounded(b, ctx.ct).transpose(1, 2)), torch.bmm(_rounded(a, ctx.ct).transpose(1, 2), g),
                None)


def _bmm(a, b, ct):
    return torch.bmm(a, b) if ct == torch.float32 else _RoundedBmm.apply(a, b, ct)


def token_align_loss_ref(
    q: torch.Tensor,
    c: torch.Tensor,
    q_mask: Optional[torch.Tensor],
    c_mask: Optional[torch.Tensor],
    in_proj_weight: torch.Tensor,
    in_proj_bias: torch.Tensor,
    tau: float = 0.1,
    renorm_context: bool = True,
    compute_dtype: Optional[torch.dtype] = None,
    weighting: str = "learned",
    scope: str = "sample",
) -> torch.Tensor:
    """Reference. q: (B, Tq, d), c: (B, Tc, d), masks (B, T) bool or None; MHA in_proj (3d, d), (3d,).

    ``compute_dtype`` bf16/fp16 rounds the operands of its three bmm (and of their backward products).
    ``weighting``: "learned" (the paper's w_i) or "uniform"; ``scope``: "sample" (the paper's) or "batch"
    (see the module docstring). The batch scope builds the (B Tq, B Tc) scores."""
    ct = _compute_dtype(compute_dtype)
    uniform, batch = _uniform(weighting), _batch_scope(scope)
    with torch.autocast(q.device.type, enabled=False):  # fp32 maths even when called under autocast
        return _token_align_loss_ref(q, c, q_mask, c_mask, in_proj_weight, in_proj_bias, tau, renorm_context, ct,
                                     uniform, batch)


def _flat(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(B, T, ...) -> (1, B T, ...): the whole batch as one sample (the batch scope's attention)."""
    return None if t is None else t.reshape(1, t.shape[0] * t.shape[1], *t.shape[2:])


def _context_ref(qf, cf, c_mask, tau, ct):
    """sum_j softmax_j(q_i . c_j / tau) c_j per sample, keys outside c_mask excluded."""
    s = _bmm(qf, cf.transpose(1, 2), ct) / tau  # (B, Tq, Tc)
    if c_mask is not None:
        s = s.masked_fill(~c_mask[:, None, :], float("-inf"))
    return _bmm(torch.softmax(s, dim=-1), cf, ct)


def _uniform_weights(q, q_mask):
    """(B, Tq): 1 / #valid on the q_mask rows, 0 elsewhere (1 / Tq everywhere without a mask)."""
    if q_mask is None:
        return q.new_full(q.shape[:2], 1.0 / q.shape[1], dtype=torch.float32)
    m = q_mask.float()
    return m / m.sum(1, keepdim=True).clamp_min(1.0)


def _learned_weights(a, q_mask, in_proj_weight, in_proj_bias):
    """(B, Tq): the 1-head attention weights of abar (query) over the a_i (keys), docs/method.md §3.2.3."""
    d = a.shape[-1]
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
    return torch.softmax(logits, dim=-1)


def _token_align_loss_ref(q, c, q_mask, c_mask, in_proj_weight, in_proj_bias, tau, renorm_context, ct, uniform,
                          batch):
    B = q.shape[0]
    neg = torch.finfo(torch.float32).min
    qf, cf = q.float(), c.float()
    if batch:  # one softmax over the valid context tokens of every sample
        ctx = _context_ref(_flat(qf), _flat(cf), _flat(c_mask), tau, ct).reshape(qf.shape)
    else:
        ctx = _context_ref(qf, cf, c_mask, tau, ct)
    if renorm_context:
        ctx = F.normalize(ctx, dim=-1)
    a = F.normalize(qf * ctx, dim=-1)
    if uniform:
        w = _uniform_weights(q, q_mask)
    else:
        w = _learned_weights(a, q_mask, in_proj_weight, in_proj_bias)
    S = _bmm(qf, ctx.transpose(1, 2), ct) / tau  # (B, Tq, Tq)
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
# Fused path. No (B, Tq, Tc) or (B, Tq, Tq) tensor exists: score tiles live in registers. Forward, 4 launches:
#   _attn_fwd_kernel      ctx_raw = softmax(q c^T / tau) c, flash-style, over key splits (partials)
#   _attn_combine_kernel  merges the splits; per-row glue: ctx, a = normalize(q * ctx), sums of a for abar
#   _s_fwd_kernel         each tile of S = q ctx^T / tau once: row and column partial logsumexps, S_ii
#   _sample_kernel        per sample: abar, the learned weighting w, both logsumexps, the loss, and the
#                         gout = 1 backward of everything per-sample (all linear in gout)
# Backward, 3 launches (gout read on the device: no sync):
#   _s_bwd_kernel         through both logsumexps of S (rows: dq; columns: dctx, then the per-row glue)
#   _attn_bwd_kernel      the attention's backward from the saved logsumexp (dq and dc programs)
#   _param_grad_kernel    the in_proj gradients, summed over the batch
# The batch scope changes only the launches of the two attention kernels: one sample of B Tq query rows over
# B Tc keys (contiguous (B, T, d) tensors are already (1, B T, d) in memory); every other kernel stays per sample.
# ----------------------------------------------------------------------------------------------------------


def _attn_fwd_kernel(X, Y, MASK, OUT, LSE, Tx, Ty, D: tl.constexpr, scale, keys_per_split,
                     HAS_MASK: tl.constexpr, CT: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Online softmax(x y^T * scale) y for a block of x rows over the keys of one split.

    Partials of split s = program_id(0) // cdiv(Tx, BLOCK_M): OUT (S, B, Tx, D) holds
    sum_j exp(s_ij - m_i) y_j, LSE (S, B, 2, Tx) holds (m_i, l_i); _attn_combine_kernel merges the splits.
    Splitting the keys gives the word side (111 query rows) enough programs to fill the GPU.
    """
    n_m = tl.cdiv(Tx, BLOCK_M)
    pid_m = tl.program_id(0) % n_m
    split = tl.program_id(0) // n_m
    b = tl.program_id(1).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    xmask = (rm[:, None] < Tx) & (rd[None, :] < D)
    x_off = rm[:, None] * D + rd[None, :]  # int32 tile offsets from per-sample base pointers (fewer registers)
    Yb = Y + b * Ty * D
    x = as_operand(tl.load(X + b * Tx * D + x_off, mask=xmask, other=0.0), CT, INTERP)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k0 = split * keys_per_split
    k1 = tl.minimum(k0 + keys_per_split, Ty)
    for n0 in range(k0, k1, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        valid = rn < k1
        if HAS_MASK:
            valid = valid & (tl.load(MASK + b * Ty + rn, mask=rn < Ty, other=0) != 0)
        y = as_operand(tl.load(Yb + rn[:, None] * D + rd[None, :], mask=valid[:, None] & (rd[None, :] < D), other=0.0),
                       CT, INTERP)
        s = tl.dot(x, tl.trans(y), input_precision=PREC) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows that have seen no valid key yet keep m = -inf; shift by 0 instead so exp() gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        if CT == tl.float32:
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p, y, acc * alpha[:, None], input_precision=PREC)
        else:
            # Low-precision P: normalised within the key block before it is rounded, the block's product then
            # weighted in fp32. Rounding p relative to the running max instead (the largest entry exactly 1)
            # gives the loss 1.3-1.8x the error of PyTorch's rounded softmax (measured on the word side).
            mb = tl.max(s, 1)
            mb_safe = tl.where(mb == float("-inf"), 0.0, mb)
            p = tl.exp(s - mb_safe[:, None])
            lb = tl.sum(p, 1)
            wb = lb * tl.exp(mb_safe - m_safe)
            l_i = l_i * alpha + wb
            pn = as_operand(p / tl.where(lb > 0, lb, 1.0)[:, None], CT, INTERP)
            acc = acc * alpha[:, None] + tl.dot(pn, y, input_precision=PREC) * wb[:, None]
        m_i = m_new
    sb = split * tl.num_programs(1) + b
    tl.store(OUT + sb * Tx * D + x_off, acc, mask=xmask)
    tl.store(LSE + sb * 2 * Tx + rm, m_i, mask=rm < Tx)
    tl.store(LSE + sb * 2 * Tx + Tx + rm, l_i, mask=rm < Tx)


def _attn_bwd_kernel(X, Y, MASK, LSE, DELTA, DOUT, DX, DY, DXA, DXB, Tx, Ty, D: tl.constexpr, scale, lse_sb, delta_sb,
                     HAS_MASK: tl.constexpr, CT: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Backward of softmax(x y^T * scale) y and its logsumexp from the saved logsumexp (no score tensor):
        dS_ij = P_ij (dout_i . y_j - delta_i) * scale,   dx_i = sum_j dS_ij y_j,
        dy_j  = sum_i dS_ij x_i + P_ij dout_i,           delta_i = dout_i . out_i - dlse_i.
    Programs [0, cdiv(Tx, BLOCK_M)) write dx for a block of x rows, the rest dy for a block of keys, each
    looping over the other side: every gradient is written once, without atomics. LSE / DELTA of sample b
    start at b * lse_sb / b * delta_sb. dx also collects DXA + DXB (the loss's other dq terms).
    """
    n_x = tl.cdiv(Tx, BLOCK_M)
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rd = tl.arange(0, BLOCK_D)
    dm = rd < D
    # per-sample base pointers, int32 offsets within the sample (fewer registers than int64 tile offsets)
    Xb, Yb, DOb, MASKb = X + b * Tx * D, Y + b * Ty * D, DOUT + b * Tx * D, MASK + b * Ty
    LSEb, DELTAb = LSE + b * lse_sb, DELTA + b * delta_sb
    if pid < n_x:
        rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        xmask = (rm[:, None] < Tx) & dm[None, :]
        x_off = rm[:, None] * D + rd[None, :]
        x = as_operand(tl.load(Xb + x_off, mask=xmask, other=0.0), CT, INTERP)
        lse = tl.load(LSEb + rm, mask=rm < Tx, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse)  # a row with no valid key has P = 0, not NaN
        delta = tl.load(DELTAb + rm, mask=rm < Tx, other=0.0)
        do = as_operand(tl.load(DOb + x_off, mask=xmask, other=0.0), CT, INTERP)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for n0 in range(0, Ty, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            valid = rn < Ty
            if HAS_MASK:
                valid = valid & (tl.load(MASKb + rn, mask=rn < Ty, other=0) != 0)
            y = as_operand(tl.load(Yb + rn[:, None] * D + rd[None, :], mask=valid[:, None] & dm[None, :], other=0.0),
                           CT, INTERP)
            s = tl.dot(x, tl.trans(y), input_precision=PREC) * scale
            p = tl.where(valid[None, :], tl.exp(s - lse[:, None]), 0.0)
            ds = p * (tl.dot(do, tl.trans(y), input_precision=PREC) - delta[:, None])
            acc = tl.dot(as_operand(ds * scale, CT, INTERP), y, acc, input_precision=PREC)
        acc += tl.load(DXA + b * Tx * D + x_off, mask=xmask, other=0.0)
        acc += tl.load(DXB + b * Tx * D + x_off, mask=xmask, other=0.0)
        tl.store(DX + b * Tx * D + x_off, acc, mask=xmask)
    else:
        rn = (pid - n_x) * BLOCK_N + tl.arange(0, BLOCK_N)
        valid = rn < Ty
        if HAS_MASK:
            valid = valid & (tl.load(MASKb + rn, mask=rn < Ty, other=0) != 0)
        ymask = (rn[:, None] < Ty) & dm[None, :]
        y_off = rn[:, None] * D + rd[None, :]
        y = as_operand(tl.load(Yb + y_off, mask=ymask, other=0.0), CT, INTERP)
        acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for m0 in range(0, Tx, BLOCK_M):
            rm = m0 + tl.arange(0, BLOCK_M)
            xmask = (rm[:, None] < Tx) & dm[None, :]
            x_off = rm[:, None] * D + rd[None, :]
            x = as_operand(tl.load(Xb + x_off, mask=xmask, other=0.0), CT, INTERP)
            lse = tl.load(LSEb + rm, mask=rm < Tx, other=float("inf"))
            lse = tl.where(lse == float("-inf"), float("inf"), lse)
            delta = tl.load(DELTAb + rm, mask=rm < Tx, other=0.0)
            st = tl.dot(y, tl.trans(x), input_precision=PREC) * scale  # (BLOCK_N, BLOCK_M): the S^T tile
            pt = tl.where(valid[:, None], tl.exp(st - lse[None, :]), 0.0)
            do = as_operand(tl.load(DOb + x_off, mask=xmask, other=0.0), CT, INTERP)
            dst = pt * (tl.dot(y, tl.trans(do), input_precision=PREC) - delta[None, :])
            acc = tl.dot(as_operand(pt, CT, INTERP), do, acc, input_precision=PREC)
            acc = tl.dot(as_operand(dst * scale, CT, INTERP), x, acc, input_precision=PREC)
        tl.store(DY + b * Ty * D + y_off, acc, mask=ymask)


def _attn_combine_kernel(PACC, PML, Q, QMASK, CTX, A, ROWS, APART, Tq, D: tl.constexpr, n_split, pml_split, pml_b,
                         pml_l, HAS_QMASK: tl.constexpr, RENORM: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """Merge the key splits into ctx_raw (and its logsumexp), then the loss's per-row glue for a block of
    query rows: ctx = normalize(ctx_raw) if RENORM, qc = q * ctx, a = normalize(qc), and the block's sum of
    a over q_mask rows (for abar) into APART[b, block].
    ROWS (B, 8, Tq) gets: 0 lse1, 1 max(|ctx_raw|, eps) (1 if not RENORM), 2 max(|qc|, eps).
    The running max of split sp, sample b, row t is PML[sp * pml_split + b * pml_b + t], its sum pml_l
    further: (S, B, 2, Tq) for the per-sample attention, (S, 2, B Tq) for the batch scope's (one sample of
    B Tq rows); PACC is (S, B, Tq, D) in both."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    nbat = tl.num_programs(1)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    rmask = rm < Tq
    m2 = rmask[:, None] & (rd[None, :] < D)
    big_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    PMLb = PML + b * pml_b
    for sp in range(0, n_split):
        big_m = tl.maximum(big_m, tl.load(PMLb + sp * pml_split + rm, mask=rmask, other=float("-inf")))
    m_safe = tl.where(big_m == float("-inf"), 0.0, big_m)
    big_l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for sp in range(0, n_split):
        sb = sp * nbat + b
        f = tl.exp(tl.load(PMLb + sp * pml_split + rm, mask=rmask, other=float("-inf")) - m_safe)
        big_l += tl.load(PMLb + sp * pml_split + pml_l + rm, mask=rmask, other=0.0) * f
        acc += tl.load(PACC + (sb * Tq + rm[:, None]) * D + rd[None, :], mask=m2, other=0.0) * f[:, None]
    ctx = acc / tl.where(big_l > 0, big_l, 1.0)[:, None]
    lse1 = tl.where(big_l > 0, big_m + tl.log(tl.where(big_l > 0, big_l, 1.0)), float("-inf"))  # -inf: no key
    if RENORM:
        cn = tl.maximum(tl.sqrt(tl.sum(ctx * ctx, 1)), 1e-12)
        ctx = ctx / cn[:, None]
    else:
        cn = tl.full([BLOCK_M], 1.0, tl.float32)
    off = (b * Tq + rm[:, None]) * D + rd[None, :]
    qc = tl.load(Q + off, mask=m2, other=0.0).to(tl.float32) * ctx
    qn = tl.maximum(tl.sqrt(tl.sum(qc * qc, 1)), 1e-12)
    a = qc / qn[:, None]
    tl.store(CTX + off, ctx, mask=m2)
    tl.store(A + off, a, mask=m2)
    r = ROWS + b * 8 * Tq + rm
    tl.store(r, lse1, mask=rmask)
    tl.store(r + Tq, cn, mask=rmask)
    tl.store(r + 2 * Tq, qn, mask=rmask)
    valid = rmask
    if HAS_QMASK:
        valid = valid & (tl.load(QMASK + b * Tq + rm, mask=rmask, other=0) != 0)
    tl.store(APART + (b * tl.num_programs(0) + pid) * D + rd, tl.sum(tl.where(valid[:, None], a, 0.0), 0),
             mask=rd < D)


def _s_fwd_kernel(Q, CTX, QMASK, ROWS, RSTAT, CSTAT, Tq, D: tl.constexpr, scale,
                  HAS_QMASK: tl.constexpr, CT: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr,
                  BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """One tile (row block i, column block m) of S = q ctx^T * scale, pairs outside q_mask excluded: its row
    partials (max, sum exp) go to RSTAT (B, nb, 2, Tq) at [b, m], its column partials to CSTAT at [b, i].
    _sample_kernel merges them into the row and the column logsumexps: S is computed once. The diagonal
    tiles also write S_ii (ROWS row 7): taken from the same products, its rounding cancels in lse - S_ii."""
    nb = tl.cdiv(Tq, BLOCK)
    bi = tl.program_id(0) // nb
    bm = tl.program_id(0) % nb
    b = tl.program_id(1).to(tl.int64)
    ri = bi * BLOCK + tl.arange(0, BLOCK)
    rj = bm * BLOCK + tl.arange(0, BLOCK)
    rd = tl.arange(0, BLOCK_D)
    vi = ri < Tq
    vj = rj < Tq
    if HAS_QMASK:
        vi = vi & (tl.load(QMASK + b * Tq + ri, mask=ri < Tq, other=0) != 0)
        vj = vj & (tl.load(QMASK + b * Tq + rj, mask=rj < Tq, other=0) != 0)
    q = as_operand(tl.load(Q + b * Tq * D + ri[:, None] * D + rd[None, :], mask=(ri < Tq)[:, None] & (rd < D)[None, :],
                           other=0.0), CT, INTERP)
    c = as_operand(tl.load(CTX + b * Tq * D + rj[:, None] * D + rd[None, :],
                           mask=(rj < Tq)[:, None] & (rd < D)[None, :], other=0.0), CT, INTERP)
    s = tl.dot(q, tl.trans(c), input_precision=PREC) * scale
    if bi == bm:
        tl.store(ROWS + (b * 8 + 7) * Tq + ri, tl.sum(tl.where(ri[:, None] == rj[None, :], s, 0.0), 1), mask=ri < Tq)
    s = tl.where(vi[:, None] & vj[None, :], s, float("-inf"))
    r_max = tl.max(s, 1)
    r_sum = tl.sum(tl.exp(s - tl.where(r_max == float("-inf"), 0.0, r_max)[:, None]), 1)
    c_max = tl.max(s, 0)
    c_sum = tl.sum(tl.exp(s - tl.where(c_max == float("-inf"), 0.0, c_max)[None, :]), 0)
    r = RSTAT + ((b * nb + bm) * 2) * Tq + ri
    tl.store(r, r_max, mask=ri < Tq)
    tl.store(r + Tq, r_sum, mask=ri < Tq)
    cc = CSTAT + ((b * nb + bi) * 2) * Tq + rj
    tl.store(cc, c_max, mask=rj < Tq)
    tl.store(cc + Tq, c_sum, mask=rj < Tq)


@triton_helper
def _merge_lse(STAT, b, nb, Tq, t, tm, BLOCK_T: tl.constexpr):
    """logsumexp over the nb partials (max, sum) of STAT (B, nb, 2, Tq) for the positions t of sample b."""
    big_m = tl.full([BLOCK_T], float("-inf"), tl.float32)
    for k in range(0, nb):
        big_m = tl.maximum(big_m, tl.load(STAT + ((b * nb + k) * 2) * Tq + t, mask=tm, other=float("-inf")))
    m_safe = tl.where(big_m == float("-inf"), 0.0, big_m)
    total = tl.zeros([BLOCK_T], tl.float32)
    for k in range(0, nb):
        p = STAT + ((b * nb + k) * 2) * Tq + t
        total += tl.load(p + Tq, mask=tm, other=0.0) * tl.exp(tl.load(p, mask=tm, other=float("-inf")) - m_safe)
    return tl.where(total > 0, m_safe + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))


def _sample_kernel(A, APART, QMASK, ROWS, RSTAT, CSTAT, INW, INB, VECS, DCST, LOSSB, Tq, D: tl.constexpr, n_apart, nb, inv_b,
                   inv_sqrt_d, HAS_QMASK: tl.constexpr, UNIFORM: tl.constexpr, BLOCK_T: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
    """Everything per sample b (one program): abar, qq = Wq abar + bq, u = Wk^T qq, the weighting logits
    (a_i . u + bk . qq) / sqrt(d) and softmax w, both logsumexps of S, and the loss term
    sum_i w_i (lse_row_i + lse_col_i - 2 S_ii) / 2 / B. Then, for gout = 1 (backward scales by gout):
    ROWS 3 lse_row, 4 lse_col, 5 g = w / (2B) (the loss's derivative in lse_row_i and lse_col_i), 6 dlogit;
    VECS (B, 6, d): 0 u, 1 dabar / cnt, 2 abar, 3 qq, 4 du, 5 dqq; DCST the derivative in bk . qq.
    UNIFORM: w = 1 / cnt on the valid rows and dlogit = 0, so every weighting gradient below (du, dqq,
    dabar, dcst) and the in_proj gradients come out exactly 0; the backward kernels run unchanged."""
    b = tl.program_id(0).to(tl.int64)
    t = tl.arange(0, BLOCK_T)
    tm = t < Tq
    valid = tm
    if HAS_QMASK:
        valid = valid & (tl.load(QMASK + b * Tq + t, mask=tm, other=0) != 0)
    cnt = tl.maximum(tl.sum(valid.to(tl.float32), 0), 1.0)
    j = tl.arange(0, BLOCK_D)
    jm = j < D
    pp = tl.arange(0, BLOCK_P)
    vec = VECS + b * 6 * D
    qq = tl.load(INB + j, mask=jm, other=0.0).to(tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < D
        part = tl.load(APART + (b * n_apart + pp[:, None]) * D + k[None, :], mask=(pp < n_apart)[:, None] & km[None, :],
                       other=0.0)
        abar_k = tl.sum(part, 0) / cnt
        tl.store(vec + 2 * D + k, abar_k, mask=km)
        wq = tl.load(INW + j[:, None] * D + k[None, :], mask=jm[:, None] & km[None, :], other=0.0).to(tl.float32)
        qq += tl.sum(wq * abar_k[None, :], 1)
    tl.store(vec + 3 * D + j, qq, mask=jm)
    bk = tl.load(INB + D + j, mask=jm, other=0.0).to(tl.float32)
    logits = tl.zeros([BLOCK_T], tl.float32) + tl.sum(bk * qq, 0)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < D
        wk = tl.load(INW + (D + j[:, None]) * D + k[None, :], mask=jm[:, None] & km[None, :], other=0.0).to(tl.float32)
        u_k = tl.sum(wk * qq[:, None], 0)
        tl.store(vec + k, u_k, mask=km)
        a = tl.load(A + (b * Tq + t[:, None]) * D + k[None, :], mask=tm[:, None] & km[None, :], other=0.0)
        logits += tl.sum(a * u_k[None, :], 1)
    logits = tl.where(valid, logits * inv_sqrt_d, float("-inf"))
    mx = tl.max(logits, 0)
    ex = tl.where(valid, tl.exp(logits - tl.where(mx == float("-inf"), 0.0, mx)), 0.0)
    w = ex / tl.maximum(tl.sum(ex, 0), 1e-30)
    if UNIFORM:
        w = tl.where(valid, 1.0 / cnt, 0.0)
    rows = ROWS + b * 8 * Tq + t
    # rows outside q_mask get +inf logsumexps: exp(S - lse) = 0 marks them for _s_bwd_kernel without the mask
    lse_row = tl.where(valid, _merge_lse(RSTAT, b, nb, Tq, t, tm, BLOCK_T), float("inf"))
    lse_col = tl.where(valid, _merge_lse(CSTAT, b, nb, Tq, t, tm, BLOCK_T), float("inf"))
    e_i = tl.where(valid, (lse_row + lse_col - 2.0 * tl.load(rows + 7 * Tq, mask=tm, other=0.0)) * 0.5, 0.0)
    w = tl.where(valid, w, 0.0)
    tl.store(LOSSB + b, tl.sum(w * e_i, 0) * inv_b)
    dw = e_i * inv_b
    dlog = tl.where(valid, w * (dw - tl.sum(w * dw, 0)), 0.0) * inv_sqrt_d
    if UNIFORM:
        dlog = tl.zeros([BLOCK_T], tl.float32)  # w does not depend on the logits
    tl.store(rows + 3 * Tq, lse_row, mask=tm)
    tl.store(rows + 4 * Tq, lse_col, mask=tm)
    tl.store(rows + 5 * Tq, w * (0.5 * inv_b), mask=tm)
    tl.store(rows + 6 * Tq, dlog, mask=tm)
    dcst = tl.sum(dlog, 0)
    dqq = bk * dcst
    for k0 in range(0, D, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < D
        a = tl.load(A + (b * Tq + t[:, None]) * D + k[None, :], mask=tm[:, None] & km[None, :], other=0.0)
        du_k = tl.sum(a * dlog[:, None], 0)
        tl.store(vec + 4 * D + k, du_k, mask=km)
        wk = tl.load(INW + (D + j[:, None]) * D + k[None, :], mask=jm[:, None] & km[None, :], other=0.0).to(tl.float32)
        dqq += tl.sum(wk * du_k[None, :], 1)
    tl.store(vec + 5 * D + j, dqq, mask=jm)
    tl.store(DCST + b, dcst)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < D
        wq = tl.load(INW + j[:, None] * D + k[None, :], mask=jm[:, None] & km[None, :], other=0.0).to(tl.float32)
        tl.store(vec + D + k, tl.sum(wq * dqq[:, None], 0) / cnt, mask=km)


@triton_helper
def _g_block_times(x, l_own, g_own, r0, Y, L_OTHER, G_OTHER, gam, Tq, D: tl.constexpr, rd, dm, scale,
                   CT: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr, BLOCK: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    """scale * sum over the other side's blocks of G(own rows, other rows) @ y, for _s_bwd_kernel.

    G is symmetric in its two sides (see _s_bwd_kernel), so one body serves the row programs (own = q, other =
    ctx: the G tiles) and the column programs (own = ctx, other = q: the G^T tiles). ``l_own`` / ``g_own`` are
    the own rows' logsumexps and weights, L_OTHER / G_OTHER the other side's (pointers into ROWS)."""
    f_own = (l_own < float("inf")).to(tl.float32)
    acc = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    for j0 in range(0, Tq, BLOCK):
        rj = j0 + tl.arange(0, BLOCK)
        y = as_operand(tl.load(Y + rj[:, None] * D + rd[None, :], mask=(rj < Tq)[:, None] & dm[None, :], other=0.0),
                       CT, INTERP)
        l_oth = tl.load(L_OTHER + rj, mask=rj < Tq, other=float("inf"))
        f_oth = (l_oth < float("inf")).to(tl.float32)
        g_oth = gam * tl.load(G_OTHER + rj, mask=rj < Tq, other=0.0)
        s = tl.dot(x, tl.trans(y), input_precision=PREC) * scale
        g = (g_own[:, None] * tl.exp(s - l_own[:, None])) * f_oth[None, :] + \
            (g_oth[None, :] * tl.exp(s - l_oth[None, :])) * f_own[:, None]
        g = tl.where(r0[:, None] == rj[None, :], g - 2.0 * g_own[:, None], g)  # the -2 S_ii term, see the kernel
        acc = tl.dot(as_operand(g * scale, CT, INTERP), y, acc, input_precision=PREC)
    return acc


def _s_bwd_kernel(Q, CTX, A, ROWS, VECS, GOUT, DQS, DQG, DCTXR, DELTA, Tq, D: tl.constexpr, scale,
                  RENORM: tl.constexpr, CT: tl.constexpr, PREC: tl.constexpr,
                  INTERP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Backward through S (both logsumexps and the -2 S_ii term), then the per-row glue. With g_i = gout w_i / 2B:
        G_im = g_i exp(S_im - lse_row_i) + g_m exp(S_im - lse_col_m) - 2 g_i [i = m]      (valid pairs only)
    The diagonal term is added before G is rounded for the product: G_ii nearly cancels (S_ii dominates its
    row and column), and rounding the two large parts separately would cost bf16 accuracy in dq and dc. Rows
    outside q_mask carry g = 0 and +inf logsumexps, so the pair mask is f_i f_m with f = [lse < inf]: no mask
    loads, and fewer live tiles (this kernel is the one closest to the register limit).
    Programs [0, nb): DQS = scale * G ctx for a block of rows i (loop over m). Programs [nb, 2 nb): scale *
    G^T q for a block m (loop over i), then the glue of rows m through a = normalize(q * ctx) (weighting
    logits and abar) and ctx = normalize(ctx_raw): DQG (the direct dq terms), DCTXR (the
    gradient of the attention output ctx_raw) and DELTA = DCTXR . ctx_raw for the attention backward."""
    nb = tl.cdiv(Tq, BLOCK)
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    gam = tl.load(GOUT).to(tl.float32)
    rd = tl.arange(0, BLOCK_D)
    dm = rd < D
    rows = ROWS + b * 8 * Tq
    Qb, Cb = Q + b * Tq * D, CTX + b * Tq * D  # per-sample bases, int32 offsets below
    # this program's block of rows (i for the row programs, m for the column programs)
    r0 = tl.arange(0, BLOCK) + (pid if pid < nb else pid - nb) * BLOCK
    off0 = r0[:, None] * D + rd[None, :]
    m0_ = (r0 < Tq)[:, None] & dm[None, :]
    if pid < nb:
        q = as_operand(tl.load(Qb + off0, mask=m0_, other=0.0), CT, INTERP)
        lr = tl.load(rows + 3 * Tq + r0, mask=r0 < Tq, other=float("inf"))
        gi = gam * tl.load(rows + 5 * Tq + r0, mask=r0 < Tq, other=0.0)
        acc = _g_block_times(q, lr, gi, r0, Cb, rows + 4 * Tq, rows + 5 * Tq, gam, Tq, D, rd, dm, scale,
                             CT, PREC, INTERP, BLOCK, BLOCK_D)
        tl.store(DQS + b * Tq * D + off0, acc, mask=m0_)
    else:
        c = as_operand(tl.load(Cb + off0, mask=m0_, other=0.0), CT, INTERP)
        lc = tl.load(rows + 4 * Tq + r0, mask=r0 < Tq, other=float("inf"))
        fj = (lc < float("inf")).to(tl.float32)
        gj = gam * tl.load(rows + 5 * Tq + r0, mask=r0 < Tq, other=0.0)
        acc = _g_block_times(c, lc, gj, r0, Qb, rows + 3 * Tq, rows + 5 * Tq, gam, Tq, D, rd, dm, scale,
                             CT, PREC, INTERP, BLOCK, BLOCK_D)  # the S^T tiles: (m, i)
        # the glue of rows m, in fp32; each tile loaded where it is used, to keep few of them live
        dlog = tl.load(rows + 6 * Tq + r0, mask=r0 < Tq, other=0.0)
        u = tl.load(VECS + b * 6 * D + rd, mask=dm, other=0.0)
        dab = tl.load(VECS + b * 6 * D + D + rd, mask=dm, other=0.0)
        da = gam * (dlog[:, None] * u[None, :] + fj[:, None] * dab[None, :])
        # normalize backward: (dy - y (y . dy)) / max(|x|, eps), the projection dropped where the norm clamps
        a = tl.load(A + b * Tq * D + off0, mask=m0_, other=0.0)
        qn = tl.load(rows + 2 * Tq + r0, mask=r0 < Tq, other=1.0)
        ad = tl.where(qn > 1e-12, tl.sum(a * da, 1), 0.0)
        dqc = (da - a * ad[:, None]) / qn[:, None]
        cf = tl.load(Cb + off0, mask=m0_, other=0.0)
        tl.store(DQG + b * Tq * D + off0, dqc * cf, mask=m0_)
        dctx = acc + dqc * tl.load(Qb + off0, mask=m0_, other=0.0).to(tl.float32)
        if RENORM:
            cn = tl.load(rows + Tq + r0, mask=r0 < Tq, other=1.0)
            cd = tl.where(cn > 1e-12, tl.sum(cf * dctx, 1), 0.0)
            dctx = (dctx - cf * cd[:, None]) / cn[:, None]
            delta = tl.sum(dctx * cf, 1) * cn  # ctx_raw = ctx * max(|ctx_raw|, eps)
        else:
            delta = tl.sum(dctx * cf, 1)
        tl.store(DCTXR + b * Tq * D + off0, dctx, mask=m0_)
        tl.store(DELTA + b * Tq + r0, delta, mask=r0 < Tq)


def _param_grad_kernel(VECS, DCST, GOUT, DW, DB, n_batch, D: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_B: tl.constexpr):
    """The MHA in_proj gradients, summed over the batch (rows [2d, 3d), the value projection, get zeros):
    dWq = sum_b dqq_b abar_b^T, dbq = sum_b dqq_b; dWk = sum_b qq_b du_b^T, dbk = sum_b dcst_b qq_b; x gout.
    Program (part, row block): part 0 the q rows, 1 the k rows, 2 the v rows."""
    part = tl.program_id(0)
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    jm = j < D
    k = tl.arange(0, BLOCK_D)
    km = k < D
    acc = tl.zeros([BLOCK_J, BLOCK_D], tl.float32)
    db = tl.zeros([BLOCK_J], tl.float32)
    if part < 2:
        xs = 5 - 2 * part  # dqq for the q rows, qq for the k rows
        ys = 2 + 2 * part  # abar, du
        for b0 in range(0, n_batch, BLOCK_B):
            bb = b0 + tl.arange(0, BLOCK_B)
            bm = bb < n_batch
            x = tl.load(VECS + (bb[:, None] * 6 + xs) * D + j[None, :], mask=bm[:, None] & jm[None, :], other=0.0)
            y = tl.load(VECS + (bb[:, None] * 6 + ys) * D + k[None, :], mask=bm[:, None] & km[None, :], other=0.0)
            acc = tl.dot(tl.trans(x), y, acc, input_precision="ieee")
            wb = tl.load(DCST + bb, mask=bm & (part == 1), other=1.0)  # bias weights: 1 (q rows), dcst (k rows)
            db += tl.sum(x * wb[:, None], 0)
    gam = tl.load(GOUT).to(tl.float32)
    tl.store(DW + (part * D + j[:, None]) * D + k[None, :], acc * gam, mask=jm[:, None] & km[None, :])
    tl.store(DB + part * D + j, db * gam, mask=jm)


# ---------------------------------------------------------------------------------------------- launchers
class _Tiles(NamedTuple):
    block_m: int  # query rows per attention program; also the side of an S tile
    block_n: int  # keys per step
    launch: dict  # kernel -> (num_warps, num_stages)


# bf16/fp16: 64-row tiles, the smallest wgmma M (one warpgroup, m64); the backward kernels (four products per
# step, two roles) on 8 warps. Exact fp32 (ieee FMA products): 16 x 16 tiles, which hold the operand slices of
# the d = 128 reductions in registers. Warps and stages per kernel as the sm_90 compile (ptxas -v) shows no
# spill (tests/test_sm90_compile.py). The interpreter runs one fixed 32 x 32 config (tile-size independent
# code; bigger numpy tiles run faster).
_TILES = {
    "mma": _Tiles(64, 64, {"attn_fwd": (4, 2), "attn_bwd": (8, 2), "s_fwd": (4, 2), "s_bwd": (8, 2)}),
    "fp32": _Tiles(16, 16, {"attn_fwd": (8, 1), "attn_bwd": (8, 1), "s_fwd": (4, 1), "s_bwd": (8, 1)}),
    "interp": _Tiles(32, 32, {k: (4, 1) for k in ("attn_fwd", "attn_bwd", "s_fwd", "s_bwd")}),
    # fp32 operands on the tensor cores (TF32, torch.get_float32_matmul_precision() 'high'/'medium'): the mma
    # tiles (wgmma m64) with one stage, as each fp32 operand tile takes twice the bytes of a bf16 one. Square
    # like every family: the backward kernel walks both sides with one accumulator, so a 64 x 32 tile does not
    # compile for a GPU (the interpreter, which does not type-check the branches, accepted it); the sm_90
    # compile check covers this family (tests/test_sm90_compile.py::tf32_launches). Its two backward kernels
    # spill (272-976 bytes at ViT-B shapes, triton 3.8: fp32 operand tiles fill the registers; 16 warps spill
    # more); what that costs on a GPU is not measured yet.
    "tf32": _Tiles(64, 64, {"attn_fwd": (4, 1), "attn_bwd": (8, 1), "s_fwd": (4, 1), "s_bwd": (8, 1)}),
}
_FILL_PROGRAMS = 264  # 2 x 132 SMs (H100 / H200): split the keys until the attention has this many programs
_GLUE_ROWS = 32  # rows per program of the elementwise combine kernel


def _tiles(ct: torch.dtype) -> _Tiles:
    kind = fp32_kind(ct)
    if kind == "tf32":
        return _TILES["tf32"]
    return _TILES["interp"] if interpreting() else _TILES[kind]


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _mask_arg(mask: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return like  # never read: HAS_MASK=False
    return mask.contiguous().view(torch.uint8)


def _kw(ct: torch.dtype, d: int, cfg: _Tiles, kernel: str) -> dict:
    warps, stages = cfg.launch[kernel]
    return dict(CT=tl_dtype(ct), PREC=dot_precision(ct), INTERP=interpreting(), BLOCK_D=max(16, next_pow2(d)),
                num_warps=warps, num_stages=stages)


def _attention_split_fwd(q, c, cm, has_cmask: bool, scale: float, ct: torch.dtype, cfg: _Tiles, batch: bool):
    """The attention's key-split partials (pacc (S, B, Tq, d), pml) and pml's strides (split, sample, sum).

    The batch scope runs it as one sample of B Tq query rows over B Tc keys: q, c and the key mask are
    contiguous, so (B, T, d) is already (1, B T, d) in memory, and the partials keep pacc's layout."""
    B, Tq, d = q.shape
    Tc = c.shape[1]
    nb_, tx, ty = (1, B * Tq, B * Tc) if batch else (B, Tq, Tc)
    n_m, n_kb = triton_cdiv(tx, cfg.block_m), triton_cdiv(ty, cfg.block_n)
    per_split = triton_cdiv(n_kb, max(1, min(n_kb, triton_cdiv(_FILL_PROGRAMS, n_m * nb_)))) * cfg.block_n
    n_split = triton_cdiv(ty, per_split)
    pacc = torch.empty(n_split, B, Tq, d, device=q.device, dtype=torch.float32)
    pml = torch.empty(n_split, nb_, 2, tx, device=q.device, dtype=torch.float32)
    launch(_attn_fwd_kernel, (n_m * n_split, nb_), q, c, cm, pacc, pml, tx, ty, d, scale, per_split,
           HAS_MASK=has_cmask, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
           **_kw(ct, d, cfg, "attn_fwd"))
    strides = (2 * B * Tq, Tq, B * Tq) if batch else (2 * B * Tq, 2 * Tq, Tq)
    return pacc, pml, n_split, strides


def _loss_fwd_triton(q, c, q_mask, c_mask, in_w, in_b, tau: float, renorm: bool, ct: torch.dtype,
                     uniform: bool = False, batch: bool = False):
    B, Tq, d = q.shape
    dev, f32 = q.device, torch.float32
    q, c = q.contiguous(), c.contiguous()
    in_w, in_b = in_w.contiguous(), in_b.contiguous()
    cfg, scale = _tiles(ct), 1.0 / tau
    qm, cm = _mask_arg(q_mask, q), _mask_arg(c_mask, q)
    # attention over key splits, then the merge + per-row glue
    pacc, pml, n_split, pml_strides = _attention_split_fwd(q, c, cm, c_mask is not None, scale, ct, cfg, batch)
    ctx = torch.empty(B, Tq, d, device=dev, dtype=f32)
    a = torch.empty(B, Tq, d, device=dev, dtype=f32)
    rows = torch.empty(B, 8, Tq, device=dev, dtype=f32)
    n_ap = triton_cdiv(Tq, _GLUE_ROWS)
    apart = torch.empty(B, n_ap, d, device=dev, dtype=f32)
    launch(_attn_combine_kernel, (n_ap, B), pacc, pml, q, qm, ctx, a, rows, apart, Tq, d, n_split, *pml_strides,
           HAS_QMASK=q_mask is not None, RENORM=renorm, BLOCK_M=_GLUE_ROWS, BLOCK_D=max(16, next_pow2(d)))
    # S = q ctx^T / tau, once, tile by tile
    nb = triton_cdiv(Tq, cfg.block_m)
    rstat = torch.empty(B, nb, 2, Tq, device=dev, dtype=f32)
    cstat = torch.empty(B, nb, 2, Tq, device=dev, dtype=f32)
    launch(_s_fwd_kernel, (nb * nb, B), q, ctx, qm, rows, rstat, cstat, Tq, d, scale, HAS_QMASK=q_mask is not None,
           BLOCK=cfg.block_m, **_kw(ct, d, cfg, "s_fwd"))
    vecs = torch.empty(B, 6, d, device=dev, dtype=f32)
    dcst = torch.empty(B, device=dev, dtype=f32)
    loss_b = torch.empty(B, device=dev, dtype=f32)
    launch(_sample_kernel, (B,), a, apart, qm, rows, rstat, cstat, in_w, in_b, vecs, dcst, loss_b, Tq, d, n_ap, nb,
           1.0 / B, 1.0 / math.sqrt(d), HAS_QMASK=q_mask is not None, UNIFORM=uniform, BLOCK_T=max(16, next_pow2(Tq)),
           BLOCK_D=max(16, next_pow2(d)), BLOCK_K=16, BLOCK_P=max(2, next_pow2(n_ap)), num_warps=8)
    return loss_b.sum(), ctx, a, rows, vecs, dcst


def _loss_bwd_triton(gout, q, c, q_mask, c_mask, in_w, ctx, a, rows, vecs, dcst, tau: float, renorm: bool,
                     ct: torch.dtype, batch: bool = False):
    B, Tq, d = q.shape
    Tc = c.shape[1]
    dev, f32 = q.device, torch.float32
    q, c = q.contiguous(), c.contiguous()
    cfg, scale = _tiles(ct), 1.0 / tau
    qm, cm = _mask_arg(q_mask, q), _mask_arg(c_mask, q)
    gout = gout.float().contiguous()
    nb = triton_cdiv(Tq, cfg.block_m)
    dqs, dqg, dctxr = (torch.empty(B, Tq, d, device=dev, dtype=f32) for _ in range(3))
    delta = torch.empty(B, Tq, device=dev, dtype=f32)
    launch(_s_bwd_kernel, (2 * nb, B), q, ctx, a, rows, vecs, gout, dqs, dqg, dctxr, delta, Tq, d, scale,
           RENORM=renorm, BLOCK=cfg.block_m, **_kw(ct, d, cfg, "s_bwd"))
    dq = torch.empty(B, Tq, d, device=dev, dtype=f32)
    dc = torch.empty(B, Tc, d, device=dev, dtype=f32)
    if batch:
        # one sample of B Tq rows over B Tc keys (see _attention_split_fwd); its logsumexps contiguous
        nb_, tx, ty, lse, lse_sb = 1, B * Tq, B * Tc, rows[:, 0].contiguous(), B * Tq
    else:
        nb_, tx, ty, lse, lse_sb = B, Tq, Tc, rows, 8 * Tq
    grid = (triton_cdiv(tx, cfg.block_m) + triton_cdiv(ty, cfg.block_n), nb_)
    launch(_attn_bwd_kernel, grid, q, c, cm, lse, delta, dctxr, dq, dc, dqs, dqg, tx, ty, d, scale, lse_sb, tx,
           HAS_MASK=c_mask is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
           **_kw(ct, d, cfg, "attn_bwd"))
    dw = torch.empty(3 * d, d, device=dev, dtype=f32)
    db = torch.empty(3 * d, device=dev, dtype=f32)
    launch(_param_grad_kernel, (3, triton_cdiv(d, 32)), vecs, dcst, gout, dw, db, B, d, BLOCK_J=32,
           BLOCK_D=max(16, next_pow2(d)), BLOCK_B=16)
    return dq, dc, dw, db


# ----------------------------------------------------------------- the same fused maths in PyTorch (CPU twin)
# The custom ops' implementation where the kernels cannot run (CPU without the interpreter: torch.compile
# tests), and an executable statement of the backward the kernels compute. Same saved tensors and rounding
# points, except that a low-precision P is rounded normalised over all keys (the kernel: per key block); it
# materialises the score matrices, which only the kernels avoid.
def _valid_rows(q, q_mask):
    return torch.ones(q.shape[:2], dtype=torch.bool, device=q.device) if q_mask is None else q_mask


def _masked_lse(s, keep, dim):
    lse = torch.logsumexp(s.masked_fill(~keep, float("-inf")), dim=dim)
    return lse


def _attention_fwd_torch(qf, cf, c_mask, scale: float, ct: torch.dtype):
    """(logsumexp (B, Tq), softmax(q c^T * scale) c (B, Tq, d)), keys outside c_mask excluded."""
    s = torch.bmm(_rounded(qf, ct), _rounded(cf, ct).transpose(1, 2)) * scale
    if c_mask is not None:
        s = s.masked_fill(~c_mask[:, None, :], float("-inf"))
    lse1 = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isneginf(lse1), 0.0, lse1)[..., None])
    return lse1, torch.bmm(_rounded(p, ct), _rounded(cf, ct))


def _attention_bwd_torch(qf, cf, c_mask, lse1, dctx, delta, scale: float, ct: torch.dtype):
    """(dq, dc) of the attention from its saved logsumexp; delta = dctx . ctx_raw per row."""
    s = torch.bmm(_rounded(qf, ct), _rounded(cf, ct).transpose(1, 2)) * scale
    p = torch.exp(s - torch.where(torch.isneginf(lse1), float("inf"), lse1)[..., None])
    if c_mask is not None:
        p = p.masked_fill(~c_mask[:, None, :], 0.0)
    dp = torch.bmm(_rounded(dctx, ct), _rounded(cf, ct).transpose(1, 2))
    ds = p * (dp - delta[..., None]) * scale
    dq = torch.bmm(_rounded(ds, ct), _rounded(cf, ct))
    dc = torch.bmm(_rounded(ds, ct).transpose(1, 2), _rounded(qf, ct)) + torch.bmm(_rounded(p, ct).transpose(1, 2),
                                                                                  _rounded(dctx, ct))
    return dq, dc


def _loss_fwd_torch(q, c, q_mask, c_mask, in_w, in_b, tau: float, renorm: bool, ct: torch.dtype,
                    uniform: bool = False, batch: bool = False):
    B, Tq, d = q.shape
    scale = 1.0 / tau
    qf, cf = q.float(), c.float()
    if batch:  # the whole batch as one sample of B Tq queries over B Tc keys
        lse1, ctx = _attention_fwd_torch(_flat(qf), _flat(cf), _flat(c_mask), scale, ct)
        lse1, ctx = lse1.reshape(B, Tq), ctx.reshape(B, Tq, d)
    else:
        lse1, ctx = _attention_fwd_torch(qf, cf, c_mask, scale, ct)
    cn = ctx.norm(dim=-1).clamp_min(_EPS) if renorm else torch.ones_like(lse1)
    ctx = ctx / cn[..., None]
    qc = qf * ctx
    qn = qc.norm(dim=-1).clamp_min(_EPS)
    a = qc / qn[..., None]
    valid = _valid_rows(q, q_mask)
    vf = valid.float()
    cnt = vf.sum(1).clamp_min(1.0)
    abar = (a * vf[..., None]).sum(1) / cnt[:, None]
    wq, wk, bq, bk = in_w[:d].float(), in_w[d:2 * d].float(), in_b[:d].float(), in_b[d:2 * d].float()
    qq = abar @ wq.t() + bq
    u = qq @ wk
    logits = (torch.einsum("btd,bd->bt", a, u) + (qq @ bk)[:, None]) / math.sqrt(d)
    w = torch.softmax(logits.masked_fill(~valid, float("-inf")), dim=-1).nan_to_num(0.0)
    if uniform:
        w = _uniform_weights(q, q_mask)
    S = torch.bmm(_rounded(qf, ct), _rounded(ctx, ct).transpose(1, 2)) * scale
    diag = torch.diagonal(S, dim1=1, dim2=2)  # from S itself: its rounding cancels in lse - diag
    pair = valid[:, :, None] & valid[:, None, :]
    lse_row = torch.where(valid, _masked_lse(S, pair, 2), float("inf"))  # +inf off q_mask, as the kernels
    lse_col = torch.where(valid, _masked_lse(S, pair, 1), float("inf"))
    e = torch.where(valid, (lse_row + lse_col - 2 * diag) / 2, 0.0)
    loss = (w * e).sum() / B
    # gout = 1 backward of the per-sample part
    dw = e / B
    dlog = torch.where(valid, w * (dw - (w * dw).sum(1, keepdim=True)), 0.0) / math.sqrt(d)
    if uniform:
        dlog = torch.zeros_like(dlog)  # w does not depend on the logits: every weighting gradient is 0
    du = torch.einsum("bt,btd->bd", dlog, a)
    dcst = dlog.sum(1)
    dqq = du @ wk.t() + dcst[:, None] * bk
    dabar = (dqq @ wq) / cnt[:, None]
    rows = torch.stack([lse1, cn, qn, lse_row, lse_col, w / (2 * B), dlog, diag], 1)
    vecs = torch.stack([u, dabar, abar, qq, du, dqq], 1)
    return loss, ctx, a, rows, vecs, dcst


def _loss_bwd_torch(gout, q, c, q_mask, c_mask, in_w, ctx, a, rows, vecs, dcst, tau: float, renorm: bool,
                    ct: torch.dtype, batch: bool = False):
    B, Tq, d = q.shape
    scale = 1.0 / tau
    gam = gout.float()
    qf, cf = q.float(), c.float()
    lse1, cn, qn, lse_row, lse_col, g1, dlog, _ = rows.unbind(1)
    u, dabar, abar, qq, du, dqq = vecs.unbind(1)
    valid = _valid_rows(q, q_mask)
    pair = valid[:, :, None] & valid[:, None, :]
    g = gam * g1
    # through both logsumexps of S
    S = torch.bmm(_rounded(qf, ct), _rounded(ctx, ct).transpose(1, 2)) * scale
    G = (g[..., None] * torch.exp(S - lse_row[..., None]) + g[:, None, :] * torch.exp(S - lse_col[:, None, :]))
    G = torch.where(pair, G - torch.diag_embed(2 * g), 0.0) * scale  # + d/dS_ii of -2 S_ii, before rounding
    dq = torch.bmm(_rounded(G, ct), _rounded(ctx, ct))
    dctx = torch.bmm(_rounded(G, ct).transpose(1, 2), _rounded(qf, ct))
    # the per-row glue: a = normalize(q * ctx) (logits, abar), ctx = normalize(ctx_raw)
    da = gam * (dlog[..., None] * u[:, None, :] + dabar[:, None, :] * valid[..., None].float())
    ad = torch.where(qn > _EPS, (a * da).sum(-1), 0.0)
    dqc = (da - a * ad[..., None]) / qn[..., None]
    dq = dq + dqc * ctx
    dctx = dctx + dqc * qf
    if renorm:
        cd = torch.where(cn > _EPS, (ctx * dctx).sum(-1), 0.0)
        dctx = (dctx - ctx * cd[..., None]) / cn[..., None]
    delta = (dctx * ctx).sum(-1) * cn
    # the attention
    if batch:
        dqa, dc = _attention_bwd_torch(_flat(qf), _flat(cf), _flat(c_mask), _flat(lse1), _flat(dctx), _flat(delta),
                                       scale, ct)
        dqa, dc = dqa.reshape(q.shape), dc.reshape(c.shape)
    else:
        dqa, dc = _attention_bwd_torch(qf, cf, c_mask, lse1, dctx, delta, scale, ct)
    dq = dq + dqa
    z = dqq.new_zeros(d, d)
    dw = gam * torch.cat([dqq.t() @ abar, qq.t() @ du, z])
    db = gam * torch.cat([dqq.sum(0), qq.t() @ dcst, z[0]])
    return dq, dc, dw, db


# ------------------------------------------------------------------------------------------- the custom ops
# No autocast registration (as kernels/move_ffn.py): the Autocast key falls through, so autocast never casts
# the fp32 inputs; the compute dtype is an explicit argument and the implementations run with autocast off.
# Explicit schemas: torch 2.4 cannot infer one from the string annotations this module has (``from __future__
# import annotations``), and torch 2.5/2.6 cannot resolve a tuple alias; tests/test_torch_versions.py checks
# every medst_fast op carries one.
_LossOut = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@torch.library.custom_op("medst_fast::token_align_fwd", mutates_args=(), schema=(
    "(Tensor q, Tensor c, Tensor? q_mask, Tensor? c_mask, Tensor in_proj_weight, Tensor in_proj_bias, "
    "float tau, bool renorm, ScalarType compute_dtype, bool uniform, bool batch) -> (Tensor, Tensor, "
    "Tensor, Tensor, Tensor, Tensor)"))
def _loss_fwd_op(q: torch.Tensor, c: torch.Tensor, q_mask: Optional[torch.Tensor], c_mask: Optional[torch.Tensor],
                 in_proj_weight: torch.Tensor, in_proj_bias: torch.Tensor, tau: float, renorm: bool,
                 compute_dtype: torch.dtype, uniform: bool, batch: bool) -> _LossOut:
    """(loss, ctx, a, rows (B, 8, Tq), vecs (B, 6, d), dcst (B,)): the loss and what its backward reads.
    The backward needs no ``uniform`` flag: a uniform forward saves zero weighting derivatives.
    ``batch``: the batch scope (module docstring); the saved tensors have the same shapes."""
    with torch.autocast(q.device.type, enabled=False):
        fn = _loss_fwd_triton if use_triton(q, c) else _loss_fwd_torch
        return fn(q, c, q_mask, c_mask, in_proj_weight.float(), in_proj_bias.float(), tau, renorm, compute_dtype,
                  uniform, batch)


@_loss_fwd_op.register_fake
def _(q, c, q_mask, c_mask, in_proj_weight, in_proj_bias, tau, renorm, compute_dtype, uniform, batch):
    B, Tq, d = q.shape
    f32 = torch.float32
    return (q.new_empty((), dtype=f32), q.new_empty(B, Tq, d, dtype=f32), q.new_empty(B, Tq, d, dtype=f32),
            q.new_empty(B, 8, Tq, dtype=f32), q.new_empty(B, 6, d, dtype=f32), q.new_empty(B, dtype=f32))


@torch.library.custom_op("medst_fast::token_align_bwd", mutates_args=(), schema=(
    "(Tensor gout, Tensor q, Tensor c, Tensor? q_mask, Tensor? c_mask, Tensor in_proj_weight, "
    "Tensor ctx, Tensor a, Tensor rows, Tensor vecs, Tensor dcst, float tau, bool renorm, "
    "ScalarType compute_dtype, bool batch) -> (Tensor, Tensor, Tensor, Tensor)"))
def _loss_bwd_op(gout: torch.Tensor, q: torch.Tensor, c: torch.Tensor, q_mask: Optional[torch.Tensor],
                 c_mask: Optional[torch.Tensor], in_proj_weight: torch.Tensor, ctx: torch.Tensor, a: torch.Tensor,
                 rows: torch.Tensor, vecs: torch.Tensor, dcst: torch.Tensor, tau: float, renorm: bool,
                 compute_dtype: torch.dtype, batch: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                   torch.Tensor]:
    """(dq, dc, d in_proj_weight, d in_proj_bias), fp32."""
    with torch.autocast(q.device.type, enabled=False):
        fn = _loss_bwd_triton if use_triton(q, c) else _loss_bwd_torch
        return fn(gout, q, c, q_mask, c_mask, in_proj_weight, ctx, a, rows, vecs, dcst, tau, renorm, compute_dtype,
                  batch)


@_loss_bwd_op.register_fake
def _(gout, q, c, q_mask, c_mask, in_proj_weight, ctx, a, rows, vecs, dcst, tau, renorm, compute_dtype, batch):
    f32 = torch.float32
    d = q.shape[-1]
    return (q.new_empty(q.shape, dtype=f32), c.new_empty(c.shape, dtype=f32), q.new_empty(3 * d, d, dtype=f32),
            q.new_empty(3 * d, dtype=f32))


def _loss_setup(ctx, inputs, output):
    q, c, q_mask, c_mask, in_w, in_b, tau, renorm, compute_dtype, _uniform_flag, batch = inputs
    _, cx, a, rows, vecs, dcst = output
    ctx.args = (tau, renorm, compute_dtype, q_mask is not None, c_mask is not None, batch)
    ctx.dtypes = (q.dtype, c.dtype, in_w.dtype, in_b.dtype)
    none = q.new_empty(0, dtype=torch.bool)
    ctx.save_for_backward(q, c, q_mask if q_mask is not None else none, c_mask if c_mask is not None else none,
                          in_w, cx, a, rows, vecs, dcst)


def _loss_backward(ctx, gout, *_unused):
    q, c, q_mask, c_mask, in_w, cx, a, rows, vecs, dcst = ctx.saved_tensors
    tau, renorm, ct, has_qm, has_cm, batch = ctx.args
    dq, dc, dw, db = _loss_bwd_op(gout, q, c, q_mask if has_qm else None, c_mask if has_cm else None, in_w, cx, a,
                                  rows, vecs, dcst, tau, renorm, ct, batch)
    grads = [t.to(dt) for t, dt in zip((dq, dc, dw, db), ctx.dtypes)]
    return (grads[0], grads[1], None, None, grads[2], grads[3], None, None, None, None, None)


_loss_fwd_op.register_autograd(_loss_backward, setup_context=_loss_setup)


def _check_inputs(q, c, q_mask, c_mask, in_proj_weight, in_proj_bias):
    def bad(field, want, got):
        raise ValueError(f"kernels/local_align.py: {field} must be {want}, got {got}")

    if q.dim() != 3 or c.dim() != 3 or c.shape[0] != q.shape[0] or c.shape[2] != q.shape[2]:
        bad("q, c", "(B, Tq, d) and (B, Tc, d)", f"{tuple(q.shape)} and {tuple(c.shape)}")
    d = q.shape[2]
    for name, m, t in (("q_mask", q_mask, q), ("c_mask", c_mask, c)):
        if m is not None and (m.dtype != torch.bool or m.shape != t.shape[:2]):
            bad(name, f"None or bool {tuple(t.shape[:2])}", f"{m.dtype} {tuple(m.shape)}")
    if in_proj_weight.shape != (3 * d, d) or in_proj_bias.shape != (3 * d,):
        bad("in_proj_weight, in_proj_bias", f"({3 * d}, {d}) and ({3 * d},)",
            f"{tuple(in_proj_weight.shape)} and {tuple(in_proj_bias.shape)}")


def _token_align_loss_fused(q, c, q_mask, c_mask, in_proj_weight, in_proj_bias, tau: float = 0.1,
                            renorm_context: bool = True, compute_dtype: Optional[torch.dtype] = None,
                            weighting: str = "learned", scope: str = "sample") -> torch.Tensor:
    """Same value and gradients as :func:`token_align_loss_ref`, with no (B, Tq, Tc) or (B, Tq, Tq) tensor
    (and, for the batch scope, no (B Tq, B Tc) one)."""
    return _loss_fwd_op(q, c, q_mask, c_mask, in_proj_weight, in_proj_bias, float(tau), bool(renorm_context),
                        _compute_dtype(compute_dtype), _uniform(weighting), _batch_scope(scope))[0]


def token_align_loss(q, c, q_mask, c_mask, in_proj_weight, in_proj_bias, tau: float = 0.1,
                     renorm_context: bool = True, compute_dtype: Optional[torch.dtype] = None,
                     weighting: str = "learned", scope: str = "sample") -> torch.Tensor:
    """Dispatching entry point (fused Triton kernels where available, reference otherwise).

    ``compute_dtype``: None (exact fp32) or the autocast dtype (bf16/fp16 product operands), see the module
    docstring; the same maths on either path. ``weighting``: "learned" or "uniform"; ``scope``: "sample" or
    "batch" (module docstring)."""
    _check_inputs(q, c, q_mask, c_mask, in_proj_weight, in_proj_bias)
    ct = _compute_dtype(compute_dtype)
    _uniform(weighting)
    _batch_scope(scope)
    if use_triton(q, c) and _triton_impl is not None:
        return _triton_impl(q, c, q_mask, c_mask, in_proj_weight, in_proj_bias, tau, renorm_context, ct, weighting,
                            scope)
    return token_align_loss_ref(q, c, q_mask, c_mask, in_proj_weight, in_proj_bias, tau, renorm_context, ct,
                                weighting, scope)


# The dispatch hook: token_align_loss routes here whenever use_triton() says the fused kernels can run.
_triton_impl = _token_align_loss_fused
