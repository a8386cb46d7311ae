"""Make docs/grounding_example.png from a model that grounds, and measure that it does.

Trains ``medst_tiny`` from scratch on CPU (about 30 s on an idle 2-core machine) with Med-ST's losses plus the
cross-image local contrast (``loss.lambda_cross_local=1``, the research switch; Med-ST's own losses do not
ground, see tests/test_grounding.py) on 300 synthetic frontals with one planted finding each (pleural effusion,
pneumothorax or consolidation, the configuration of test_medst_with_the_cross_local_switch_grounds), then:

1. measures the planted-finding hit rate on 60 held-out such frontals (a hit: the finding word's attention map
   peaks inside the region ``synth.finding_region`` says the finding was drawn in, about 6% of the image) for
   the trained model and for its random init (same config and seed), overall and per finding;
2. draws the finding word's and one other word's map on the first held-out frontal with a large left pleural
   effusion that the trained model hits (so the picture shows a hit; its title gives the rates), the planted
   region outlined and each map's peak marked.

    python scripts/grounding_example.py [--out docs/grounding_example.png] [--steps 200] [--seed 0]

Why not the trainer: ``python -m medst_fast.pretrain --synthetic-patients 200 --lr 1e-3 --clip-grad 1
--lambda-cross-local 1`` (multi-finding reports, two views, series, temporal loss) ran at 7-8 s a step on a
loaded 2-core machine, so 50 steps fit in 6 minutes; that model peaked in the region on 0 of the 60 images
(random init 4 of 60). This loop trains the tested configuration instead (single-finding frontals, batch 32,
200 steps). The same seed gives the same weights on one machine; the rate moves by about 0.1 with the step
count and the float path, so read it against random, not as an exact number.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

import medst_fast  # noqa: E402
from medst_fast.data import synth, transforms as T  # noqa: E402
from medst_fast.grounding import peaks_in_region, similarity_maps  # noqa: E402

FINDINGS = synth.PLANTED_FINDINGS
SIZE = 96   # medst_tiny's input side
CANVAS = 110  # the eval transform's resize side for 96: images drawn at 110 x 110 are only centre-cropped


def default_vocab() -> str:
    """The shared BioClinicalBERT vocabulary beside the repository (as the tests read it)."""
    shared = os.environ.get("MEDST_SHARED_DIR") or os.path.join(REPO, "..", "shared")
    return os.path.join(shared, "vocab", "bio_clinicalbert", "vocab.txt")


# -- planted findings ---------------------------------------------------------------------------------------
def planted(n, seed, train):
    """n synthetic frontals with one planted finding each (synth.planted_frontals): (input tensor, report
    sentence, region on the input crop, finding word, finding, side)."""
    tf = T.ImageTransform(SIZE, train=train)
    g = torch.Generator().manual_seed(seed)
    off = T.center_offset(CANVAS, SIZE)
    return [(tf(c.image, g), c.text, c.region[off:off + SIZE, off:off + SIZE], c.word, c.finding, c.side)
            for c in synth.planted_frontals(n, seed, train, CANVAS)]


def hits(model, tok, cases) -> np.ndarray:
    """Per case: does the finding word's attention map peak inside the planted region?"""
    return np.array([peaks_in_region(model, tok, x, text, word, region) for x, text, region, word, _, _ in cases])


# -- training -----------------------------------------------------------------------------------------------
def train(tok, steps, lr, batch, seed, n_train):
    """medst_tiny trained on planted frontals with MedSTLoss (ITA + Med-ST's local loss + the cross-image local
    contrast at weight 1; one view and no series, so no temporal loss); returns (trained, its random init)."""
    from medst_fast.losses import MedSTLoss

    loss_cfg = {"lambda_temporal": 0.0, "lambda_local": 1.0, "lambda_cross_local": 1.0}
    text_cfg = {"max_length": tok.max_length, "vocab_size": tok.vocab_size}
    torch.manual_seed(seed)
    model = medst_fast.create_model("medst_tiny", loss=loss_cfg, text=text_cfg)
    random_init = medst_fast.create_model("medst_tiny", loss=loss_cfg, text=text_cfg).eval()
    random_init.load_state_dict(model.state_dict())
    data = planted(n_train, seed, train=True)
    x = torch.stack([d[0] for d in data])
    enc = tok([d[1] for d in data])
    loss_fn = MedSTLoss(model.cfg.loss)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(data), (batch,), generator=g)
        out = model(dict(frontal=x[idx], n_full_series=0, **{k: v[idx] for k, v in enc.items()}))
        lo = loss_fn(out, model)
        opt.zero_grad()
        lo.total.backward()
        opt.step()
        if step % 50 == 0 or step == steps:
            print(f"step {step}/{steps}: loss {lo.total.item():.4f} (ita {lo.ita.item():.4f}, local "
                  f"{lo.local.item():.4f}, cross_local {lo.cross_local.item():.4f}), {time.time() - t0:.0f} s",
                  flush=True)
    return model.eval(), random_init


