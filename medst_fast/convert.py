"""Drop-in loading: official Med-ST / MGCA Lightning checkpoints, timm/DeiT ViT-B, Hugging Face BERT.

Every loader reads with ``torch.load(weights_only=True)`` or safetensors, so no pickled code runs. Keys
that the official model creates but never uses are dropped with a note (docs/method.md §2.3, §6.3.4).
"""
from __future__ import annotations

import argparse
import logging
import os
import re
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from .hub import from_pretrained, is_save_pretrained_folder
from .weights import HASH_SUFFIX, WEIGHTS, read_verified_safetensors
from .weights import load_checkpoint as load_training_checkpoint

log = logging.getLogger("medst_fast")

# Official module prefix -> medst_fast prefix (the official names come from the public code's modules).
_OFFICIAL_PREFIX = [
    ("img_encoder_q.model.", "visual."),
    ("img_encoder_q.global_embed.", "visual_global_head."),
    ("img_encoder_q.local_embed.", "visual_local_head."),
    ("text_encoder_q.model.", "text."),
    ("text_encoder_q.global_embed.", "text_global_head."),
    ("text_encoder_q.local_embed.", "text_local_head."),
    ("word_element_wise_multi_head.", "word_weighting."),
    ("patch_element_wise_multi_head.", "patch_weighting."),
]
# Created by the official model but never used by its forward or loss.
_OFFICIAL_UNUSED = [
    (re.compile(r"^img_encoder_q\.(global_embed_la|local_embed_la)\."), "lateral heads created but never used"),
    (re.compile(r"\.crossattention\."), "BERT cross-attention (text mode never runs it)"),
    (re.compile(r"^text_encoder_q\.model\.pooler\."), "BERT pooler (the CLS hidden state is used instead)"),
    (re.compile(r"position_ids$"), "position-id buffer"),
    (re.compile(r"^(patch|word)_local_atten_layer\."), "MGCA's local attention layers (use_local_atten=False)"),
    (re.compile(r"^prototype_layer\."), "MGCA's prototype layer"),
    (re.compile(r"^img_encoder_q\.model\.head\."), "ViT classification head"),
]


def read_checkpoint(path: str) -> Tuple[Dict[str, torch.Tensor], Optional[dict]]:
    """Tensors of a checkpoint file and, when the file carries one, its medst_fast model config (a dict).

    A training checkpoint of ``python -m medst_fast.pretrain`` (``ckpt-*.pt`` with its ``.sha256``) is read
    through the trainer's verified loader and brings its config, so a model with another vocabulary size or
    depth is rebuilt as trained. Everything else: see ``read_state_dict``.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return _read_folder(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint not found")
    if path.endswith(".safetensors"):
        return read_verified_safetensors(path), None  # content-hash check when the file carries one
    if os.path.isfile(path + HASH_SUFFIX):  # the trainer's: size and sha256 checked before unpickling
        state = load_training_checkpoint(path)
        cfg = state.get("config")
        return _tensors(state["model"], path), cfg if isinstance(cfg, dict) else None
    try:
        # Lightning checkpoints keep their argparse hyper-parameters as a Namespace: plain data, allowed.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(
            f"{path}: cannot be loaded safely ({msg}). medst_fast reads checkpoints with weights_only=True; "
            "if the file is a trusted checkpoint that pickles other objects, extract its tensors once with "
            "torch.save(torch.load(p, weights_only=False)['state_dict'], 'out.pt') and load that instead."
        ) from None
    cfg = obj.get("config") if isinstance(obj, Mapping) and isinstance(obj.get("config"), Mapping) else None
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    return _tensors(obj, path), None if cfg is None or "vision" not in cfg else dict(cfg)


def _read_folder(path: str) -> Tuple[Dict[str, torch.Tensor], Optional[dict]]:
    """A ``save_pretrained`` folder (its verified weights and config) or a Hugging Face folder (weights only).

    A run's ``final/`` is as good a starting point as the checkpoint it came from, so ``--init`` takes it.
    """
    if is_save_pretrained_folder(path):  # loaded whole: every file verified, its config checked against the weights
        model = from_pretrained(path)
        if getattr(model, "components", None):
            raise ValueError(f"{path}: a partial export holding only {model.components}; give the full model "
                             "folder (the trainer's final/, not final_encoder/)")
        return {k: v.detach() for k, v in model.state_dict().items()}, model.cfg.to_dict()
    for name in (WEIGHTS, "pytorch_model.bin"):
        if os.path.isfile(os.path.join(path, name)):
            return read_checkpoint(os.path.join(path, name))[0], None
    raise FileNotFoundError(f"{path}: a folder without {WEIGHTS} or pytorch_model.bin (expected a save_pretrained "
                            "folder such as a run's final/, or a checkpoint file)")


def _tensors(obj, path: str) -> Dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: no state dict found (top-level object is {type(obj).__name__})")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Read tensors from .safetensors (content hash verified when present) or a torch pickle, never executing
    pickled code."""
    return read_checkpoint(path)[0]


