"""Validation during pretraining: the training loss on the valid split and image-to-report retrieval.

Every rank evaluates its share of the split (whole series per rank, centre crops, index order, the same
``--loader`` back-end as training); the loss sums and the global embeddings are gathered, so every rank
gets the same numbers and takes the same decision (e.g. a ``best/`` export). The loss is the training
objective (ITA + local + temporal with the run's weights) per batch, averaged over batches; like the
training loss it depends on the batch size (the contrastive terms compare the studies of a batch).

Retrieval: image-to-report recall@K over all validation studies. The rank of study i's own report is the
number of reports scored strictly higher than it, so identical reports (which embed identically) never
push the true one down. Evaluation touches no RNG and no training state: the RNG states are restored
afterwards, so a run with validation resumes as exactly as one without.

Collapse check: the mean pairwise cosine of the validation studies' image and report embeddings is returned
(``img_cos``, ``txt_cos``) and a warning is logged when either is near 1: the retrieval numbers then rest on
small differences between nearly equal vectors (and are exactly chance when one image ranks the reports like
every other). Early in a run that is what the heads' BatchNorm does in eval mode: its running statistics start at mean 0 / variance 1 and keep (1 - momentum)^t of
that start after t updates (0.9^40 = 1.5% after 40 steps), while a freshly initialised head's features vary
by ~2e-4 across studies (measured on the quick start), so the running variance is far too large and the normalised outputs barely differ.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from ..similarity import COLLAPSED_COS, mean_pairwise_cosine
from .rng import capture_rng, restore_rng
from . import distributed as D

log = logging.getLogger("medst_fast")


def batchnorm_start_weight(model) -> Optional[Tuple[int, float]]:
    """(fewest running-statistics updates, largest weight the initial statistics still have) over the model's
    BatchNorm layers; None without one. With momentum m, t updates leave (1 - m)^t of the start."""
    worst = None
    for m in model.modules():
        if not (isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats):
            continue
        t = int(m.num_batches_tracked)
        w = (1 - m.momentum) ** t if m.momentum is not None else float(t == 0)  # None: a plain running mean
        if worst is None or w > worst[1]:
            worst = (t, w)
    return worst


def collapse_warning(img_cos: float, txt_cos: float, bn: Optional[Tuple[int, float]]) -> Optional[str]:
    """The warning text when the embeddings are collapsed, else None. ``bn``: batchnorm_start_weight's answer."""
    bad = [f"{name} {c:.3f}" for name, c in (("image", img_cos), ("report", txt_cos)) if c > COLLAPSED_COS]
    if not bad:
        return None
    msg = (f"validation embeddings are nearly identical (mean pairwise cosine: {', '.join(bad)}): the retrieval "
           "numbers rest on small differences between them")
    if bn is not None and bn[1] > 1e-3:
        msg += (f"; after {bn[0]} updates the BatchNorm running statistics (used in eval mode) still hold "
                f"{bn[1]:.1%} of their initial mean 0 / variance 1, far more than a young head's features vary: "
                "train for more steps")
    return msg


def recall_at_k(img: torch.Tensor, txt: torch.Tensor, ks: Sequence[int] = (1, 5)) -> Dict[int, float]:
    """Image-to-report recall@K for (N, E) embeddings whose row i of each belongs to study i.

    NaN for every K when an embedding is NaN/inf (a comparison with NaN would count as a hit).
    """
    if img.shape != txt.shape or img.dim() != 2:
        raise ValueError(f"recall_at_k: expected two (N, E) tensors of one shape, got {tuple(img.shape)} and "
                         f"{tuple(txt.shape)}")
    if img.shape[0] == 0 or not (torch.isfinite(img).all() and torch.isfinite(txt).all()):
        return {k: float("nan") for k in ks}
    sim = img.double() @ txt.double().T  # (N, N)
    rank = (sim > sim.diagonal()[:, None]).sum(1)  # reports strictly closer than the study's own
    return {k: float((rank < k).double().mean()) for k in ks}


