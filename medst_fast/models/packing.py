"""Packed two-view sequences: one study = [CLS, frontal patches, lateral patches if present].

Studies are laid end to end in one (N_tokens, D) buffer (sequence-major, ``cu_seqlens`` as flash
attention expects), so a frontal-only study runs 1+P tokens instead of 1+2P. Expert routing uses the
precomputed token indices of each view instead of fixed slices.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

log = logging.getLogger("medst_fast")


@dataclass
class PackedViews:
    batch: int
    total: int  # tokens in the buffer
    max_len: int
    cu_seqlens: torch.Tensor  # (B+1,) int32
    frontal_idx: torch.Tensor  # (B*(1+P),) buffer rows of CLS+frontal tokens, study-major
    lateral_idx: torch.Tensor  # (n_lat*P,) buffer rows of lateral tokens of studies that have one
    dense_idx: torch.Tensor  # (total,) row in a (B*max_len) padded layout, for the masked-SDPA fallback
    lengths: torch.Tensor  # (B,) tokens per study
    view_id: torch.Tensor  # (total,) long: 0 = CLS/frontal, 1 = lateral
    routing: Optional[object] = None  # kernels.move_ffn.MoveRouting when the fused FFN runs


def pack_views(has: torch.Tensor, lat_rows: torch.Tensor, P: int) -> PackedViews:
    dev = has.device
    B = has.shape[0]
    nf = P + 1
    lengths = nf + P * has.long()
    starts = torch.cumsum(lengths, 0) - lengths
    n_lat = int(lat_rows.numel())
    total = B * nf + n_lat * P
    max_len = nf + (P if n_lat else 0)
    ar_f = torch.arange(nf, device=dev)
    frontal_idx = (starts[:, None] + ar_f).reshape(-1)
    lateral_idx = (starts.index_select(0, lat_rows)[:, None] + nf + torch.arange(P, device=dev)).reshape(-1)
    seq = torch.repeat_interleave(torch.arange(B, device=dev), lengths, output_size=total)
    pos = torch.arange(total, device=dev) - starts.index_select(0, seq)
    dense_idx = seq * max_len + pos
    cu = F.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)
    view_id = torch.zeros(total, dtype=torch.long, device=dev).index_fill_(0, lateral_idx, 1)
    return PackedViews(B, total, max_len, cu, frontal_idx, lateral_idx, dense_idx, lengths, view_id)


_varlen = None
_varlen_checked = False


def _get_varlen():
    global _varlen, _varlen_checked
    if not _varlen_checked:
        _varlen_checked = True
        try:
            from torch.nn.attention.varlen import varlen_attn

            _varlen = varlen_attn
        except ImportError:
            log.info("medst_fast: torch.nn.attention.varlen not in this torch; packed attention uses masked SDPA")
    return _varlen


def packed_attention(qkv: torch.Tensor, pk: PackedViews) -> torch.Tensor:
    """qkv: (N_tokens, 3, H, Dh) -> attention output (N_tokens, H, Dh), each study attending to itself."""
    q, k, v = qkv.unbind(1)
    fn = _get_varlen()
    if fn is not None and qkv.is_cuda and qkv.dtype in (torch.float16, torch.bfloat16):
        return fn(q, k, v, pk.cu_seqlens, pk.cu_seqlens, pk.max_len, pk.max_len)
    # Fallback (CPU, fp32, old torch): scatter into a padded batch and use masked SDPA. Same maths.
    N, _, H, Dh = qkv.shape
    B, L = pk.batch, pk.max_len
    dense = qkv.new_zeros(B * L, 3, H, Dh).index_copy(0, pk.dense_idx, qkv).view(B, L, 3, H, Dh)
    keep = torch.arange(L, device=qkv.device)[None, :] < pk.lengths[:, None]
    qd, kd, vd = dense.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, L, Dh) each
    o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=keep[:, None, None, :])
    return o.transpose(1, 2).reshape(B * L, H, Dh).index_select(0, pk.dense_idx)
