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

from ._utils import use_triton


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


def token_align_loss(q, c, q_mask, c_mask, in_proj_weight, in_proj_bias, tau: float = 0.1,
                     renorm_context: bool = True) -> torch.Tensor:
    """Dispatching entry point (fused Triton kernel where available, reference otherwise)."""
    if use_triton(q, c) and _triton_impl is not None:
        return _triton_impl(q, c, q_mask, c_mask, in_proj_weight, in_proj_bias, tau, renorm_context)
    return token_align_loss_ref(q, c, q_mask, c_mask, in_proj_weight, in_proj_bias, tau, renorm_context)


# Set by the Triton implementation once it is written; None keeps every call on the reference.
_triton_impl = None
