"""Med-ST losses (docs/method.md §3): global ITA, modality-weighted local alignment, temporal cycle, and the
research term ``loss.lambda_cross_local`` (a local contrast across images, kernels/cross_local.py; 0: off).

All read a :class:`~medst_fast.models.medst.MedSTOutput`. The local loss's learned weighting
(two 1-head attention modules) lives in the model because it is trained and checkpointed with it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .config import LossCfg
from .kernels.cross_local import cross_local_loss
from .kernels.local_align import token_align_loss


@dataclass
class LossOutput:
    total: torch.Tensor
    ita: torch.Tensor
    local: torch.Tensor
    temporal: torch.Tensor
    cross_local: torch.Tensor  # the unweighted cross-image local term; 0 when loss.lambda_cross_local is 0 (off)


def ita_loss(img: torch.Tensor, txt: torch.Tensor, tau: float = 0.07, offset: int = 0,
             img_all: Optional[torch.Tensor] = None, txt_all: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Symmetric InfoNCE, the two directions summed (official). Inputs L2-normalised (B, d).

    With ``img_all``/``txt_all`` (features gathered over ranks) the local rows are contrasted against
    every rank's columns; ``offset`` is this rank's first global row. CE is averaged over local rows.
    """
    if img_all is None:
        img_all, txt_all = img, txt
    labels = torch.arange(img.shape[0], device=img.device) + offset
    i2t = img.float() @ txt_all.float().t() / tau
    t2i = txt.float() @ img_all.float().t() / tau
    return F.cross_entropy(i2t, labels) + F.cross_entropy(t2i, labels)


def _pairwise_neg_sq_l2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """-max(|x|^2 + |y|^2 - 2 x.y, 0) for (S, T, d) x (S, T, d) -> (S, T, T), as TCC computes it."""
    d = (x * x).sum(-1)[:, :, None] + (y * y).sum(-1)[:, None, :] - 2 * torch.bmm(x, y.transpose(1, 2))
    return -d.clamp_min(0.0)


def cycle_alignment_loss(u: torch.Tensor, v: torch.Tensor, tau: float = 0.1, variance_lambda: float = 0.001,
                         huber_delta: float = 2.0, w_fmc: float = 1.0, w_rmr: float = 1.0) -> torch.Tensor:
    """One direction U -> V of Med-ST's temporal loss: w_fmc * FMC + w_rmr * RMR (docs/method.md §3.3; the official
    weights are 1 and 1). u, v: (S, T, d) series."""
    S, T, _ = u.shape
    u, v = u.float(), v.float()
    # FMC: T-way classification of the one-hop U -> V similarities against the identity.
    logits12 = _pairwise_neg_sq_l2(u, v) / tau  # (S, T, T)
    fmc = -torch.diagonal(F.log_softmax(logits12, dim=-1), dim1=1, dim2=2).mean()
    # RMR: soft nearest neighbour in V, cycle back to U, variance-aware regression of the time index.
    nn_v = torch.bmm(torch.softmax(logits12, dim=-1), v)
    beta = torch.softmax(_pairwise_neg_sq_l2(nn_v, u) / tau, dim=-1)  # (S, T, T)
    steps = torch.arange(T, device=u.device, dtype=torch.float32) / (T + 1e-7)
    true_t = steps[None, :].expand(S, T)
    pred_t = (beta * steps).sum(-1)
    var = (beta * (steps[None, None, :] - pred_t[..., None]) ** 2).sum(-1)
    log_var = torch.log(var + 1e-7)
    err = true_t - pred_t
    var_loss = torch.exp(-log_var) * err ** 2 + variance_lambda * log_var
    lin_loss = huber_delta * (err.abs() - 0.5 * huber_delta)
    rmr = torch.where(err.abs() < huber_delta, var_loss, lin_loss).mean()
    return w_fmc * fmc + w_rmr * rmr


def series_permutation(n_series: int, T: int, device) -> torch.Tensor:
    """(n_series, T) int64: an independent uniformly random permutation of 0..T-1 per series.

    Drawn on ``device`` from torch's global RNG as the argsort of uniform noise, so no host sync; a seed
    (torch.manual_seed) fixes it."""
    return torch.rand(n_series, T, device=device).argsort(dim=1)


def temporal_loss(img: torch.Tensor, txt: torch.Tensor, n_full: int, cfg: LossCfg) -> torch.Tensor:
    """Both directions over the first ``n_full`` complete series (rows [:n_full*T], in order).

    ``cfg.temporal_shuffle``: each series' studies are first put in a random order (images and reports with
    the same permutation, :func:`series_permutation`), so pairs stay pairs but time order is lost."""
    T = cfg.series_len
    if n_full == 0:
        return img.new_zeros(()).float() + 0.0 * (img.sum() + txt.sum())
    u = img[: n_full * T].reshape(n_full, T, -1)
    v = txt[: n_full * T].reshape(n_full, T, -1)
    if cfg.temporal_shuffle:
        perm = series_permutation(n_full, T, u.device)
        u = u.gather(1, perm[..., None].expand(-1, -1, u.shape[-1]))
        v = v.gather(1, perm[..., None].expand(-1, -1, v.shape[-1]))
    kw = dict(tau=cfg.tau_temporal, variance_lambda=cfg.variance_lambda, huber_delta=cfg.huber_delta,
              w_fmc=cfg.lambda_fmc, w_rmr=cfg.lambda_rmr)
    return cycle_alignment_loss(u, v, **kw) + cycle_alignment_loss(v, u, **kw)


