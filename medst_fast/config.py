"""Model configuration as dataclasses, with JSON round-trip.

The numbers default to the paper's model (docs/method.md §2): ViT-B/16 at 224 px, the 6-layer
BioClinicalBERT of MGCA's config, 768 -> 2048 -> 128 projection heads.

Every field is type- and range-checked when a config is built (``__post_init__``), whatever the source
(code, a model JSON, config.json of an export, --model-override): JSON's ``"false"`` is a string, and a
string where a bool belongs would otherwise read as true. Errors name the field (``vision.img_size``);
the JSON readers add the file.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import typing
from dataclasses import dataclass, field
from typing import Any, Dict


def _check_types(obj, section: str) -> None:
    """Each field must hold its annotated type (ints are not bools, floats accept ints); floats normalised."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        v, t = getattr(obj, f.name), hints[f.name]
        name = f"{section}.{f.name}" if section else f.name
        if t is bool:
            ok, want = isinstance(v, bool), "true or false"
        elif t is int:
            ok, want = isinstance(v, numbers.Integral) and not isinstance(v, bool), "an integer"
            if ok:
                setattr(obj, f.name, int(v))
        elif t is float:
            ok, want = isinstance(v, numbers.Real) and not isinstance(v, bool), "a number"
            if ok:
                setattr(obj, f.name, float(v))
                ok = math.isfinite(float(v))
                want = "a finite number"
        elif t is str:
            ok, want = isinstance(v, str), "a string"
        else:
            ok, want = isinstance(v, t), f"an object of {t.__name__} fields"
        if not ok:
            raise ValueError(f"field {name!r}: expected {want}, got {v!r} ({type(v).__name__})")


def _require(ok: bool, section: str, name: str, rule: str, value) -> None:
    if not ok:
        raise ValueError(f"field '{section}.{name}': must be {rule}, got {value!r}")


def _positive_ints(obj, section: str, names) -> None:
    for n in names:
        _require(getattr(obj, n) >= 1, section, n, ">= 1", getattr(obj, n))


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

    def __post_init__(self):
        _check_types(self, "vision")
        _positive_ints(self, "vision", ("img_size", "patch_size", "in_chans", "width", "depth", "heads"))
        _require(self.img_size >= self.patch_size, "vision", "img_size", f">= patch_size {self.patch_size}", self.img_size)
        _require(self.width % self.heads == 0, "vision", "width", f"a multiple of heads {self.heads}", self.width)
        _require(self.mlp_ratio > 0, "vision", "mlp_ratio", "> 0", self.mlp_ratio)
        _require(self.ln_eps > 0, "vision", "ln_eps", "> 0", self.ln_eps)

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

    def __post_init__(self):
        _check_types(self, "text")
        _positive_ints(self, "text", ("vocab_size", "hidden", "layers", "heads", "intermediate", "max_position",
                                      "max_length"))
        _require(self.hidden % self.heads == 0, "text", "hidden", f"a multiple of heads {self.heads}", self.hidden)
        _require(self.ln_eps > 0, "text", "ln_eps", "> 0", self.ln_eps)
        for n in ("hidden_dropout", "attn_dropout"):
            _require(0.0 <= getattr(self, n) < 1.0, "text", n, "in [0, 1)", getattr(self, n))
        _require(0 <= self.pad_token_id < self.vocab_size, "text", "pad_token_id",
                 f"in [0, vocab_size {self.vocab_size})", self.pad_token_id)
        _require(self.max_length <= self.max_position, "text", "max_length",
                 f"<= max_position {self.max_position}", self.max_length)


@dataclass
class HeadCfg:
    embed_dim: int = 128
    hidden: int = 2048

    def __post_init__(self):
        _check_types(self, "head")
        _positive_ints(self, "head", ("embed_dim", "hidden"))


LOCAL_WEIGHTINGS = ("learned", "uniform")
LOCAL_SCOPES = ("sample", "batch")


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
    # Research switches (docs/method.md §8); the defaults are the paper's loss. temporal_shuffle: each complete
    # series' study order is permuted (images and reports alike) before the temporal loss, the control that
    # tells temporal learning from dataset bias. local_weighting "uniform": the local loss weights the valid
    # tokens equally instead of by the learned 1-head attention. local_scope "batch": each token's context
    # comes from the tokens of every sample in the batch, not only its own (kernels/local_align.py).
    temporal_shuffle: bool = False
    local_weighting: str = "learned"
    local_scope: str = "sample"
    # Research switch for grounding (docs/method.md §8.4): the weight of a local contrast ACROSS images (kernels/
    # cross_local.py), each report's words against every image's patches of the batch, added to the loss.
    # Med-ST's local loss contrasts a word only with its own report's words (docs/method.md §3.2.4), which does not
    # ground on the synthetic set; this term does. 0 is the paper's loss.
    lambda_cross_local: float = 0.0

    def __post_init__(self):
        _check_types(self, "loss")
        for n in ("tau_global", "tau_local", "tau_temporal", "huber_delta"):
            _require(getattr(self, n) > 0, "loss", n, "> 0", getattr(self, n))
        for n in ("variance_lambda", "lambda_ita", "lambda_local", "lambda_temporal", "lambda_fmc", "lambda_rmr",
                  "lambda_cross_local"):
            _require(getattr(self, n) >= 0, "loss", n, ">= 0", getattr(self, n))
        _positive_ints(self, "loss", ("series_len",))
        _require(self.local_weighting in LOCAL_WEIGHTINGS, "loss", "local_weighting", f"one of {LOCAL_WEIGHTINGS}",
                 self.local_weighting)
        _require(self.local_scope in LOCAL_SCOPES, "loss", "local_scope", f"one of {LOCAL_SCOPES}", self.local_scope)


@dataclass
class MedSTConfig:
    vision: VisionCfg = field(default_factory=VisionCfg)
    text: TextCfg = field(default_factory=TextCfg)
    head: HeadCfg = field(default_factory=HeadCfg)
    loss: LossCfg = field(default_factory=LossCfg)
    # faithful=True reproduces what the official code computes, quirks included (docs/method.md §6.1.1, §6.1.2,
    # §6.1.4): absent-lateral tokens and PAD word slots take part in the local loss and in the
    # local heads' BatchNorm, and every text token uses position row 0. The default masks absent laterals
    # and PAD words and gives tokens their real positions.
    faithful: bool = False

    def __post_init__(self):
        _check_types(self, "")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "MedSTConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)} (known: {sorted(known)})")
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
        if not isinstance(d, dict):
            raise ValueError(f"{path}: top level must be an object of config fields")
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
        raise ValueError(f"{name}: unknown fields {sorted(unknown)} (known: {sorted(known)})")
    return typ(**d)
