"""Mixture-of-View-Experts ViT (docs/method.md §2.1).

One sequence per study: [CLS, frontal patches, lateral patches]. The lateral view reuses the patch
embedding and the patch positions (no CLS, no view embedding). Attention (and its LayerNorm) is shared;
in every block CLS + frontal tokens go through the frontal FFN (``norm2``/``mlp``) and lateral tokens
through the lateral FFN (``norm2_l``/``mlp_l``). A study without a lateral has its lateral tokens masked
as attention keys. With frontal images only, the network is exactly a timm ViT-B/16.

Parameter names follow timm/MGCA (``blocks.i.norm1``, ``attn.qkv`` ...) so timm, DeiT, MGCA and the
official Med-ST checkpoints map by prefix only.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import VisionCfg
from .layers import Mlp, sdpa
from .packing import PackedViews, packed_attention, plan_packing
from ..kernels._utils import use_triton


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionCfg):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_chans, cfg.width, cfg.patch_size, cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        if x.shape[1] == 1 and w.shape[1] != 1:
            # A grey X-ray replicated to 3 channels hits the conv as the sum of its channel weights:
            # folding the weights is exact and reads a third of the pixels.
            w = w.sum(dim=1, keepdim=True)
        x = F.conv2d(x, w, self.proj.bias, stride=self.patch_size)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        o = sdpa(qkv[0], qkv[1], qkv[2], attn_mask)
        return self.proj(o.transpose(1, 2).reshape(B, N, D))


class MoVEBlock(nn.Module):
    def __init__(self, cfg: VisionCfg):
        super().__init__()
        d, hidden = cfg.width, int(cfg.width * cfg.mlp_ratio)
        self.norm1 = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.attn = Attention(d, cfg.heads, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.mlp = Mlp(d, hidden)
        if cfg.lateral_expert:
            self.norm2_l = nn.LayerNorm(d, eps=cfg.ln_eps)
            self.mlp_l = Mlp(d, hidden)

    def forward_packed(self, x: torch.Tensor, pk: PackedViews) -> torch.Tensor:
        """x: (N_tokens, D) packed studies (sequence-major); experts chosen per token by ``pk`` indices."""
        qkv = self.attn.qkv(self.norm1(x)).view(x.shape[0], 3, self.attn.heads, -1)
        o = packed_attention(qkv, pk)
        x = x + self.attn.proj(o.reshape(x.shape[0], -1))
        if pk.routing is not None:
            # Fused Triton MoVE FFN (LayerNorm, fc1+bias+GELU, fc2+bias, residual; tokens routed by view).
            # Under autocast the residual stream stays fp32 (as in the eager module) and the op runs its
            # GEMMs in the autocast dtype with fp32 accumulation (kernels/move_ffn.py, compute_dtype).
            from medst_fast.kernels.move_ffn import move_ffn

            f, l = (self.norm2, self.mlp), (self.norm2_l, self.mlp_l)
            return move_ffn(
                x, pk.view_id, torch.stack([f[0].weight, l[0].weight]), torch.stack([f[0].bias, l[0].bias]),
                torch.stack([f[1].fc1.weight, l[1].fc1.weight]), torch.stack([f[1].fc1.bias, l[1].fc1.bias]),
                torch.stack([f[1].fc2.weight, l[1].fc2.weight]), torch.stack([f[1].fc2.bias, l[1].fc2.bias]),
                self.norm2.eps, routing=pk.routing)
        xf = x.index_select(0, pk.frontal_idx)
        delta = torch.zeros_like(x).index_copy(0, pk.frontal_idx, self.mlp(self.norm2(xf)).to(x.dtype))
        if pk.lateral_idx.shape[0]:  # a Python int from the host-built plan: no sync
            xl = x.index_select(0, pk.lateral_idx)
            delta = delta.index_copy(0, pk.lateral_idx, self.mlp_l(self.norm2_l(xl)).to(x.dtype))
        return x + delta

    def forward(self, x: torch.Tensor, n_frontal: int, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, N, D) with tokens [:n_frontal] frontal (incl. CLS) and [n_frontal:] lateral."""
        x = x + self.attn(self.norm1(x), attn_mask)
        if x.shape[1] == n_frontal:
            return x + self.mlp(self.norm2(x))
        f, l = x[:, :n_frontal], x[:, n_frontal:]
        return x + torch.cat([self.mlp(self.norm2(f)), self.mlp_l(self.norm2_l(l))], dim=1)


