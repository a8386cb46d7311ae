"""Grounding maps: where in the image each word of a text points, from Med-ST's local alignment.

The local alignment compares every word embedding (text local head) with every patch embedding (image local
head), both L2-normalised, and attends over the patches with ``softmax(cosine / tau_local)`` (the
word side). ``similarity_maps`` returns both the attention weights and the raw cosines per word, and per
phrase (the mean over its words), on the patch grid and bilinearly upsampled to the image the model saw (the
eval transform's centre crop) or, with ``on="original"``, to the original image.
``plot_overlay`` draws them over the image (matplotlib: ``pip install 'medst_fast[plot]'``).

Which training grounds (tests/test_grounding.py, medst_tiny from scratch on synthetic frontals with one planted
finding; a hit is the finding word's map peaking inside the planted region, 60 held-out images, random weights
2%): Med-ST's own losses do not: 0% after 150-900 steps, 0-5% with ``local_scope="batch"``, 0-5% ITA only or
ITA first, 17% at lr 3e-4, 7% with uniform token weights. Med-ST's local loss contrasts a word only with the
other words of its own report, so a word can own a fixed patch, the same in every image (the batch scope widens
where the context comes from, not what is contrasted). A local contrast across images (each report's words
against every image's patches, the pair scored by the mean word-to-context cosine, InfoNCE over the batch;
GLoRIA-like, not part of Med-ST) does ground; it is the research switch ``loss.lambda_cross_local``
(``--lambda-cross-local``, kernels/cross_local.py). Med-ST's losses plus the switch at weight 1: 27% / 35% / 22%
/ 23% after 100 / 200 / 300 / 450 steps; in place of Med-ST's local loss 7% / 35% / 18% after 100 / 200 / 300 (one
seed; the rate moves by about 10 points between checkpoints and with the float path, so read it as "far above
random", not as an exact rate).
The peak of the attention map is the peak of the cosine map (softmax is monotonic per word; only the bilinear
upsampling can move it by a pixel), so the choice of map does not change this.
"""
from __future__ import annotations

import contextlib
import os
import textwrap
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .data import transforms as T
from .factory import optional_import, to_gray_u8

KINDS = ("attention", "cosine")


@dataclass
class GroundingMaps:
    """Per-word maps of one image and text.

    ``attention`` and ``cosine`` are (n_words, H, W) on ``image`` (uint8 (H, W), the pixels the maps lie on);
    ``patch_attention`` / ``patch_cosine`` are the (n_words, gh, gw) values per patch before upsampling (each
    word's patch attention sums to 1). ``phrase_words[i]`` lists the word indices of phrase i.
    """
    words: List[str]
    phrases: List[str]
    phrase_words: List[List[int]]
    attention: torch.Tensor
    cosine: torch.Tensor
    patch_attention: torch.Tensor
    patch_cosine: torch.Tensor
    image: np.ndarray
    tau: float
    on: str = "input"
    extra: dict = field(default_factory=dict)

    def maps(self, kind: str = "attention") -> torch.Tensor:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        return self.attention if kind == "attention" else self.cosine

    def word_map(self, word: Union[str, int], kind: str = "attention") -> torch.Tensor:
        """(H, W) map of a word (its first occurrence when given as a string)."""
        return self.maps(kind)[self.word_index(word)]

    def word_index(self, word: Union[str, int]) -> int:
        if isinstance(word, int):
            return word
        w = word.lower()
        if w not in self.words:
            raise KeyError(f"{word!r} is not a word of the text; words: {self.words}")
        return self.words.index(w)

    def phrase_maps(self, kind: str = "attention") -> torch.Tensor:
        """(n_phrases, H, W): each phrase's mean over its words."""
        m = self.maps(kind)
        return torch.stack([m[idx].mean(0) for idx in self.phrase_words])


# -- text side ----------------------------------------------------------------------------------------------
def word_strings(tokenizer, input_ids: torch.Tensor, slots: torch.Tensor) -> List[Tuple[int, str]]:
    """[(word slot, word)] of one tokenised text: word pieces joined, [CLS]/[SEP]/[PAD] left out."""
    toks = tokenizer.convert_ids_to_tokens(input_ids.tolist())
    words = {}
    for tok, tid, s in zip(toks, input_ids.tolist(), slots.tolist()):
        if s <= 0 or tid in (tokenizer.sep_token_id, tokenizer.pad_token_id, tokenizer.cls_token_id):
            continue
        words[s] = words.get(s, "") + (tok[2:] if tok.startswith("##") else tok)
    return sorted(words.items())


def _count_words(tokenizer, text: str) -> int:
    enc = tokenizer([text])
    return len(word_strings(tokenizer, enc["input_ids"][0], enc["word_slots"][0]))