def _strip_wrappers(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Drop DDP (``module.``) and torch.compile (``_orig_mod.``) prefixes."""
    out = {}
    for k, v in sd.items():
        while k.startswith(("module.", "_orig_mod.")):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def _fix_local_head(k: str, v: torch.Tensor) -> torch.Tensor:
    # The official local heads are Conv1d(k=1): (out, in, 1) -> Linear (out, in).
    if "_local_head.head." in k and k.endswith("weight") and v.dim() == 3:
        return v.squeeze(-1)
    return v


def convert_medst_checkpoint(sd: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Map official Med-ST (or MGCA, same module names) keys to medst_fast keys.

    Returns (converted state dict, notes on dropped keys). Unknown keys are kept under their own name so
    the load reports them as unexpected.
    """
    out, notes = {}, {}
    for k, v in _strip_wrappers(sd).items():
        reason = next((why for rx, why in _OFFICIAL_UNUSED if rx.search(k)), None)
        if reason:
            notes.setdefault(reason, 0)
            notes[reason] += 1
            continue
        nk = k
        for a, b in _OFFICIAL_PREFIX:
            if k.startswith(a):
                nk = b + k[len(a):]
                break
        out[nk] = _fix_local_head(nk, v)
    return out, [f"dropped {n} tensors: {why}" for why, n in notes.items()]


def convert_timm_vit(sd: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """timm / DeiT ``vit_base_patch16_224`` state dict -> ``visual.*`` (classifier heads dropped)."""
    out, dropped = {}, []
    for k, v in _strip_wrappers(sd).items():
        if k.startswith(("head.", "head_dist.", "fc_norm.", "pre_logits.")) or k in ("dist_token",):
            dropped.append(k)
            continue
        out["visual." + k] = v
    notes = [f"dropped {len(dropped)} classifier tensors"] if dropped else []
    if "visual.pos_embed" in out and "dist_token" in dropped:
        raise ValueError("distilled DeiT checkpoints (dist_token) have 198 positions; use the plain DeiT-B")
    return out, notes


_HF_LN = [(".gamma", ".weight"), (".beta", ".bias")]


def convert_hf_bert(sd: Mapping[str, torch.Tensor], num_layers: int, token_type: bool = False
                    ) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Hugging Face ``BertModel``/``BertForPreTraining`` weights -> ``text.*``.

    Layers at or above ``num_layers`` are dropped (Med-ST keeps the first 6 of BioClinicalBERT's 12).
    """
    out, notes = {}, {}

    def note(why):
        notes[why] = notes.get(why, 0) + 1

    for k, v in sd.items():
        if k.startswith("bert."):
            k = k[5:]
        for a, b in _HF_LN:
            if "LayerNorm" in k and k.endswith(a):
                k = k[: -len(a)] + b
        if k.startswith(("cls.", "pooler.")) or k.endswith("position_ids"):
            note("pre-training heads / pooler / buffers")
            continue
        if "token_type_embeddings" in k and not token_type:
            note("token-type embedding (Med-ST's BERT has none)")
            continue
        m = re.match(r"encoder\.layer\.(\d+)\.", k)
        if m and int(m.group(1)) >= num_layers:
            note(f"layers >= {num_layers} (Med-ST uses the first {num_layers})")
            continue
        if ".crossattention." in k:
            note("cross-attention")
            continue
        out["text." + k] = v
    return out, [f"dropped {n} tensors: {why}" for why, n in notes.items()]


_HF_TEXT_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "hidden", "num_hidden_layers": "layers",
                   "num_attention_heads": "heads", "intermediate_size": "intermediate",
                   "max_position_embeddings": "max_position", "layer_norm_eps": "ln_eps", "pad_token_id": "pad_token_id",
                   "hidden_dropout_prob": "hidden_dropout", "attention_probs_dropout_prob": "attn_dropout"}


def text_config_from_hf(config) -> Dict[str, object]:
    """``text`` overrides (for ``create_model(..., text=...)``) from a Hugging Face BERT config.json (path or dict).

    Only a plain BERT (``hidden_act`` gelu, absolute positions) maps onto the text tower; anything else is
    an error naming the field, since it would load but compute something else.
    """
    src = "<config>"
    if not isinstance(config, Mapping):
        src = os.fspath(config)
        if os.path.isdir(src):
            src = os.path.join(src, "config.json")
        import json

        with open(src) as f:
            config = json.load(f)
    for k, ok in (("hidden_act", ("gelu",)), ("position_embedding_type", ("absolute",))):
        if config.get(k, ok[0]) not in ok:
            raise ValueError(f"{src}: field {k!r} is {config[k]!r}; the text tower implements {ok[0]!r} only")
    return {ours: config[hf] for hf, ours in _HF_TEXT_FIELDS.items() if hf in config}


def _load(model, sd, allow_missing: Tuple[str, ...], source: str, notes: List[str]):
    model_sd = model.state_dict()
    unexpected = [k for k in sd if k not in model_sd]
    shape_bad = [f"{k}: {tuple(sd[k].shape)} vs {tuple(model_sd[k].shape)}"
                 for k in sd if k in model_sd and sd[k].shape != model_sd[k].shape]
    missing = [k for k in model_sd if k not in sd and not any(re.search(p, k) for p in allow_missing)]
    if unexpected or missing or shape_bad:
        raise ValueError(
            f"{source}: checkpoint does not fit the model.\n  missing: {missing}\n  unexpected: {unexpected}\n"
            f"  shape mismatch: {shape_bad}")
    model.load_state_dict(sd, strict=False)
    for n in notes:
        log.info("%s: %s", source, n)
    return notes


def load_official_checkpoint(model, path_or_sd, kind: str = "medst"):
    """Load an official Med-ST (``kind='medst'``) or MGCA (``kind='mgca'``) checkpoint into ``model``.

    MGCA has no lateral experts and no weighting attention: those keep their initialisation, as in the
    official recipe (docs/method.md §2.5).
    """
    src = path_or_sd if isinstance(path_or_sd, str) else "<state dict>"
    sd = read_state_dict(path_or_sd) if isinstance(path_or_sd, (str, os.PathLike)) else path_or_sd
    sd, notes = convert_medst_checkpoint(sd)
    allow = () if kind == "medst" else (r"\.mlp_l\.", r"\.norm2_l\.", r"^(word|patch)_weighting\.")
    if kind not in ("medst", "mgca"):
        raise ValueError(f"kind must be 'medst' or 'mgca', got {kind!r}")
    return _load(model, sd, allow, src, notes)


def load_timm_vit(model, path_or_sd):
    """DeiT/timm ViT-B weights into the image trunk (lateral experts and everything else stay)."""
    src = path_or_sd if isinstance(path_or_sd, str) else "<state dict>"
    sd = read_state_dict(path_or_sd) if isinstance(path_or_sd, (str, os.PathLike)) else path_or_sd
    sd, notes = convert_timm_vit(sd)
    allow = (r"^(?!visual\.)", r"\.mlp_l\.", r"\.norm2_l\.")
    return _load(model, sd, allow, src, notes)


def load_hf_bert(model, path):
    """A local Hugging Face BERT folder (config.json + model.safetensors or pytorch_model.bin)."""
    path = os.fspath(path)
    cands = [os.path.join(path, n) for n in ("model.safetensors", "pytorch_model.bin")] if os.path.isdir(path) else [path]
    found = [c for c in cands if os.path.isfile(c)]
    if not found:
        raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin")
    sd = read_state_dict(found[0])
    cfg = model.cfg.text
    sd, notes = convert_hf_bert(sd, cfg.layers, cfg.token_type)
    allow = (r"^(?!text\.)",)
    return _load(model, sd, allow, found[0], notes)


def load_checkpoint(model, path_or_sd):
    """Load any supported checkpoint (a file, or its tensors), detecting the layout from the key names."""
    src = os.fspath(path_or_sd) if isinstance(path_or_sd, (str, os.PathLike)) else "<state dict>"
    sd = read_state_dict(src) if isinstance(path_or_sd, (str, os.PathLike)) else dict(path_or_sd)
    keys = list(sd)
    if any(k.startswith(("img_encoder_q.", "text_encoder_q.")) for k in keys):
        kind = "medst" if any(".mlp_l." in k for k in keys) else "mgca"
        return load_official_checkpoint(model, sd, kind)
    if any(k.startswith(("visual.", "text.")) for k in _strip_wrappers(sd)):
        return _load(model, _strip_wrappers(sd), (), src, [])
    if any(k.startswith(("blocks.", "patch_embed.")) for k in keys):
        return load_timm_vit(model, sd)
    if any(k.startswith(("bert.", "embeddings.", "encoder.layer.")) for k in keys):
        sd2, notes = convert_hf_bert(sd, model.cfg.text.layers, model.cfg.text.token_type)
        return _load(model, sd2, (r"^(?!text\.)",), src, notes)
    raise ValueError(f"{src}: unrecognised checkpoint layout (first keys: {keys[:5]})")