def _local_compute_dtype(out) -> Optional[torch.dtype]:
    """The forward's autocast dtype for the token-to-patch products (``out.amp_dtype``); None = exact fp32."""
    ct = getattr(out, "amp_dtype", None)
    return None if ct == torch.float32 else ct


def local_loss(out, model, cfg: LossCfg, faithful: bool) -> torch.Tensor:
    """Word side + patch side. The official masks PAD words as context of the patch side in both modes.

    Under autocast (``out.amp_dtype``) the token-to-patch products take bf16/fp16 operands with fp32
    accumulation, as autocast gives a plain bmm; normalisation, softmax and cross-entropy stay fp32.
    ``cfg.local_weighting`` selects the token weights, ``cfg.local_scope`` the context pool (one sample, or the
    whole batch: this rank's batch under DDP; kernels/local_align.py).
    """
    W, P = out.word_local, out.patch_local
    wm, pm = out.word_mask, out.patch_mask
    ww, pw = model.word_weighting, model.patch_weighting
    ct = _local_compute_dtype(out)
    sw = dict(weighting=cfg.local_weighting, scope=cfg.local_scope)
    if faithful:
        lw = token_align_loss(W, P, None, None, ww.in_proj_weight, ww.in_proj_bias, cfg.tau_local, True, ct, **sw)
        lp = token_align_loss(P, W, None, wm, pw.in_proj_weight, pw.in_proj_bias, cfg.tau_local, False, ct, **sw)
    else:
        lw = token_align_loss(W, P, wm, pm, ww.in_proj_weight, ww.in_proj_bias, cfg.tau_local, True, ct, **sw)
        lp = token_align_loss(P, W, pm, wm, pw.in_proj_weight, pw.in_proj_bias, cfg.tau_local, False, ct, **sw)
    return lw + lp


def cross_image_local_loss(out, model, cfg: LossCfg) -> torch.Tensor:
    """The cross-image local contrast (kernels/cross_local.py) on the model's local embeddings, PAD words and
    absent laterals masked, the attention in the forward's autocast dtype as :func:`local_loss`. Within the
    rank's batch under DDP."""
    ct = _local_compute_dtype(out)
    # Frontal-only patches are all present (the model's mask is all True then): no mask, so SDPA may take
    # its flash kernel on CUDA, and no host sync to find that out.
    pm = None if out.patch_local.shape[1] == model.cfg.vision.num_patches else out.patch_mask
    return cross_local_loss(out.word_local, out.patch_local, out.word_mask, pm, cfg.tau_local, cfg.tau_global, ct)


class MedSTLoss(torch.nn.Module):
    """L = l_ita * L_ITA + l_local * L_local + l_temporal * L_temporal [+ l_cross_local * L_cross_local].

    The last term is the cross-image research switch (``cfg.lambda_cross_local`` > 0); faithful mode refuses it,
    as the trainer refuses the other research switches with --faithful: the official loss has no such term.

    Args:
        cfg: loss hyper-parameters. faithful: official semantics (see MedSTConfig.faithful).
        gather: optional callable (tensor) -> (all-ranks tensor with autograd, this rank's row offset),
            for a global ITA over all ranks (``--gather-with-grad``); None contrasts within the batch.
    """

    def __init__(self, cfg: LossCfg, faithful: bool = False, gather=None):
        super().__init__()
        if faithful and cfg.lambda_cross_local > 0:
            raise ValueError(f"MedSTLoss: loss.lambda_cross_local={cfg.lambda_cross_local} cannot be combined with "
                             f"faithful mode: faithful keeps the official loss, which has no cross-image local term "
                             f"(set loss.lambda_cross_local to 0 or turn faithful off)")
        self.cfg, self.faithful, self.gather = cfg, faithful, gather

    def forward(self, out, model) -> LossOutput:
        # The losses run in fp32 even under autocast: logits / 0.07 and 1/variance terms need the range.
        with torch.autocast(out.img_global.device.type, enabled=False):
            return self._forward(out, model)

    def _forward(self, out, model) -> LossOutput:
        c = self.cfg
        if self.gather is not None:
            img_all, off = self.gather(out.img_global)
            txt_all, _ = self.gather(out.txt_global)
            l_ita = ita_loss(out.img_global, out.txt_global, c.tau_global, off, img_all, txt_all)
        else:
            l_ita = ita_loss(out.img_global, out.txt_global, c.tau_global)
        l_loc = local_loss(out, model, c, self.faithful)
        l_tmp = temporal_loss(out.img_global, out.txt_global, out.n_full_series, c)
        total = c.lambda_ita * l_ita + c.lambda_local * l_loc + c.lambda_temporal * l_tmp
        if c.lambda_cross_local > 0:
            l_cross = cross_image_local_loss(out, model, c)
            total = total + c.lambda_cross_local * l_cross
        else:  # off: not computed, so the paper's loss (and its cost) is unchanged
            l_cross = l_ita.new_zeros(())
        return LossOutput(total, l_ita.detach(), l_loc.detach(), l_tmp.detach(), l_cross.detach())