# -- the picture --------------------------------------------------------------------------------------------
def example_case(cases, trained_hits):
    """The first held-out frontal with a large left pleural effusion that the trained model hits (the picture
    shows a hit; the title gives the rate over all held-out images), else the first one, a miss."""
    left = [i for i, c in enumerate(cases) if c[4] == "pleural_effusion" and c[5] == "left"]
    if not left:
        raise RuntimeError("no left pleural effusion among the held-out cases")
    i = next((i for i in left if trained_hits[i]), left[0])
    return i, cases[i]


def draw(model, tok, case, other_word, out, title):
    """One row: the image with the planted region outlined, then the finding word's and another word's
    attention map over it, each with its peak marked and the region outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, text, region, word, _, _ = case
    m = similarity_maps(model, tok, x, text)
    panels = [("image, planted region outlined", None), (f'"{word}"', m.word_map(word)),
              (f'"{other_word}"', m.word_map(other_word))]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.9 * len(panels), 3.3))
    for ax, (name, mp) in zip(axes, panels):
        ax.axis("off")
        ax.imshow(m.image, cmap="gray", vmin=0, vmax=255)
        if mp is not None:
            a = mp.numpy()
            ax.imshow(a, cmap="jet", alpha=0.45)
            py, px = np.unravel_index(int(a.argmax()), a.shape)
            ax.plot(px, py, "w+", markersize=10, markeredgewidth=2)
            name += ": peak " + ("inside" if region[py, px] else "outside") + " the region"
        ax.contour(region.astype(float), levels=[0.5], colors="lime", linewidths=1.0)
        ax.set_title(name, fontsize=8)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(REPO, "docs", "grounding_example.png"))
    p.add_argument("--vocab", default=default_vocab(), help="WordPiece vocab.txt (default: ../shared's "
                   "BioClinicalBERT vocabulary)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--train-images", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--other-word", default="there", help="the second word drawn (a word of the sentence)")
    a = p.parse_args(argv)
    if not os.path.isfile(a.vocab):
        p.error(f"--vocab {a.vocab}: no such file (give a WordPiece vocab.txt)")
    args = sys.argv[1:] if argv is None else list(argv)
    print("command: python", " ".join([os.path.relpath(__file__, os.getcwd())] + args))
    print(f"training medst_tiny from scratch: {a.train_images} planted synthetic frontals, Med-ST's losses + "
          f"loss.lambda_cross_local=1, {a.steps} steps, AdamW lr {a.lr:g}, batch {a.batch}, seed {a.seed}")
    tok = medst_fast.get_tokenizer(a.vocab, max_length=24)
    model, random_init = train(tok, a.steps, a.lr, a.batch, a.seed, a.train_images)
    held_out = planted(60, a.seed + 1, train=False)
    h_trained, h_random = hits(model, tok, held_out), hits(random_init, tok, held_out)
    rates = float(h_trained.mean()), float(h_random.mean())
    print(f"planted-finding hit rate on {len(held_out)} held-out frontals: trained {rates[0]:.3f}, random init "
          f"{rates[1]:.3f}")
    per = {}
    for f in FINDINGS:
        sel = np.array([c[4] == f for c in held_out])
        per[f] = float(h_trained[sel].mean())
        print(f"  {f}: trained {per[f]:.2f}, random init {h_random[sel].mean():.2f} ({sel.sum()} images)")
    if not (rates[0] >= 0.2 and rates[0] >= 4 * max(rates[1], 0.05)):
        print("warning: this model does not ground by the test's bar (>= 0.2 and >= 4x random)")
    i, case = example_case(held_out, h_trained)
    print(f"example: held-out image {i}, {case[1]!r} (trained {'hit' if h_trained[i] else 'miss'}, random init "
          f"{'hit' if h_random[i] else 'miss'})")
    title = (f'"{case[1]}" (held-out), attention maps, + = peak\nfinding-word peak in the planted region on 60 '
             f'held-out images: {rates[0]:.0%} (effusions {per["pleural_effusion"]:.0%}), random init {rates[1]:.0%}')
    out = draw(model, tok, case, a.other_word, a.out, title)
    print(f"wrote {out} ({os.path.getsize(out) / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
