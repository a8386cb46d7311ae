"""How spread out a set of embeddings is: the mean pairwise cosine, and the level that counts as collapsed.

One definition for the trainer's validation, the grounding pictures' chance check, the analyses and the
scripts, so that the same name always means the same number. No project imports: every layer may use it.
"""
from __future__ import annotations

import torch

# Mean pairwise cosine above which a set of embeddings counts as collapsed: nearly one vector, so a retrieval
# or a map computed from them rests on small differences between nearly equal vectors.
COLLAPSED_COS = 0.9


def mean_pairwise_cosine(z) -> float:
    """Mean cosine similarity over the n(n-1) ordered pairs of DISTINCT rows of ``z`` (n, d); the diagonal
    (each row with itself, always 1) is left out, so unrelated vectors give about 0 and not 1/n.

    ``z`` is a tensor or anything ``torch.as_tensor`` takes (a numpy array); computed in float64. A zero row
    has cosine 0 with every other row (``F.normalize``'s convention). NaN when n < 2: there is no pair, and
    NaN is what a comparison such as ``cos > COLLAPSED_COS`` must not mistake for a number.
    """
    z = torch.as_tensor(z)
    if z.dim() != 2:
        raise ValueError(f"mean_pairwise_cosine: needs (n, d) rows, got shape {tuple(z.shape)}")
    n = z.shape[0]
    if n < 2:
        return float("nan")
    u = torch.nn.functional.normalize(z.detach().to(torch.float64), dim=1)
    s = u.sum(0)
    # sum over i != j of u_i . u_j = |sum_i u_i|^2 - sum_i |u_i|^2: the full Gram sum minus its diagonal
    return float(((s @ s) - (u * u).sum()) / (n * (n - 1)))