# -- image side ---------------------------------------------------------------------------------------------
def _prepare_image(model, image):
    """(input tensor (1, 1, S, S), grey uint8 original or None, displayed uint8 (S, S))."""
    S = model.cfg.vision.img_size
    if isinstance(image, torch.Tensor) and image.is_floating_point():
        x = image if image.dim() == 4 else image[None]
        if x.shape[0] != 1 or x.shape[1] != 1:
            raise ValueError(f"a preprocessed image must be (1, S, S) or (1, 1, S, S), got {tuple(image.shape)}")
        disp = ((x[0, 0].detach().cpu().float() * 0.5 + 0.5) * 255).clamp(0, 255).round().to(torch.uint8).numpy()
        return x, None, disp
    g = to_gray_u8(image)
    x = T.eval_transform(g, S)[None]
    disp = ((x[0, 0] * 0.5 + 0.5) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    return x, g, disp


def _to_original(maps: torch.Tensor, h: int, w: int, S: int) -> torch.Tensor:
    """(n, S, S) maps on the eval crop -> (n, h, w) on the original image, by inverting the eval geometry
    (resize longer side to R, pad centred, centre crop S); pixels outside the crop are NaN."""
    R = T.resize_side(S)
    nh, nw, top, left = T.resize_geometry(h, w, R)
    off = T.center_offset(R, S)
    # centre of each original pixel in crop pixel coordinates
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) * (nh / h) + top - off
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) * (nw / w) + left - off
    gy, gx = (ys / S) * 2 - 1, (xs / S) * 2 - 1  # align_corners=False normalised coordinates
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], -1)[None].to(maps.dtype)
    grid = grid.expand(maps.shape[0], -1, -1, -1)
    out = F.grid_sample(maps[:, None], grid, mode="bilinear", padding_mode="border", align_corners=False)[:, 0]
    outside = ((gy.abs() > 1)[:, None] | (gx.abs() > 1)[None, :])
    return out.masked_fill(outside[None], float("nan"))


@contextlib.contextmanager
def _eval_mode(model):
    was = model.training
    model.eval()  # the heads' BatchNorm must use running statistics for one image
    try:
        yield
    finally:
        model.train(was)


# -- the maps -----------------------------------------------------------------------------------------------
@torch.inference_mode()
def similarity_maps(model, tokenizer, image, text: Union[str, Sequence[str]], on: str = "input") -> GroundingMaps:
    """Per-word and per-phrase patch maps of ``text`` on ``image``.

    Args:
        image: a file path (JPEG/PNG/DICOM), PIL image, uint8 array (the eval transform is applied), or an
            already transformed float tensor (1, S, S).
        text: one phrase, or a list of phrases (tokenised together as one report, so each word sees the
            others, as in training; each phrase's map is the mean over its words).
        on: "input" (maps on the S x S centre crop the model saw) or "original" (on the original image).
    """
    if on not in ("input", "original"):
        raise ValueError(f"on must be 'input' or 'original', got {on!r}")
    phrases = [text] if isinstance(text, str) else list(text)
    if not phrases or not all(isinstance(p, str) and p.strip() for p in phrases):
        raise ValueError("text: give a non-empty phrase or a list of non-empty phrases")
    x, grey, disp = _prepare_image(model, image)
    device = next(model.parameters()).device
    with _eval_mode(model):
        _, patches = model.visual(x.to(device))  # frontal only: (1, P, D)
        pl = F.normalize(model.visual_local_head(patches), dim=-1)[0]
        enc = tokenizer([" ".join(phrases)])
        ids, slots = enc["input_ids"], enc["word_slots"]
        _, words, wmask = model.text(ids.to(device), enc["attention_mask"].to(device), slots.to(device))
        wl = F.normalize(model.text_local_head(words, wmask), dim=-1)[0]  # (L-1, E), row s-1 = slot s
    found = word_strings(tokenizer, ids[0], slots[0])
    counts = [_count_words(tokenizer, p) for p in phrases]
    if sum(counts) != len(found):
        raise ValueError(f"the text has {sum(counts)} words but {len(found)} fit in the tokenizer's "
                         f"{tokenizer.max_length} tokens; shorten it")
    rows = torch.tensor([s - 1 for s, _ in found], device=wl.device)
    cos = (wl.index_select(0, rows) @ pl.T).float().cpu()  # (W, P)
    tau = float(model.cfg.loss.tau_local)
    att = torch.softmax(cos / tau, dim=-1)
    gh, gw = model.visual.grid_size
    pc, pa = cos.view(-1, gh, gw), att.view(-1, gh, gw)
    S = model.cfg.vision.img_size
    up = lambda m: F.interpolate(m[:, None], size=(S, S), mode="bilinear", align_corners=False)[:, 0]  # noqa: E731
    a_map, c_map = up(pa), up(pc)
    if on == "original":
        if grey is None:
            raise ValueError("on='original' needs the original image (a path, PIL image or array), not a tensor")
        h, w = grey.shape
        a_map, c_map, disp = _to_original(a_map, h, w, S), _to_original(c_map, h, w, S), grey
    starts = np.cumsum([0] + counts)
    phrase_words = [list(range(starts[i], starts[i + 1])) for i in range(len(phrases))]
    return GroundingMaps([w.lower() for _, w in found], phrases, phrase_words, a_map, c_map, pa, pc, disp, tau, on)


