"""Small shared layers: the FFN, SDPA attention, projection heads with (masked) BatchNorm."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2 (timm/BERT naming)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def sdpa(q, k, v, attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0):
    """Scaled dot-product attention through PyTorch's fused backends (flash / cuDNN / efficient).

    ``attn_mask`` is boolean, True where a query may attend. Every query keeps at least one key (the CLS
    or [CLS] token is never masked), so no row is fully masked.
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over (N, C) rows whose statistics can skip masked rows.

    With ``mask=None`` it is exactly ``nn.BatchNorm1d``. With a mask, batch mean/variance (and the running
    statistics, unbiased as BatchNorm does) use only rows where mask is True, without a host sync or a
    gather, so padded tokens do not shift the normalisation of real ones. Masked rows are still
    normalised (their values are ignored downstream).
    """

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if mask is None or not (self.training or not self.track_running_stats):
            return super().forward(x)
        m = mask.to(x.dtype)[:, None]
        n = m.sum().clamp_min(1.0)
        mean = (x * m).sum(0) / n
        var = (((x - mean) ** 2) * m).sum(0) / n
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                mom = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * n / (n - 1).clamp_min(1.0)
                self.running_mean.mul_(1 - mom).add_(mom * mean.detach().to(self.running_mean.dtype))
                self.running_var.mul_(1 - mom).add_(mom * unbiased.detach().to(self.running_var.dtype))
        y = (x - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y


class ProjectionHead(nn.Module):
    """768 -> 2048 -> BN -> ReLU -> 128 -> BN(affine=False), Med-ST's Global/LocalEmbedding.

    The official local head is a Conv1d(k=1) over the token axis; a Linear over (B*T, C) rows is the
    same map (conversion squeezes the kernel dimension). Parameter names keep the official
    ``head.{0,1,3,4}`` indices.
    """

    def __init__(self, dim_in: int, hidden: int, dim_out: int):
        super().__init__()
        self.head = nn.ModuleList([
            nn.Linear(dim_in, hidden),
            MaskedBatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, dim_out),
            MaskedBatchNorm1d(dim_out, affine=False),
        ])

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (..., C). ``mask`` (same leading shape, bool) restricts the BatchNorm statistics."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        m = None if mask is None else mask.reshape(-1)
        lin1, bn1, act, lin2, bn2 = self.head
        x = act(bn1(lin1(x), m))
        x = bn2(lin2(x), m)
        return x.reshape(*shape[:-1], x.shape[-1])