class MoVEViT(nn.Module):
    def __init__(self, cfg: VisionCfg):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        n = cfg.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, cfg.width))
        self.blocks = nn.ModuleList([MoVEBlock(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        # timm's classifier slot: Identity (no parameters) until reset_classifier(n) asks for n classes
        self.head = nn.Identity()
        self.num_classes = 0
        self.grad_checkpointing = False
        # timm's feature metadata, so dense-task code (FPN necks, segmentation heads) can size itself
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=cfg.width, reduction=cfg.patch_size)
                             for i in range(cfg.depth)]
        self.init_weights()

    def init_weights(self):
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def num_frontal_tokens(self) -> int:
        return self.cfg.num_patches + 1

    # -- timm-style image-tower API (frontal-only input = exactly timm's ViT) ------------------------------
    @property
    def num_features(self) -> int:
        """Width of the features ``forward_head(..., pre_logits=True)`` returns (timm's name)."""
        return self.cfg.width

    @property
    def grid_size(self) -> Tuple[int, int]:
        g = self.cfg.img_size // self.cfg.patch_size
        return g, g

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass while training (activation memory per block)."""
        self.grad_checkpointing = bool(enable)

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh Linear(num_features, num_classes) head on the CLS token (0: no head, timm's convention)."""
        self.num_classes = int(num_classes)
        self.head = nn.Linear(self.cfg.width, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """timm's ``forward_head``: CLS pooling of ``forward_features`` output, then the classifier head.

        Args:
            x: (B, N, D) final-LN tokens from ``forward_features``.
            pre_logits: return the pooled (B, D) feature (the linear-probe feature) without the head.
        """
        x = x[:, 0]
        return x if pre_logits else self.head(x)

    def _check_input(self, x: torch.Tensor, what: str) -> None:
        S = self.cfg.img_size
        if x.dim() != 4 or tuple(x.shape[-2:]) != (S, S) or x.shape[1] not in (1, self.cfg.in_chans):
            raise ValueError(f"{what}: expected (B, 1 or {self.cfg.in_chans}, {S}, {S}) images (the position "
                             f"table is for {S} px), got {tuple(x.shape)}")

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, Sequence[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Block outputs for dense tasks, with timm's ``VisionTransformer.forward_intermediates`` semantics.

        Frontal-only input (the plain ViT path). The CLS token is split off each intermediate; patch tokens
        come back as (B, D, H/p, W/p) maps (``"NCHW"``) or (B, P, D) sequences (``"NLC"``).

        Args:
            indices: None = every block; an int n = the last n blocks; a sequence = those block indices
                (negative counts from the end).
            return_prefix_tokens: pair each intermediate with its (B, 1, D) CLS token.
            norm: apply the final LayerNorm to every intermediate.
            stop_early: skip the blocks after the last one asked for (then the final features are those
                of that block, as in timm).
            intermediates_only: return only the list of intermediates.
        Returns:
            ``intermediates`` or ``(final-LN tokens (B, 1+P, D), intermediates)``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        self._check_input(x, "forward_intermediates")
        take = _take_indices(len(self.blocks), indices)
        last = max(take)
        h = self.embed(x, None)
        nf = self.num_frontal_tokens
        feats: List[torch.Tensor] = []
        blocks = self.blocks[: last + 1] if stop_early else self.blocks
        for i, blk in enumerate(blocks):
            h = self._run_block(blk, h, nf, None)
            if i in take:
                feats.append(self.norm(h) if norm else h)
        prefix = [f[:, :1] for f in feats]
        feats = [f[:, 1:] for f in feats]
        if output_fmt == "NCHW":
            gh, gw = self.grid_size
            feats = [f.reshape(f.shape[0], gh, gw, -1).permute(0, 3, 1, 2).contiguous() for f in feats]
        if return_prefix_tokens:
            feats = list(zip(feats, prefix))
        if intermediates_only:
            return feats
        return self.norm(h), feats

    def _run_block(self, blk, x, nf, mask):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(blk, x, nf, mask, use_reentrant=False)
        return blk(x, nf, mask)

    def embed(self, frontal: torch.Tensor, lateral: Optional[torch.Tensor]) -> torch.Tensor:
        B = frontal.shape[0]
        x = torch.cat([self.cls_token.expand(B, -1, -1), self.patch_embed(frontal)], dim=1) + self.pos_embed
        if lateral is not None:
            lt = self.patch_embed(lateral) + self.pos_embed[:, 1:]
            x = torch.cat([x, lt], dim=1)
        return x

    def forward_features(
        self,
        frontal: torch.Tensor,
        lateral: Optional[torch.Tensor] = None,
        has_lateral: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Dense path. Returns the final-LN tokens (B, 1 + P [+ P], D).

        Args:
            frontal: (B, C, H, W) with C = 1 (grey) or 3.
            lateral: (B, C, H, W) or None for the single-view (evaluation) path.
            has_lateral: (B,) bool; studies where it is False get their lateral tokens masked as keys.
        """
        if lateral is not None and not self.cfg.lateral_expert:
            raise ValueError("this ViT has no lateral expert (vision.lateral_expert = false); pass lateral=None")
        self._check_input(frontal, "frontal")
        if lateral is not None:
            self._check_input(lateral, "lateral")
        x = self.embed(frontal, lateral)
        nf = self.num_frontal_tokens
        mask = None
        if lateral is not None and has_lateral is not None:
            # (B, 1, 1, N) boolean "may attend" mask built on the device (the official builds it on the
            # CPU in a Python loop and copies it every layer).
            keep = torch.ones(x.shape[0], x.shape[1], dtype=torch.bool, device=x.device)
            keep[:, nf:] = has_lateral.to(device=x.device, dtype=torch.bool)[:, None]
            mask = keep[:, None, None, :]
        for blk in self.blocks:
            x = self._run_block(blk, x, nf, mask)
        return self.norm(x)

    def packing_plan(self, has_lateral: torch.Tensor, device: torch.device) -> PackedViews:
        """The packing plan for a batch, built on the host (see models/packing.py) and moved to ``device``.

        ``has_lateral`` should be the collate's CPU tensor; a device tensor is read back once (one sync).
        The fused FFN's expert routing is part of the plan when the Triton path will run on ``device``.
        """
        host = has_lateral if has_lateral.device.type == "cpu" else has_lateral.cpu()
        routing = self.cfg.lateral_expert and use_triton(torch.empty(0, device=device))
        return plan_packing(host, self.cfg.num_patches, routing=routing).to(device)

    def forward_packed(self, frontal, lateral, has_lateral=None, plan: Optional[PackedViews] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Packed path: absent laterals cost nothing (197 tokens instead of 393 for a frontal-only study).

        Returns (CLS (B, D), patch tokens (B, 2P, D)) with zeros in the lateral slots of studies without
        one; CLS and every present token equal the dense path's (attention per study via varlen flash
        attention on CUDA, masked SDPA elsewhere). ``plan`` (from :meth:`packing_plan`) is built from
        ``has_lateral`` when omitted; pass it to keep the forward free of host syncs and compilable.
        """
        B, P = frontal.shape[0], self.cfg.num_patches
        pk = plan if plan is not None else self.packing_plan(has_lateral, frontal.device)
        if pk.batch != B or pk.patches != P:
            raise ValueError(f"packing plan is for {pk.batch} studies of {pk.patches} patches; the batch has "
                             f"{B} studies of {P}")
        fr = self.embed(frontal, None)  # (B, 1+P, D)
        lt = self.patch_embed(lateral.index_select(0, pk.lat_rows)) + self.pos_embed[:, 1:]
        x = fr.new_zeros(pk.total, fr.shape[-1])
        x = x.index_copy(0, pk.frontal_idx, fr.reshape(-1, fr.shape[-1]))
        x = x.index_copy(0, pk.lateral_idx, lt.reshape(-1, lt.shape[-1]).to(x.dtype))
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk.forward_packed, x, pk, use_reentrant=False)
            else:
                x = blk.forward_packed(x, pk)
        x = self.norm(x)
        D = x.shape[-1]
        front = x.index_select(0, pk.frontal_idx).view(B, P + 1, D)
        lat = x.new_zeros(B, P, D).index_copy(0, pk.lat_rows, x.index_select(0, pk.lateral_idx).view(-1, P, D))
        return front[:, 0], torch.cat([front[:, 1:], lat], dim=1)

    def forward(self, frontal, lateral=None, has_lateral=None, packed: bool = False,
                plan: Optional[PackedViews] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns (CLS (B, D), patch tokens (B, P or 2P, D)). ``packed`` skips absent laterals' compute."""
        if packed and lateral is not None and (has_lateral is not None or plan is not None):
            return self.forward_packed(frontal, lateral, has_lateral, plan)
        x = self.forward_features(frontal, lateral, has_lateral)
        return x[:, 0], x[:, 1:]


def _take_indices(depth: int, indices) -> List[int]:
    """timm's block selection: None -> all, int n -> the last n, a sequence -> those (negative from the end)."""
    if indices is None:
        indices = depth
    if isinstance(indices, int):
        if not 0 < indices <= depth:
            raise ValueError(f"indices={indices}: the last-n count must be in 1..{depth}")
        return list(range(depth - indices, depth))
    out = []
    for i in indices:
        j = depth + i if i < 0 else i
        if not 0 <= j < depth:
            raise ValueError(f"block index {i} is out of range for {depth} blocks")
        out.append(j)
    if not out:
        raise ValueError("indices: an empty list selects no block")
    return out
