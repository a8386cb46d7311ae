"""``python -m medst_fast.ground --checkpoint DIR --image X --text "..." --out map.png``: grounding overlays.

Several ``--text`` give several phrases of one report (each drawn as the mean of its words' maps); ``--words``
picks the word panels. A model whose report embeddings are collapsed (at chance) gets a warning on stdout and
in the picture's title. Needs matplotlib: ``pip install 'medst_fast[plot]'``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

log = logging.getLogger("medst_fast")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m medst_fast.ground", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a full save_pretrained folder (e.g. a run's final/)")
    p.add_argument("--image", required=True, help="JPEG/PNG/DICOM file")
    p.add_argument("--text", required=True, action="append", help="a phrase (repeat for several)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--vocab", help="vocab.txt (default: the checkpoint folder's)")
    p.add_argument("--words", help="comma list of words to draw (default: all, up to --max-panels)")
    p.add_argument("--kind", choices=["attention", "cosine"], default="attention")
    p.add_argument("--on", choices=["input", "original"], default="input",
                   help="draw on the model's centre crop (input) or on the whole original image")
    p.add_argument("--max-panels", type=int, default=12)
    p.add_argument("--device", help="default: cuda when available, else cpu")
    return p


def main(argv: Optional[List[str]] = None) -> str:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    a = build_parser().parse_args(argv)
    from .eval.common import load_model, load_tokenizer
    from .grounding import at_chance_warning, plot_overlay, similarity_maps

    model = load_model(checkpoint=a.checkpoint, device=a.device)
    tok = load_tokenizer(a.vocab, model, a.checkpoint)
    warning = at_chance_warning(model, tok)
    if warning:  # maps from an untrained model look as convincing as real ones: say so where they are seen
        print(f"warning: {warning}")
    maps = similarity_maps(model, tok, a.image, a.text, on=a.on)
    words = [w.strip() for w in a.words.split(",") if w.strip()] if a.words else None
    out = plot_overlay(maps, a.out, words=words, kind=a.kind, max_panels=a.max_panels, warning=warning)
    log.info("wrote %s (%d words: %s)", out, len(maps.words), " ".join(maps.words))
    return out


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, KeyError, RuntimeError, ImportError) as e:
        print(f"medst_fast.ground: error: {e}", file=sys.stderr)
        sys.exit(1)