class Validator:
    """Runs the validation pass; build it once, call it every ``--eval-every`` steps.

    Args:
        loader: a ``build_series_loader`` loader over the valid split (``train=False``).
        n_series: series in the split; batch_series: per batch and rank (series past the last whole batch on
            every rank are left out, as the training sampler does).
    """

    def __init__(self, loader, n_series: int, batch_series: int):
        self.loader, self.n_series, self.batch_series = loader, n_series, batch_series
        self._collapse_said = False  # the long collapse warning is said once a run; later ones are one line

    def _say_collapse(self, warning: Optional[str], img_cos: float, txt_cos: float) -> None:
        if not warning:
            return
        if not self._collapse_said:
            log.warning("%s", warning)
            self._collapse_said = True
        else:
            log.info("validation embeddings still nearly identical (mean pairwise cosine: images %.3f, reports "
                     "%.3f; see the warning above)", img_cos, txt_cos)

    @torch.no_grad()
    def run(self, model, loss_fn, device: torch.device, dtype: Optional[torch.dtype], prepare) -> Dict[str, Any]:
        """{"val_loss", "val_r1", "val_r5", "studies", "batches", "skipped"}, the same on every rank.

        ``prepare(batch) -> batch on device``; ``loss_fn(out, model)`` the training objective (no gather)."""
        rng = capture_rng()
        was_training = model.training
        model.eval()
        loss_sum, n_batches, skipped, img, txt = 0.0, 0, 0, [], []
        try:
            self.loader.set_epoch(0, 0)
            for raw in self.loader:
                if "frontal" not in raw:  # the loader's stand-in for a batch without one readable study
                    skipped += 1
                    continue
                batch = prepare(raw)
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    out = model(batch)
                loss_sum += float(loss_fn(out, model).total)  # a device->host sync per batch: validation only
                n_batches += 1
                img.append(out.img_global.float().cpu())
                txt.append(out.txt_global.float().cpu())
        finally:
            model.train(was_training)
            restore_rng(rng)
        mine = {"loss": loss_sum, "batches": n_batches, "skipped": skipped,
                "img": torch.cat(img) if img else torch.zeros(0, 1), "txt": torch.cat(txt) if txt else torch.zeros(0, 1)}
        parts = D.all_gather_object(mine)  # small: E floats per study
        n = sum(p["batches"] for p in parts)
        embeds = [p for p in parts if p["batches"]]
        all_img = torch.cat([p["img"] for p in embeds]) if embeds else torch.zeros(0, 1)
        all_txt = torch.cat([p["txt"] for p in embeds]) if embeds else torch.zeros(0, 1)
        r = recall_at_k(all_img, all_txt, (1, 5))
        val_loss = sum(p["loss"] for p in parts) / n if n else float("nan")
        img_cos, txt_cos = mean_pairwise_cosine(all_img), mean_pairwise_cosine(all_txt)
        self._say_collapse(collapse_warning(img_cos, txt_cos, batchnorm_start_weight(model)), img_cos, txt_cos)
        v = {"val_loss": val_loss, "val_r1": r[1], "val_r5": r[5], "studies": int(all_img.shape[0]),
             "batches": n, "skipped": sum(p["skipped"] for p in parts), "img_cos": img_cos, "txt_cos": txt_cos}
        if n and not is_finite(v):
            log.warning("validation is not finite (%s): not a best model; training goes on. Under --amp fp16 an "
                        "activation can overflow in eval mode; --amp bf16 or none avoids it", _nonfinite_fields(v))
        return v


VALUE_FIELDS = ("val_loss", "val_r1", "val_r5")


def _nonfinite_fields(v: Dict[str, Any]) -> str:
    return ", ".join(f"{k} {v[k]}" for k in VALUE_FIELDS if not math.isfinite(v[k]))


def is_finite(v: Dict[str, Any]) -> bool:
    """Whether a validation's loss and recalls are all finite numbers (a NaN recall means NaN embeddings); only
    such a validation can be a best model."""
    return all(math.isfinite(v[k]) for k in VALUE_FIELDS)


def above_chance_p(rate: float, n: int, k: int) -> float:
    """One-sided p-value of a recall@k of ``rate`` over ``n`` queries against random ranking.

    Under a random ranking each query hits with probability min(k, n) / n; the queries are treated as
    independent, so the hit count is Binomial(n, k / n) and p = P(hits >= observed). (The hits of one random
    permutation are slightly dependent; the binomial is the usual, slightly conservative stand-in.) 1.0 when
    k >= n: every ranking then "hits" and the number says nothing."""
    if not math.isfinite(rate):
        return float("nan")
    if n <= 0 or k >= n:
        return 1.0
    q, hits = k / n, round(rate * n)
    return float(min(1.0, sum(math.comb(n, j) * q ** j * (1 - q) ** (n - j) for j in range(hits, n + 1))))


def describe(v: Dict[str, Any]) -> str:
    """One log line: the numbers with the chance level of retrieval and how far above it they are (a one-sided
    binomial p-value), so that a few validation studies cannot pass for learning."""
    n = v["studies"]
    skipped = f", {v['skipped']} unreadable batch(es) skipped" if v["skipped"] else ""
    if not n:
        return f"no study could be validated ({v['batches']} batch(es){skipped}): no numbers"
    if not is_finite(v):  # NaN has no chance level; say what is not finite instead
        return f"NOT FINITE ({_nonfinite_fields(v)}) over {n} studies in {v['batches']} batch(es){skipped}"
    p1, p5 = above_chance_p(v["val_r1"], n, 1), above_chance_p(v["val_r5"], n, 5)
    above = [name for name, p in (("R@1", p1), ("R@5", p5)) if p < 0.05]
    verdict = f"above chance: {' and '.join(above)}" if above else "not distinguishable from chance at p < 0.05"
    chance = f" (chance {1 / n:.3f} / {min(1.0, 5 / n):.3f}, binomial p {p1:.2g} / {p5:.2g}: {verdict})"
    return (f"loss {v['val_loss']:.4f}, image-to-report R@1 {v['val_r1']:.3f} R@5 {v['val_r5']:.3f}{chance} "
            f"over {n} studies in {v['batches']} batch(es){skipped}")
