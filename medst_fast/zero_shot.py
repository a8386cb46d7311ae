"""Zero-shot classification with open_clip's two calls: ``build_zero_shot_classifier`` and ``zero_shot_logits``.

A class's text embedding is the normalised mean of its prompts' embeddings. open_clip normalises each prompt
embedding before the mean (``normalize_prompts=True``, the default); BioViL's protocol, which the RSNA task
follows, averages the unnormalised ones (``normalize_prompts=False``). The classifier is an (E, C) matrix of
unit columns, so ``image_embeddings @ classifier`` is the cosine to each class.
"""
from __future__ import annotations

from typing import Callable, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .eval.metrics import require_finite

Template = Union[str, Callable[[str], str]]


def _prompts_per_class(classnames, templates) -> List[List[str]]:
    if isinstance(classnames, Mapping):
        if templates is not None:
            raise ValueError("give templates or a mapping of class -> prompts, not both")
        out = [list(v) if not isinstance(v, str) else [v] for v in classnames.values()]
    else:
        if isinstance(classnames, str):
            raise TypeError("classnames must be a sequence of names, not one string")
        if not templates:
            raise ValueError("templates: give at least one template (e.g. 'there is {}') or a mapping of "
                             "class -> prompts as classnames")
        out = [[t(c) if callable(t) else t.format(c) for t in templates] for c in classnames]
    for i, prompts in enumerate(out):
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError(f"class {i}: needs a non-empty list of non-empty prompt strings, got {prompts!r}")
    if not out:
        raise ValueError("no classes given")
    return out


@torch.inference_mode()
def build_zero_shot_classifier(model, tokenizer, classnames: Union[Sequence[str], Mapping[str, Sequence[str]]],
                               templates: Optional[Sequence[Template]] = None, *, normalize_prompts: bool = True,
                               preprocess: Optional[Callable[[str], str]] = None, batch_size: int = 256,
                               device=None, name: str = "zero_shot") -> torch.Tensor:
    """Class text embeddings as an (E, C) matrix of unit columns.

    Args:
        classnames: class names, each put into every template; or a mapping class -> its own prompts
            (then ``templates`` is None), as BioViL's pneumonia / no-pneumonia sentences are.
        templates: format strings with one ``{}`` or callables name -> prompt (open_clip's).
        normalize_prompts: normalise each prompt embedding before the mean (open_clip); False averages the
            raw projections (BioViL / the RSNA protocol).
        preprocess: applied to every prompt first (e.g. the report cleaning the model was trained with).
        name: names the caller in errors (a NaN prompt embedding is an error, never a class vector).
    """
    per_class = _prompts_per_class(classnames, templates)
    device = device or next(model.parameters()).device
    cols = []
    for prompts in per_class:
        texts = [preprocess(p) for p in prompts] if preprocess else list(prompts)
        embs = []
        for s in range(0, len(texts), batch_size):
            enc = tokenizer(texts[s:s + batch_size])
            embs.append(model.encode_text(enc["input_ids"].to(device), enc["attention_mask"].to(device),
                                          normalize=normalize_prompts).float())
        e = torch.cat(embs)
        require_finite(e.cpu().numpy(), "prompt embeddings", name, names=[repr(p) for p in prompts])
        cols.append(F.normalize(e.mean(0), dim=0))
    return torch.stack(cols, dim=1)


@torch.inference_mode()
def zero_shot_logits(model, classifier: torch.Tensor, images: torch.Tensor, logit_scale: Optional[float] = None,
                     lateral: Optional[torch.Tensor] = None, has_lateral: Optional[torch.Tensor] = None
                     ) -> torch.Tensor:
    """(B, C) logits: ``logit_scale * cosine(image, class)``.

    Args:
        images: (B, C, H, W) model input (the eval transform's output, stacked), or (B, E) image embeddings
            already computed by ``encode_image`` (unit rows).
        logit_scale: default 1 / ``model.cfg.loss.tau_global``, the scale the model was trained with (open_clip
            uses its learned scale the same way); 1.0 gives plain cosines.
        lateral, has_lateral: the study's lateral views (MoVE models), for image input only.
    """
    if images.dim() == 4:
        emb = model.encode_image(images, lateral, has_lateral)
    elif images.dim() == 2:
        if lateral is not None:
            raise ValueError("lateral views go with images, not with precomputed embeddings")
        emb = images
    else:
        raise ValueError(f"images must be (B, C, H, W) or (B, E) embeddings, got shape {tuple(images.shape)}")
    if emb.shape[-1] != classifier.shape[0]:
        raise ValueError(f"embedding width {emb.shape[-1]} does not match the classifier's {classifier.shape[0]} "
                         "(built with another model?)")
    scale = 1.0 / model.cfg.loss.tau_global if logit_scale is None else float(logit_scale)
    logits = scale * (emb.float() @ classifier.to(emb.device).float())
    return logits


def predict(logits: torch.Tensor) -> np.ndarray:
    """Class index per row; NaN logits are an error (argmax would quietly pick class 0)."""
    a = require_finite(logits.detach().cpu().numpy(), "logits", "zero_shot")
    return a.argmax(-1)
