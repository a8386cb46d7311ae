"""Analyses of a trained model for questions the paper leaves open.

``python -m medst_fast.analysis views --checkpoint DIR --data INDEX [--split test] [--max-studies N] --out PREFIX``

``views``: are the frontal and lateral experts of the MoVE ViT learning complementary features, or are the two
views redundant (paper-summary.txt, "Next Checks" 3)? For the studies of the split that have both views, the
dense two-view forward is run with hooks on every block, and the residual stream is read at two points:
*before* the view experts (after the block's attention, the input of ``norm2`` / ``norm2_l``) and *after*
them (the block's output). At each point, per block:

- linear CKA between the frontal and the lateral features across studies. A study's feature for a view is
  the mean of that view's patch tokens (CLS excluded: it belongs to the frontal stream). The patches of the
  two views show different projections, so tokens are not paired by position; studies are the examples.
- mean cosine: over studies and over every (frontal token, lateral token) pair of the same study, the
  cosine similarity of the two tokens; equal to mean_n (mean_i f_i/|f_i|) . (mean_j l_j/|l_j|).

Plus the frontal-only embedding spread: the mean pairwise cosine (over distinct pairs) of the global
embeddings of the split's frontal images fed alone; the learning proof found 0.75-0.82 for two-view models,
where a value near 1 means the frontal-only path maps every image to nearly the same point.

Writes PREFIX.md (the table) and PREFIX.png (the curves; needs matplotlib, the optional extra [plot]:
without it the table only, and one line saying so).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .data.index import SeriesIndex
from .eval.common import StudyListDataset, embed_images, load_model
from .files import atomic_writer
from .similarity import mean_pairwise_cosine

log = logging.getLogger("medst_fast")

POINTS = ("before", "after")  # the residual stream before / after the view experts of a block
VIEWS = ("frontal", "lateral")


# -- the measures -----------------------------------------------------------------------------------------
def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two representations of the same n examples, x (n, p) and y (n, q):
    ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with the columns centred (Kornblith et al., 2019), in
    float64. 1 for representations equal up to rotation and isotropic scale; needs n >= 2."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka: x and y must be (n, p) and (n, q), got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < 2:
        raise ValueError("linear_cka: needs at least 2 examples")
    xc = x.double() - x.double().mean(0)
    yc = y.double() - y.double().mean(0)
    cross = (yc.t() @ xc).pow(2).sum()
    den = torch.linalg.matrix_norm(xc.t() @ xc) * torch.linalg.matrix_norm(yc.t() @ yc)
    return float(cross / den) if den > 0 else float("nan")  # a constant representation has no CKA


# -- features per block ----------------------------------------------------------------------------------
class _BlockTaps:
    """Forward hooks on every block of a MoVE ViT's dense forward. For each block and point, per view, the
    per-study mean of the patch tokens (for CKA) and the mean of the unit patch tokens (for the cosine)."""

    def __init__(self, vit):
        self.nf = vit.num_frontal_tokens
        self.sums: Dict[Tuple[int, str, str], List[torch.Tensor]] = {}
        self.handles = []
        for k, blk in enumerate(vit.blocks):
            # norm2 sees CLS + the frontal tokens, norm2_l the lateral ones (MoVEBlock.forward's dense split)
            self.handles.append(blk.norm2.register_forward_pre_hook(self._pre(k, "frontal")))
            self.handles.append(blk.norm2_l.register_forward_pre_hook(self._pre(k, "lateral")))
            self.handles.append(blk.register_forward_hook(self._post(k)))

    def _keep(self, k: int, point: str, view: str, tokens: torch.Tensor) -> None:
        t = tokens.float()
        pooled = torch.stack([t.mean(1), F.normalize(t, dim=-1).mean(1)], 1).cpu()  # (B, 2, D)
        self.sums.setdefault((k, point, view), []).append(pooled)

    def _pre(self, k: int, view: str):
        def hook(_module, args):
            x = args[0]
            self._keep(k, "before", view, x[:, 1:] if view == "frontal" else x)
        return hook

    def _post(self, k: int):
        def hook(_module, _args, out):
            self._keep(k, "after", "frontal", out[:, 1:self.nf])
            self._keep(k, "after", "lateral", out[:, self.nf:])
        return hook

    def features(self) -> Dict[Tuple[int, str, str], torch.Tensor]:
        """(block, point, view) -> (n_studies, 2, D): [mean token, mean unit token] per study."""
        return {key: torch.cat(parts) for key, parts in self.sums.items()}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _loader(pairs, size: int, batch_size: int, workers: int):
    return torch.utils.data.DataLoader(StudyListDataset(pairs, size), batch_size=batch_size, shuffle=False,
                                       num_workers=workers)


@torch.inference_mode()
def view_similarity(model, pairs: Sequence[Tuple[str, str]], batch_size: int = 32, workers: int = 0) -> List[dict]:
    """Per block: CKA and mean cosine of the frontal vs lateral features, before and after the experts.

    ``pairs``: (frontal path, lateral path) of studies that have both views (>= 2 of them)."""
    vit = model.visual
    if not vit.cfg.lateral_expert:
        raise ValueError("this model has no lateral expert (vision.lateral_expert = false): nothing to compare")
    if len(pairs) < 2:
        raise ValueError(f"view similarity needs at least 2 studies with both views, got {len(pairs)}")
    device = next(model.parameters()).device
    taps = _BlockTaps(vit)
    try:
        for xf, xl, _ in _loader(pairs, vit.cfg.img_size, batch_size, workers):
            vit.forward_features(xf.to(device), xl.to(device))  # dense; every study has both views
    finally:
        taps.remove()
    feats = taps.features()
    rows = []
    for k in range(len(vit.blocks)):
        row = {"block": k}
        for point in POINTS:
            f, l = feats[(k, point, "frontal")], feats[(k, point, "lateral")]
            row[f"cka_{point}"] = linear_cka(f[:, 0], l[:, 0])
            row[f"cos_{point}"] = float((f[:, 1].double() * l[:, 1].double()).sum(-1).mean())
        rows.append(row)
    return rows


@torch.inference_mode()
def frontal_only_spread(model, frontals: Sequence[str], batch_size: int = 32, workers: int = 0) -> float:
    """Mean pairwise cosine of the global embeddings of frontal images fed alone (the single-view path)."""
    if len(frontals) < 2:
        raise ValueError(f"the frontal-only spread needs at least 2 images, got {len(frontals)}")
    return mean_pairwise_cosine(embed_images(model, list(frontals), batch_size=batch_size, workers=workers,
                                             desc="frontal-only"))


# -- the report ------------------------------------------------------------------------------------------
def to_markdown(rows: List[dict], spread: float, n_pairs: int, n_frontal: int, title: str) -> str:
    lines = [f"# Frontal vs lateral features per block: {title}", "",
             f"{n_pairs} studies with both views. CKA: linear CKA across studies of the per-study mean patch "
             "token of each view. Cosine: mean over studies and all (frontal token, lateral token) pairs. "
             "Before = the residual stream entering the view experts (after attention), after = the block "
             "output.", "",
             "| block | CKA before experts | CKA after experts | cosine before experts | cosine after experts |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['block']} | {r['cka_before']:.4f} | {r['cka_after']:.4f} | {r['cos_before']:.4f} | "
                     f"{r['cos_after']:.4f} |")
    lines += ["", f"Frontal-only embedding spread (mean pairwise cosine of the global embeddings of {n_frontal} "
              f"frontal-only inputs): {spread:.4f} (the learning proof found 0.75-0.82 for two-view models).", ""]
    return "\n".join(lines)


def plot(rows: List[dict], path: str, title: str) -> None:
    """The per-block curves as a PNG. Raises ImportError when matplotlib is missing."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), constrained_layout=True)
    FigureCanvasAgg(fig)  # Figure + Agg, not pyplot: no global backend switch in the caller's process
    blocks = [r["block"] for r in rows]
    for ax, key, name in zip(fig.subplots(1, 2), ("cka", "cos"), ("linear CKA", "mean cosine")):
        for point, style in zip(POINTS, ("o-", "s--")):
            ax.plot(blocks, [r[f"{key}_{point}"] for r in rows], style, label=f"{point} the view experts")
        ax.set_xlabel("block")
        ax.set_title(f"frontal vs lateral: {name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    with atomic_writer(path, "wb") as f:  # a reader never sees a half-written picture
        fig.savefig(f, format="png", dpi=90)


def _select(index_dir: str, split: str, max_studies: Optional[int]):
    """(frontal, lateral) pairs of the split's studies with both views, and the split's frontals; the first
    max_studies of each, in index order."""
    idx = SeriesIndex.load(index_dir)
    studies = [s for s in idx.studies if s.split == split]
    if not studies:
        raise ValueError(f"{index_dir}/studies.csv: no study has field 'split' == {split!r}")
    both = [(idx.path(s.frontal_path), idx.path(s.lateral_path)) for s in studies if s.has_lateral]
    frontals = [idx.path(s.frontal_path) for s in studies]
    if max_studies is not None:
        both, frontals = both[:max_studies], frontals[:max_studies]
    return both, frontals


def views(checkpoint: str, data: str, out: str, split: str = "test", max_studies: Optional[int] = None,
          model_name: Optional[str] = None, device: Optional[str] = None, batch_size: int = 32,
          workers: int = 0) -> dict:
    """The ``views`` analysis; returns {"rows", "spread", "markdown" (its path), "table" (its text), "png" (the
    path, None without matplotlib)}."""
    pairs, frontals = _select(data, split, max_studies)
    model = load_model(checkpoint, model_name=model_name, device=device)
    rows = view_similarity(model, pairs, batch_size, workers)
    spread = frontal_only_spread(model, frontals, batch_size, workers)
    title = f"{os.path.basename(os.path.normpath(checkpoint))}, split {split}"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    md_path, table = out + ".md", to_markdown(rows, spread, len(pairs), len(frontals), title)
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(table)
    png: Optional[str] = out + ".png"
    try:
        plot(rows, png, title)
    except ImportError:
        print("matplotlib is not installed (the optional extra [plot]): wrote the table only, no PNG")
        png = None
    return {"rows": rows, "spread": spread, "markdown": md_path, "table": table, "png": png}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m medst_fast.analysis", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="analysis", required=True)
    v = sub.add_parser("views", help="frontal vs lateral feature similarity per block; frontal-only spread")
    v.add_argument("--checkpoint", required=True, help="save_pretrained folder (e.g. a run's final/) or checkpoint")
    v.add_argument("--model", default=None, help="config name for a checkpoint file without its own config")
    v.add_argument("--data", required=True, help="a prepared series index folder (studies.csv, series.json, meta.json)")
    v.add_argument("--split", default="test", help="split of the index to analyse (default: test)")
    v.add_argument("--max-studies", type=int, default=None, help="use the first N studies (of each selection)")
    v.add_argument("--out", required=True, help="output prefix: writes PREFIX.md and PREFIX.png")
    v.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    v.add_argument("--batch-size", type=int, default=32)
    v.add_argument("--workers", type=int, default=0, help="image decoding processes")
    a = p.parse_args(argv)
    if a.max_studies is not None and a.max_studies < 2:
        p.error("--max-studies must be >= 2")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        res = views(a.checkpoint, a.data, a.out, a.split, a.max_studies, a.model, a.device, a.batch_size, a.workers)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"medst_fast.analysis: error: {e}", file=sys.stderr)
        return 1
    print(res["table"])
    print(f"wrote {res['markdown']}" + (f" and {res['png']}" if res["png"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
