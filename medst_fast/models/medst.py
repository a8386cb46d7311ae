"""MedST: MoVE ViT + BERT + projection heads + the local-weighting attention (docs/method.md §2, §1.3)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import MedSTConfig
from ..kernels._utils import use_triton
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
    # The autocast dtype the forward ran under (None: no autocast). The losses run outside autocast, in
    # fp32, but the local alignment's big products use this dtype as autocast would (losses.local_loss).
    amp_dtype: Optional[torch.dtype] = None


class MedST(nn.Module):
    def __init__(self, cfg: MedSTConfig):
        super().__init__()
        self.cfg = cfg
        v, t, h = cfg.vision, cfg.text, cfg.head
        self.visual = MoVEViT(v)
        self.text = TextBert(t, faithful_positions=cfg.faithful)
        # Packed two-view sequences skip absent laterals (default semantics only: the faithful mode computes
        # them, docs/method.md §6.1.2). None = wherever the fused kernels run (CUDA, or Triton's CPU interpreter);
        # on the CPU the padded fallback gains nothing.
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

    # -- freezing towers (open_clip's names and semantics) --------------------------------------------------
    def lock_image_tower(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False):
        """Freeze the image tower (``visual`` and its global and local projection heads), open_clip style.

        The tower is cut into groups as open_clip cuts its ViT: [patch embedding, CLS, positions], then each
        block, the last block together with the final LayerNorm, then the projection heads. The last
        ``unlocked_groups`` groups stay trainable (0: everything frozen; 1: only the heads train, LiT-style).
        ``freeze_bn_stats``: the frozen heads' BatchNorm layers also stop updating their running statistics
        and normalise with them in training mode (open_clip's ``freeze_batch_norm_2d``).
        """
        v = self.visual
        groups = [[v.patch_embed, v.cls_token, v.pos_embed], *[[b] for b in v.blocks[:-1]],
                  [v.blocks[-1], v.norm], [v.head, self.visual_global_head, self.visual_local_head]]
        locked = _lock_groups(groups, unlocked_groups, "unlocked_groups")
        if freeze_bn_stats:
            for g in locked:
                for item in g:
                    if isinstance(item, nn.Module):
                        _freeze_batchnorm_stats(item)

    def lock_text_tower(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True):
        """Freeze the text tower (BERT and its projection heads), open_clip style.

        Groups: [embeddings], each BERT layer, then the projection heads; the last ``unlocked_layers``
        groups stay trainable (1: only the heads). ``freeze_layer_norm=False`` keeps the LayerNorm weights
        of the frozen groups trainable, as open_clip's option does.
        """
        t = self.text
        groups = [[t.embeddings], *[[layer] for layer in t.encoder.layer],
                  [self.text_global_head, self.text_local_head]]
        locked = _lock_groups(groups, unlocked_layers, "unlocked_layers")
        if not freeze_layer_norm:
            for g in locked:
                for m in g:
                    for mod in m.modules():
                        if isinstance(mod, nn.LayerNorm):
                            for p in mod.parameters():
                                p.requires_grad_(True)

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

    @property
    def logit_scale(self) -> torch.Tensor:
        """1 / tau_global as a 0-d tensor: the scale of the global image-text logits Med-ST trains with.

        open_clip keeps a learned log-scale and returns its exp(); Med-ST's temperature is fixed, so this is
        read from the config (not a parameter: state dicts and checkpoints are unchanged)."""
        return torch.tensor(1.0 / self.cfg.loss.tau_global, device=self.visual.cls_token.device)

    def image_features(self, frontal, lateral=None, has_lateral=None) -> torch.Tensor:
        """The 768-d final-LN CLS (the linear-probe feature of the COVIDx protocol)."""
        return self.visual(frontal, lateral, has_lateral)[0]

    # -- pretraining forward ------------------------------------------------------------------
    def _packs(self, batch: Mapping[str, torch.Tensor]) -> bool:
        if self.cfg.faithful or not self.cfg.vision.lateral_expert or batch.get("lateral") is None:
            return False
        if self.packed is not None:
            return self.packed
        return batch["frontal"].is_cuda or use_triton(batch["frontal"])

    def prepare_batch(self, batch: Mapping[str, torch.Tensor]) -> dict:
        """Adds the packing plan (``batch["packing"]``) built on the host, for a batch already on its device.

        Call it outside ``torch.compile`` (the trainer does): the plan's sizes are data-dependent on the
        host, so building it inside a compiled region would break the graph. Reads ``has_lateral_host``
        (the collate's CPU tensor) when present, else ``has_lateral`` (one device read if it is on a GPU).
        """
        out = dict(batch)
        if self._packs(out) and out.get("packing") is None:
            has = out.get("has_lateral_host")
            if has is None:
                has = out.get("has_lateral")
            if has is None:
                has = torch.ones(out["frontal"].shape[0], dtype=torch.bool)
            out["packing"] = self.visual.packing_plan(has, out["frontal"].device)
        return out

    def forward(self, batch, texts=None):
        """Two ways to call the model.

        ``model(images, texts)`` (open_clip's call): images (B, C, H, W) frontal views; texts the tokenizer's
        output (a dict with input_ids and attention_mask) or an input_ids tensor (padding: ``cfg.text.pad_token_id``). Returns
        ``(image_embeds, text_embeds, logit_scale)``, the embeddings L2-normalised; either input may be None.

        ``model(batch)`` (pretraining): batch = frontal (B,C,H,W), lateral (B,C,H,W) or absent, has_lateral
        (B,), input_ids, attention_mask, word_slots (B, L), n_full_series (int); optional ``has_lateral_host``
        (the CPU copy of has_lateral) or ``packing`` (:meth:`prepare_batch`) for a forward without host
        syncs. Returns a :class:`MedSTOutput` with everything the losses need.
        """
        if isinstance(batch, Mapping):
            if texts is not None:
                raise TypeError("model(batch) takes one pretraining batch dict; model(images, texts) takes tensors")
            return self._pretrain_forward(batch)
        return self._clip_forward(batch, texts)

    def _clip_forward(self, images, texts):
        img = None if images is None else self.encode_image(images)
        txt = None
        if texts is not None:
            if isinstance(texts, Mapping):
                ids, mask = texts["input_ids"], texts.get("attention_mask")
            else:
                ids, mask = texts, None
            if mask is None:
                mask = (ids != self.cfg.text.pad_token_id).long()
            txt = self.encode_text(ids, mask)
        return img, txt, self.logit_scale

    def _pretrain_forward(self, batch: Mapping[str, torch.Tensor]) -> MedSTOutput:
        frontal = batch["frontal"]
        lateral = batch.get("lateral")
        has_lat = batch.get("has_lateral")
        B = frontal.shape[0]
        if lateral is not None and not self.cfg.vision.lateral_expert:
            lateral, has_lat = None, None
        if lateral is not None and has_lat is None:
            has_lat = torch.ones(B, dtype=torch.bool, device=frontal.device)
        if self._packs(batch):
            plan = batch.get("packing")
            if plan is None:
                plan = self.prepare_batch(batch)["packing"]
            cls, patches = self.visual(frontal, lateral, has_lat, packed=True, plan=plan)
        else:
            cls, patches = self.visual(frontal, lateral, has_lat)
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
        dev = frontal.device.type
        amp = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        return MedSTOutput(img_g, txt_g, patch_l, word_l, patch_mask, word_mask,
                           int(batch.get("n_full_series", 0)), cls, amp)


def _lock_groups(groups, unlocked: int, name: str):
    """requires_grad False for every parameter of groups[:-unlocked] (all when 0); returns those groups."""
    if isinstance(unlocked, bool) or not isinstance(unlocked, int) or not 0 <= unlocked <= len(groups):
        raise ValueError(f"{name} must be an integer in 0..{len(groups)}, got {unlocked!r}")
    locked = groups[: len(groups) - unlocked]
    for g in groups:
        for item in g:
            params = [item] if isinstance(item, nn.Parameter) else list(item.parameters())
            for p in params:
                p.requires_grad_(not any(g is lg for lg in locked))
    return locked


class _FrozenStatsBatchNorm(nn.Module):
    """Marker mixin: a BatchNorm that stays in eval mode (running statistics used, never updated)."""

    def train(self, mode: bool = True):
        return super().train(False)


_FROZEN_CLASSES = {}


def _freeze_batchnorm_stats(module: nn.Module) -> None:
    # Swapping the class (not the module) keeps the parameter and buffer names, so state dicts, optimizers
    # and checkpoints are unaffected; the subclass only pins the module's training flag to False.
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, _FrozenStatsBatchNorm):
            base = type(m)
            if base not in _FROZEN_CLASSES:
                _FROZEN_CLASSES[base] = type(f"Frozen{base.__name__}", (_FrozenStatsBatchNorm, base), {})
            m.__class__ = _FROZEN_CLASSES[base]
            m.train(False)