# -- drawing --------------------------------------------------------------------------------------------------
def peaks_in_region(model, tokenizer, image, text: str, word: str, region: np.ndarray) -> bool:
    """Does ``word``'s attention map (on the model's input) peak inside the bool ``region`` (input geometry)?
    The hit a grounding check counts."""
    a = similarity_maps(model, tokenizer, image, text).word_map(word)
    return bool(region[np.unravel_index(int(a.argmax()), a.shape)])


# Reports of different findings: a model that learned anything from reports embeds them apart. An untrained
# text tower (post-LN BERT, small init) and its BatchNorm head give them nearly one direction (mean pairwise
# cosine 0.9999 for a random medst_tiny, 0.95 for a random medst_vit_b16), and then its maps, however
# convincing they look, say nothing about the words.
REFERENCE_REPORTS = (
    "small left pleural effusion", "no acute cardiopulmonary process",
    "right lower lobe consolidation concerning for pneumonia", "moderate pulmonary edema",
    "large right pneumothorax", "the heart size is enlarged", "interval improvement of bibasilar atelectasis",
    "endotracheal tube terminates above the carina",
)


def at_chance_warning(model, tokenizer) -> Optional[str]:
    """A warning when ``model`` embeds ``REFERENCE_REPORTS`` as nearly one vector (the trainer's collapse
    threshold on the mean pairwise cosine), i.e. its text side is at chance; None otherwise. One batch of
    eight short texts: cheap enough to run before every picture."""
    from .similarity import COLLAPSED_COS, mean_pairwise_cosine

    with torch.no_grad(), _eval_mode(model):
        dev = next(model.parameters()).device
        z = model.encode_text(**{k: v.to(dev) for k, v in tokenizer(list(REFERENCE_REPORTS)).items()})
    cos = mean_pairwise_cosine(z.float().cpu())
    if not cos <= COLLAPSED_COS:  # NaN counts as collapsed
        return (f"model at chance: it embeds {len(REFERENCE_REPORTS)} reports of different findings nearly alike "
                f"(mean pairwise cosine {cos:.4f} > {COLLAPSED_COS}); these maps carry no learned meaning")
    return None


def plot_overlay(maps: GroundingMaps, out: Union[str, os.PathLike], words: Optional[Sequence[str]] = None,
                 kind: str = "attention", alpha: float = 0.45, max_panels: int = 12, title: Optional[str] = None,
                 dpi: int = 100, warning: Optional[str] = None) -> str:
    """Write a PNG: the image, then each phrase's and each word's map over it. Returns the path.

    Args:
        words: the words to draw (default: every word, up to ``max_panels`` panels in all).
        kind: "attention" (the local alignment's softmax weights) or "cosine".
        warning: a line drawn in red under the title (e.g. ``at_chance_warning``'s), so the picture carries it.
    """
    mpl = optional_import("matplotlib", "plot_overlay", "plot")
    mpl.use("Agg", force=False)
    import matplotlib.pyplot as plt

    m, pm = maps.maps(kind), maps.phrase_maps(kind)
    panels = [("image", None)]
    panels += [(f'"{p}"', pm[i]) for i, p in enumerate(maps.phrases)]
    idx = [maps.word_index(w) for w in words] if words is not None else list(range(len(maps.words)))
    panels += [(maps.words[i], m[i]) for i in idx]
    panels = panels[:max_panels]
    cols = min(4, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (name, mp) in zip(axes.ravel(), panels):
        ax.imshow(maps.image, cmap="gray", vmin=0, vmax=255)
        if mp is not None:
            ax.imshow(mp.numpy(), cmap="jet", alpha=alpha)
        ax.set_title(name if len(name) < 40 else name[:37] + "...", fontsize=9)
    head = title or f"{kind} (tau_local={maps.tau:g})"
    if warning:
        head += "\n" + textwrap.fill("WARNING: " + warning, width=40 * cols)
    fig.suptitle(head, fontsize=10, color="red" if warning else "black")
    fig.tight_layout()
    out = os.fspath(out)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out
