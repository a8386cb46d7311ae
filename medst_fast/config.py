"""Model configuration as dataclasses, with JSON round-trip.

The numbers default to the paper's model (medst-spec.md §1): ViT-B/16 at 224 px, the 6-layer
BioClinicalBERT of MGCA's config, 768 -> 2048 -> 128 projection heads.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict


@dataclass
class VisionCfg:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3  # DeiT/MGCA weights expect RGB; grey input is folded into the conv (see move_vit)
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    ln_eps: float = 1e-6
    lateral_expert: bool = True  # MoVE: a second FFN (+ its LayerNorm) per block for lateral tokens

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


@dataclass
class TextCfg:
    vocab_size: int = 28996
    hidden: int = 768
    layers: int = 6  # Med-ST/MGCA keep only the first 6 BioClinicalBERT layers
    heads: int = 12
    intermediate: int = 3072
    max_position: int = 512
    ln_eps: float = 1e-12
    hidden_dropout: float = 0.1  # BERT's dropouts are active during Med-ST pretraining
    attn_dropout: float = 0.1
    pad_token_id: int = 0
    max_length: int = 112  # tokens per report (official pretrain_dataset.py)
    # The official BLIP-derived BERT has no token-type embedding; HF checkpoints that carry one drop it.
    token_type: bool = False


@dataclass
class HeadCfg:
    embed_dim: int = 128
    hidden: int = 2048


@dataclass
class LossCfg:
    tau_global: float = 0.07
    tau_local: float = 0.1
    tau_temporal: float = 0.1
    variance_lambda: float = 0.001
    huber_delta: float = 2.0
    series_len: int = 4
    lambda_ita: float = 1.0
    lambda_local: float = 1.0
    lambda_temporal: float = 1.0
    # The two halves of the temporal loss (the official sums them with weight 1): an ablation knob.
    lambda_fmc: float = 1.0
    lambda_rmr: float = 1.0


@dataclass
class MedSTConfig:
    vision: VisionCfg = field(default_factory=VisionCfg)
    text: TextCfg = field(default_factory=TextCfg)
    head: HeadCfg = field(default_factory=HeadCfg)
    loss: LossCfg = field(default_factory=LossCfg)
    # faithful=True reproduces what the official code computes, quirks included (medst-spec §2.2 (b)-(c),
    # §6.1 item 12): absent-lateral tokens and PAD word slots take part in the local loss and in the
    # local heads' BatchNorm, and every text token uses position row 0. The default masks absent laterals
    # and PAD words and gives tokens their real positions.
    faithful: bool = False

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "MedSTConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"MedSTConfig: unknown fields {sorted(unknown)}")
        sub = {"vision": VisionCfg, "text": TextCfg, "head": HeadCfg, "loss": LossCfg}
        for k, typ in sub.items():
            if k in d and isinstance(d[k], dict):
                d[k] = _build(typ, d[k], k)
        return cls(**d)

    def to_json(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, path) -> "MedSTConfig":
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        d.pop("model_name", None)
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def replace(self, **overrides) -> "MedSTConfig":
        """Copy with overrides; nested fields with dotted keys or dicts (``vision={'depth': 2}``)."""
        d = self.to_dict()
        for k, v in overrides.items():
            if v is None:
                continue
            if "." in k:
                top, sub = k.split(".", 1)
                if top not in d or not isinstance(d[top], dict) or sub not in d[top]:
                    raise ValueError(f"unknown config override {k!r}")
                d[top][sub] = v
            elif isinstance(v, dict) and isinstance(d.get(k), dict):
                bad = set(v) - set(d[k])
                if bad:
                    raise ValueError(f"unknown config override {k}.{sorted(bad)}")
                d[k].update(v)
            elif k in d:
                d[k] = v
            else:
                raise ValueError(f"unknown config override {k!r}")
        return MedSTConfig.from_dict(d)


def _build(typ, d, name):
    known = {f.name for f in dataclasses.fields(typ)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"{name}: unknown fields {sorted(unknown)}")
    return typ(**d)
