"""Packed two-view sequences: one study = [CLS, frontal patches, lateral patches if present].

Studies are laid end to end in one (N_tokens, D) buffer (sequence-major, ``cu_seqlens`` as flash
attention expects), so a frontal-only study runs 1+P tokens instead of 1+2P. Expert routing uses the
precomputed token indices of each view instead of fixed slices.

The plan (every index tensor and every size) is a function of ``has_lateral`` alone, which the collate
knows on the host. :func:`plan_packing` therefore builds it on the CPU and ships it to the device with the
batch: the forward then issues no ``nonzero``/``repeat_interleave``/``bincount`` and never waits for the
device to report how many laterals there are (the sizes are Python ints before any kernel runs).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
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
    lat_rows: Optional[torch.Tensor] = None  # (n_lat,) long: the studies that have a lateral
    patches: int = 0  # P, patches per view

    @property
    def n_lateral(self) -> int:
        return (self.total - self.batch * (self.patches + 1)) // max(self.patches, 1)

    def to(self, device, non_blocking: bool = True) -> "PackedViews":
        """The same plan on ``device``: host-to-device copies only (no device-to-host read)."""
        def mv(t):
            return t.to(device, non_blocking=non_blocking) if torch.is_tensor(t) else t

        routing = self.routing
        if routing is not None:
            routing = type(routing)(*(mv(t) for t in routing))
        return replace(self, cu_seqlens=mv(self.cu_seqlens), frontal_idx=mv(self.frontal_idx),
                       lateral_idx=mv(self.lateral_idx), dense_idx=mv(self.dense_idx), lengths=mv(self.lengths),
                       view_id=mv(self.view_id), routing=routing, lat_rows=mv(self.lat_rows))


def pack_views(has: torch.Tensor, lat_rows: torch.Tensor, P: int) -> PackedViews:
    """The plan computed with tensor ops on ``has``'s device (kept for callers that hold only device
    tensors; :func:`plan_packing` is the sync-free entry point)."""
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
    return PackedViews(B, total, max_len, cu, frontal_idx, lateral_idx, dense_idx, lengths, view_id,
                       lat_rows=lat_rows.long(), patches=P)


def plan_packing(has_lateral: torch.Tensor, P: int, routing: bool = False) -> PackedViews:
    """The packing plan of a batch, built on the host from a CPU ``has_lateral`` (B,) bool tensor.

    ``routing=True`` also builds the fused MoVE FFN's expert tile routing (kernels/move_ffn.py), which
    depends on the same view ids. Move the result with :meth:`PackedViews.to`.
    """
    if has_lateral.device.type != "cpu":
        raise ValueError("plan_packing: has_lateral must be a CPU tensor (the plan is built on the host); "
                         "pass the collate's has_lateral before moving the batch to the device")
    has = has_lateral.to(torch.bool).reshape(-1)
    lat_rows = has.nonzero().flatten()  # host tensor: no device sync
    pk = pack_views(has, lat_rows, P)
    if routing:
        from ..kernels.move_ffn import build_routing

        pk.routing = build_routing(pk.view_id)
    return pk


def _find_varlen():
    # Resolved once at import: a lazily set module global would be a guard that makes torch.compile
    # recompile the model the first time it changes.
    try:
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn
    except ImportError:
        return None


_varlen = _find_varlen()
_varlen_logged = False


def _get_varlen():
    global _varlen_logged
    if _varlen is None and not torch.compiler.is_compiling() and not _varlen_logged:
        _varlen_logged = True
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
