"""MedST: MoVE ViT + BERT + projection heads + the local-weighting attention (medst-spec.md §1, §7)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import MedSTConfig
from .layers import ProjectionHead
from .move_vit import MoVEViT
from .text_bert import TextBert


@dataclass
class MedSTOutput:
    img_global: torch.Tensor  # (B, E) L2-normalised
    txt_global: torch.Tensor  # (B, E)
    patch_local: torch.Tensor  # (B, P or 2P, E) L2-normalised
    word_local: torch.Tensor  # (B, L-1, E)
    patch_mask: torch.Tensor  # (B, P or 2P) bool: patch present (absent laterals False)
    word_mask: torch.Tensor  # (B, L-1) bool: word slot filled (PAD False)
    n_full_series: int  # rows [:n_full_series * series_len] form complete series, in order
    img_cls: Optional[torch.Tensor] = None  # (B, D) final-LN CLS (the COVIDx probe feature)


class MedST(nn.Module):
    def __init__(self, cfg: MedSTConfig):
        super().__init__()
        self.cfg = cfg
        v, t, h = cfg.vision, cfg.text, cfg.head
        self.visual = MoVEViT(v)
        self.text = TextBert(t, faithful_positions=cfg.faithful)
        # Packed two-view sequences skip absent laterals (default semantics only: the faithful mode computes
        # them, spec §2.2 (c)). None = on CUDA only (on the CPU the padded fallback gains nothing).
        self.packed: Optional[bool] = None
        self.visual_global_head = ProjectionHead(v.width, h.hidden, h.embed_dim)
        self.visual_local_head = ProjectionHead(v.width, h.hidden, h.embed_dim)
        self.text_global_head = ProjectionHead(t.hidden, h.hidden, h.embed_dim)
        self.text_local_head = ProjectionHead(t.hidden, h.hidden, h.embed_dim)
        # The learned token weighting of the local loss: 1-head attention whose weights (not outputs) are
        # used; out_proj exists only so official checkpoints load 1:1.
        self.word_weighting = nn.MultiheadAttention(h.embed_dim, 1, batch_first=True)
        self.patch_weighting = nn.MultiheadAttention(h.embed_dim, 1, batch_first=True)
        for m in (self.word_weighting, self.patch_weighting):
            nn.init.trunc_normal_(m.out_proj.weight, std=0.02)
            nn.init.zeros_(m.out_proj.bias)
        for head in (self.visual_global_head, self.visual_local_head, self.text_global_head, self.text_local_head):
            for m in head.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True):
        self.visual.grad_checkpointing = enable
        self.text.grad_checkpointing = enable

    # -- drop-in encoder API ------------------------------------------------------------------
    def encode_image(self, frontal, lateral=None, has_lateral=None, normalize: bool = True) -> torch.Tensor:
        """Global image embedding (B, E). Frontal-only input is the plain ViT-B evaluation path."""
        cls, _ = self.visual(frontal, lateral, has_lateral)
        e = self.visual_global_head(cls)
        return F.normalize(e, dim=-1) if normalize else e

    def encode_text(self, input_ids, attention_mask=None, word_slots=None, normalize: bool = True) -> torch.Tensor:
        """Global report embedding (B, E). ``word_slots`` is accepted (and unused) so ``**tokenizer(texts)`` works."""
        del word_slots  # the global embedding reads the [CLS] state only
        cls, _, _ = self.text(input_ids, attention_mask)
        e = self.text_global_head(cls)
        return F.normalize(e, dim=-1) if normalize else e

    def image_features(self, frontal, lateral=None, has_lateral=None) -> torch.Tensor:
        """The 768-d final-LN CLS (the linear-probe feature of the COVIDx protocol)."""
        return self.visual(frontal, lateral, has_lateral)[0]

    # -- pretraining forward ------------------------------------------------------------------
    def forward(self, batch: Mapping[str, torch.Tensor]) -> MedSTOutput:
        """batch: frontal (B,C,H,W), lateral (B,C,H,W) or absent, has_lateral (B,), input_ids,
        attention_mask, word_slots (B, L), n_full_series (int)."""
        frontal = batch["frontal"]
        lateral = batch.get("lateral")
        has_lat = batch.get("has_lateral")
        B = frontal.shape[0]
        if lateral is not None and not self.cfg.vision.lateral_expert:
            lateral, has_lat = None, None
        if lateral is not None and has_lat is None:
            has_lat = torch.ones(B, dtype=torch.bool, device=frontal.device)
        packed = self.packed if self.packed is not None else frontal.is_cuda
        cls, patches = self.visual(frontal, lateral, has_lat, packed=packed and not self.cfg.faithful)
        P = self.cfg.vision.num_patches
        patch_mask = torch.ones(B, patches.shape[1], dtype=torch.bool, device=frontal.device)
        if lateral is not None:
            patch_mask[:, P:] = has_lat.to(device=frontal.device, dtype=torch.bool)[:, None]

        t_cls, words, word_mask = self.text(batch["input_ids"], batch["attention_mask"], batch["word_slots"])

        # faithful: the local heads' BatchNorm sees every slot, absent laterals and PAD words included.
        pm = None if self.cfg.faithful else patch_mask
        wm = None if self.cfg.faithful else word_mask
        img_g = F.normalize(self.visual_global_head(cls), dim=-1)
        txt_g = F.normalize(self.text_global_head(t_cls), dim=-1)
        patch_l = F.normalize(self.visual_local_head(patches, pm), dim=-1)
        word_l = F.normalize(self.text_local_head(words, wm), dim=-1)
        return MedSTOutput(img_g, txt_g, patch_l, word_l, patch_mask, word_mask,
                           int(batch.get("n_full_series", 0)), cls)
