"""A local contrast across images (docs/method.md §8.4): a research term beside Med-ST's loss
(``loss.lambda_cross_local``).

Med-ST's local loss (kernels/local_align.py) contrasts a word only with the other words of its own report
(docs/method.md §3.2.4): nothing asks a word to point at what tells its image from the others, and on the synthetic
set its maps do not ground. This term does (GLoRIA/FILIP-like): every report ``r`` reads every image ``i``
of the batch through word-to-patch attention, and a symmetric InfoNCE over the (report, image) scores wants
each report to score its own image highest.

    w = normalize(word_local) (B, Tw, d), p = normalize(patch_local) (B, Tp, d), fp32
    ctx[r, i, t] = normalize(sum_j softmax_j(w[r, t] . p[i, j] / tau_local) p[i, j])   (image i's valid patches)
    score[r, i]  = mean over report r's valid words t of w[r, t] . ctx[r, i, t]
    loss = CE(score / tau_global, arange(B)) + CE(score.T / tau_global, arange(B))

Under DDP the contrast runs within the rank's batch (no gather): the B x B pairs are this rank's.

Masks are bool, True = valid (``word_mask`` (B, Tw), ``patch_mask`` (B, Tp)); None = every slot valid. Each
report needs one valid word and each image one valid patch (the model always gives [SEP] and the frontal's
patches). An empty one is a ValueError on CPU tensors; on CUDA it is not checked (the check is a host sync
each step) and gives a NaN loss, which the trainer counts as a bad step.

``cross_local_loss_ref`` is the plain PyTorch reference (explicit einsum and softmax, the (B, Tw, B, Tp)
attention in memory). ``cross_local_loss`` runs the attention through
``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on CUDA), a chunk of
images at a time, so memory stays within a budget whatever B.

Precision (``compute_dtype``, as kernels/local_align.py): None or fp32 is exact fp32. bf16 / fp16 give the
attention's operands (words, patches) in that dtype, its output rounded to it, as SDPA computes; the
normalisations, the word-to-context products and the cross-entropies stay fp32. The reference is fp32 only:
the accuracy tests compare the low-precision path with it and with the same maths run in plain torch bf16.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ._utils import check_compute_dtype

_WHERE = "kernels/cross_local.py"
# Elements (fp32) one chunk of images may hold at once. Per image a chunk holds the B*Tw x Tp scores (the math
# backend, used on CPU, materialises them and then the probabilities in their place), the B*Tw x d query copy
# and two B*Tw x d contexts (SDPA's output and its normalised copy): 2^26 elements is 256 MiB, small beside a
# ViT-B step's activations.
CHUNK_BUDGET_ELEMS = 1 << 26


def _compute_dtype(compute_dtype: Optional[torch.dtype]) -> torch.dtype:
    return torch.float32 if compute_dtype is None else check_compute_dtype(compute_dtype, _WHERE)


def _bad(field, want, got):
    raise ValueError(f"{_WHERE}: {field} must be {want}, got {got}")


def _check_tau(name: str, v) -> None:
    if not float(v) > 0:
        _bad(name, "> 0", v)


def _check_inputs(word, patch, word_mask, patch_mask, tau_local) -> None:
    if word.dim() != 3 or patch.dim() != 3:
        _bad("word, patch", "(B, Tw, d) and (B, Tp, d)", f"{tuple(word.shape)} and {tuple(patch.shape)}")
    if patch.shape[0] != word.shape[0] or patch.shape[2] != word.shape[2]:
        _bad("word, patch", "(B, Tw, d) and (B, Tp, d) with the same B and d",
             f"{tuple(word.shape)} and {tuple(patch.shape)}")
    if word.shape[0] < 1 or word.shape[1] < 1 or patch.shape[1] < 1:
        _bad("word, patch", "non-empty (B, Tw, Tp >= 1)", f"{tuple(word.shape)} and {tuple(patch.shape)}")
    for name, m, t in (("word_mask", word_mask, word), ("patch_mask", patch_mask, patch)):
        if m is not None and (m.dtype != torch.bool or m.shape != t.shape[:2]):
            _bad(name, f"None or bool {tuple(t.shape[:2])}", f"{m.dtype} {tuple(m.shape)}")
    _check_tau("tau_local", tau_local)
    # No host sync on CUDA (see the module docstring); on CPU the check is free, except under torch.compile,
    # where reading a tensor's value on the host is a graph break (the eager run of the same batch checks it).
    if torch.compiler.is_compiling():
        return
    for name, m, what in (("word_mask", word_mask, "report"), ("patch_mask", patch_mask, "image")):
        if m is not None and m.device.type == "cpu" and not bool(m.any(1).all()):
            rows = (~m.any(1)).nonzero().flatten().tolist()
            _bad(name, f"True somewhere in every row (each {what} needs a valid slot)", f"empty rows {rows}")


def _symmetric_infonce(score: torch.Tensor, tau_global: float) -> torch.Tensor:
    labels = torch.arange(score.shape[0], device=score.device)
    return F.cross_entropy(score / tau_global, labels) + F.cross_entropy(score.T / tau_global, labels)


def _word_weights(word_mask: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """(B, Tw) fp32: 1 / (valid words of the report) on valid words, 0 on PAD: the mean over valid words."""
    if word_mask is None:
        return like.new_full(like.shape[:2], 1.0 / like.shape[1], dtype=torch.float32)
    m = word_mask.float()
    return m / m.sum(1, keepdim=True).clamp_min(1.0)


def cross_local_scores_ref(word: torch.Tensor, patch: torch.Tensor, word_mask: Optional[torch.Tensor] = None,
                           patch_mask: Optional[torch.Tensor] = None, tau_local: float = 0.1) -> torch.Tensor:
    """score (B reports, B images) in plain fp32 PyTorch (module docstring); builds the (B, Tw, B, Tp)
    attention."""
    _check_inputs(word, patch, word_mask, patch_mask, tau_local)
    w, p = F.normalize(word.float(), dim=-1), F.normalize(patch.float(), dim=-1)
    s = torch.einsum("rte,ije->rtij", w, p) / tau_local  # report r's word t against image i's patch j
    if patch_mask is not None:
        s = s.masked_fill(~patch_mask[None, None], float("-inf"))
    att = torch.softmax(s, dim=-1)
    ctx = F.normalize(torch.einsum("rtij,ije->rtie", att, p), dim=-1)
    cos = torch.einsum("rte,rtie->rti", w, ctx)
    return (cos * _word_weights(word_mask, w)[:, :, None]).sum(1)


def cross_local_loss_ref(word: torch.Tensor, patch: torch.Tensor, word_mask: Optional[torch.Tensor] = None,
                         patch_mask: Optional[torch.Tensor] = None, tau_local: float = 0.1,
                         tau_global: float = 0.07) -> torch.Tensor:
    """The cross-image local contrast in plain fp32 PyTorch: the symmetric InfoNCE of
    :func:`cross_local_scores_ref` (which checks the other inputs)."""
    _check_tau("tau_global", tau_global)
    score = cross_local_scores_ref(word, patch, word_mask, patch_mask, tau_local)
    return _symmetric_infonce(score, float(tau_global))


def default_chunk(B: int, Tw: int, Tp: int, d: int, budget: int = CHUNK_BUDGET_ELEMS) -> int:
    """Images per chunk: as many as keep one chunk's attention within ``budget`` elements (at least 1)."""
    per_image = B * Tw * (Tp + 3 * d)  # see CHUNK_BUDGET_ELEMS
    return max(1, min(B, budget // max(per_image, 1)))


def _score_columns(w, p, wt, pm, scale: float, ct: torch.dtype) -> torch.Tensor:
    """score[:, chunk] (B, C) for the C images ``p`` (C, Tp, d) against every report ``w`` (B, Tw, d).

    The attention of a word over an image does not depend on the other words, so one SDPA call per image
    takes every report's words as one query sequence of B*Tw rows: the C images are SDPA's batch."""
    B, Tw, d = w.shape
    C = p.shape[0]
    # A real copy per image, not a stride-0 expand: the fused CUDA kernels are documented for dense inputs
    # (untested here without a GPU), and the copy is B*Tw*d per image, inside default_chunk's budget.
    q = w.to(ct).reshape(1, 1, B * Tw, d).expand(C, 1, B * Tw, d).contiguous()
    kv = p.to(ct)[:, None]  # (C, 1, Tp, d)
    mask = None if pm is None else pm[:, None, None, :]  # (C, 1, 1, Tp), broadcast over the query rows
    ctx = F.scaled_dot_product_attention(q, kv, kv, attn_mask=mask, scale=scale)  # (C, 1, B*Tw, d)
    ctx = F.normalize(ctx.float(), dim=-1).reshape(C, B, Tw, d)
    cos = torch.einsum("btd,cbtd->bct", w, ctx)
    return (cos * wt[:, None, :]).sum(-1)


def cross_local_scores(word: torch.Tensor, patch: torch.Tensor, word_mask: Optional[torch.Tensor] = None,
                       patch_mask: Optional[torch.Tensor] = None, tau_local: float = 0.1,
                       compute_dtype: Optional[torch.dtype] = None, chunk: Optional[int] = None) -> torch.Tensor:
    """score (B reports, B images) through SDPA, a chunk of images at a time (module docstring).

    Pass ``patch_mask=None`` when every patch is valid: SDPA can then pick its flash kernel on CUDA.
    ``chunk``: images per chunk (None: :func:`default_chunk`). With more than one chunk each chunk runs under
    activation checkpointing, so only the (B, B) scores are kept for the backward, which recomputes one chunk
    at a time: peak memory stays one chunk's, at the cost of a second attention forward."""
    _check_inputs(word, patch, word_mask, patch_mask, tau_local)
    ct = _compute_dtype(compute_dtype)
    B, Tw, d = word.shape
    Tp = patch.shape[1]
    if chunk is None:
        chunk = default_chunk(B, Tw, Tp, d)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"{_WHERE}: chunk must be None or an integer >= 1, got {chunk!r}")
    w, p = F.normalize(word.float(), dim=-1), F.normalize(patch.float(), dim=-1)
    wt = _word_weights(word_mask, w)
    scale = 1.0 / float(tau_local)
    starts = range(0, B, chunk)
    recompute = len(starts) > 1 and torch.is_grad_enabled() and (w.requires_grad or p.requires_grad)
    cols = []
    for i0 in starts:
        pc = p[i0:i0 + chunk]
        pm = None if patch_mask is None else patch_mask[i0:i0 + chunk]
        if recompute:
            cols.append(checkpoint(_score_columns, w, pc, wt, pm, scale, ct, use_reentrant=False))
        else:
            cols.append(_score_columns(w, pc, wt, pm, scale, ct))
    return torch.cat(cols, dim=1)


def cross_local_loss(word: torch.Tensor, patch: torch.Tensor, word_mask: Optional[torch.Tensor] = None,
                     patch_mask: Optional[torch.Tensor] = None, tau_local: float = 0.1, tau_global: float = 0.07,
                     compute_dtype: Optional[torch.dtype] = None, chunk: Optional[int] = None) -> torch.Tensor:
    """The cross-image local contrast (module docstring): the symmetric InfoNCE of :func:`cross_local_scores`,
    the same value and gradients as :func:`cross_local_loss_ref` without its (B, Tw, B, Tp) tensor.
    :func:`cross_local_scores` checks the other inputs."""
    _check_tau("tau_global", tau_global)
    score = cross_local_scores(word, patch, word_mask, patch_mask, tau_local, compute_dtype, chunk)
    return _symmetric_infonce(score, float(tau_global))
