"""Batch embeddings to a file: ``python -m medst_fast.embed``.

    python -m medst_fast.embed --checkpoint runs/x/final --images scans/ --out emb.npy
    python -m medst_fast.embed --checkpoint runs/x/final --images list.csv --feature cls --out cls.parquet
    python -m medst_fast.embed --checkpoint runs/x/final --texts reports.csv --out txt.npy

Images: a folder (searched recursively for JPEG/PNG/DICOM/..., sorted) or a CSV with a ``path`` column
(relative paths are relative to the CSV). Texts: a CSV with a ``text`` column (and an optional ``id``), cleaned
as in pretraining unless ``--no-clean``. Output: ``.npy`` (float32, one row per input kept) with
``FILE.ids.txt`` naming each row, or ``.parquet`` (columns ``id``, ``embedding``). An unreadable image or an
empty text is a counted skip, listed with its reason in ``FILE.skipped.txt``; a non-finite embedding is an
error and nothing is written. The files of one run are put in place together under ``FILE.lock``, the array
last: two runs on one ``--out`` leave the complete result of one of them, never one's array beside the
other's ids.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .eval import common
from .eval.common import load_model, load_tokenizer, read_csv_checked
from .eval.metrics import require_finite
from .factory import optional_import
from .files import held_temp_file, lock_fd, move_into_place, remove_stale_temps
from .hub import MissingTower
from .text.report import clean_report

log = logging.getLogger("medst_fast")

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".dcm", ".dicom", ".bmp", ".tif", ".tiff")


# -- inputs ---------------------------------------------------------------------------------------------------
def list_images(src: str, column: str = "path") -> List[str]:
    """Image files of a folder (recursive, sorted), one image file (by extension, or a DICOM by its
    preamble), or a CSV column (relative to the CSV's folder)."""
    if os.path.isfile(src) and _is_image_file(src):
        return [src]
    if os.path.isdir(src):
        out = []
        for dirpath, dirs, files in os.walk(src):
            dirs.sort()
            out += [os.path.join(dirpath, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTS)]
        if not out:
            raise ValueError(f"{src}: no image files (looked for {', '.join(IMAGE_EXTS)})")
        return out
    df = _read_csv(src, column)
    base = os.path.dirname(os.path.abspath(src))
    paths = []
    for i, p in enumerate(df[column]):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"{src}: column {column!r} row {i + 2} is empty")
        paths.append(p if os.path.isabs(p) else os.path.join(base, p))
    return paths


def _is_image_file(path: str) -> bool:
    # an image is not a CSV: parsed as one it fails with a tokenizing error far from the cause
    if path.lower().endswith(IMAGE_EXTS):
        return True
    from .data.images import is_dicom

    return is_dicom(path)


def read_texts(src: str, column: str = "text") -> Tuple[List[str], List[str]]:
    """(ids, texts) from a CSV: ``id`` column when present, else the data row number (1-based)."""
    df = _read_csv(src, column)
    ids = [str(v) for v in df["id"]] if "id" in df.columns else [str(i + 1) for i in range(len(df))]
    texts = ["" if not isinstance(t, str) else t for t in df[column]]
    return ids, texts


def _read_csv(src: str, column: str):
    optional_import("pandas", "reading a CSV list")
    df = read_csv_checked(src, [column], dtype=str, keep_default_na=False)
    if not len(df):
        raise ValueError(f"{src}: no rows")
    return df


# -- embedding: the evaluation's engine (medst_fast.eval.common), with this command's outputs -------------------
def embed_image_files(model, paths: Sequence[str], feature: str = "embedding", batch_size: int = 64,
                      workers: int = 0, precision: str = "fp32", progress: bool = True):
    """Returns (kept indices into ``paths``, float32 (N, D) array, [(index, reason)] skipped)."""
    fn = (lambda m, x: m.encode_image(x)) if feature == "embedding" else (lambda m, x: m.image_features(x))
    kept, emb, skipped = common.embed_dataset(model, common.ImageListDataset(paths, model.cfg.vision.img_size),
                                              common.image_step(model, fn), batch_size, workers, "images",
                                              precision, progress)
    return kept, emb.numpy(), skipped


def embed_text_list(model, tokenizer, texts: Sequence[str], batch_size: int = 256, precision: str = "fp32",
                    clean: bool = True, progress: bool = True):
    """Returns (kept indices, float32 (N, E) array, [(index, reason)] skipped: texts empty after cleaning)."""
    if isinstance(model.text, MissingTower):
        model.text()  # raises the folder's explanation (an image-encoder export has no text tower)
    if clean:
        texts = [clean_report(t)[0] if t.strip() else "" for t in texts]
    keep = [i for i, t in enumerate(texts) if t.strip()]
    skipped = [(i, "empty text") for i, t in enumerate(texts) if not t.strip()]
    if not keep:
        return keep, np.zeros((0, 0), np.float32), skipped
    emb = common.embed_texts(model, tokenizer, [texts[i] for i in keep], batch_size, desc="texts",
                             precision=precision, progress=progress)
    return keep, emb.numpy(), skipped


# -- output ---------------------------------------------------------------------------------------------------
def side_path(out: str, what: str) -> str:
    """FILE.npy -> FILE.<what>.txt (e.g. emb.skipped.txt, emb.ids.txt)."""
    return os.path.splitext(out)[0] + f".{what}.txt"


def lock_path(out: str) -> str:
    """The lock file beside ``out`` that serialises the runs writing it (kept: removing it would race)."""
    return out + ".lock"


@contextlib.contextmanager
def _output_lock(out: str):
    """flock on ``OUT.lock`` while a result set is put in place; a second run waits for the first."""
    fd = os.open(lock_path(out), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not lock_fd(fd, block=False):
            log.info("embed: another run is writing %s; waiting for it to finish", out)
            lock_fd(fd)
        yield
    finally:
        os.close(fd)  # releases the lock


def put_in_place(files) -> None:
    """Move a set of outputs in as one result: ``files`` is [(final path, write(tmp))], the main output LAST.

    Every file is written to a held temp first (a failure leaves the old result untouched). Then, under the
    output's lock: the old main output is removed, the others are renamed in, and the main output comes last,
    so two runs never leave one's array beside the other's ids, and a main output that exists always has
    its side files from the same run (a run killed in between leaves no main output, not a mixed set).
    Temps a killed run left beside these outputs are removed first.
    """
    main = files[-1][0]
    folder = os.path.dirname(os.path.abspath(main))
    remove_stale_temps(folder, targets=[os.path.basename(p) for p, _ in files])
    with contextlib.ExitStack() as held:
        temps = []
        for path, write in files:
            tmp = held.enter_context(held_temp_file(path))  # removed at the end unless moved in
            write(tmp)
            temps.append((tmp, path))
        with _output_lock(main):
            if os.path.exists(main):
                os.unlink(main)
            for tmp, path in temps:
                move_into_place(tmp, path)


def write_embeddings(out: str, ids: Sequence[str], emb: np.ndarray, skipped: Sequence[Tuple[str, str]]) -> None:
    """Write the array (or parquet table), its row ids and the skipped list as one result (``put_in_place``);
    refuses non-finite rows first."""
    if len(ids):
        require_finite(emb, "embeddings", "embed", names=list(ids))
    ext = os.path.splitext(out)[1].lower()
    if ext not in (".npy", ".parquet"):
        raise ValueError(f"--out {out}: the file name must end in .npy or .parquet")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    files = [(side_path(out, "skipped"), lambda p: _write_lines(p, [f"{k}\t{why}" for k, why in skipped]))]
    if ext == ".npy":
        def save_npy(p):
            with open(p, "wb") as f:
                np.save(f, emb)
        files += [(side_path(out, "ids"), lambda p: _write_lines(p, ids)), (out, save_npy)]
    else:
        pd = optional_import("pandas", "writing parquet", "parquet")
        optional_import("pyarrow", "writing parquet", "parquet")
        table = pd.DataFrame({"id": list(ids), "embedding": list(emb)})
        files.append((out, lambda p: table.to_parquet(p, index=False, engine="pyarrow")))
    put_in_place(files)


def _write_lines(path: str, lines) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(str(line).replace("\n", " ") + "\n")


# -- CLI ------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m medst_fast.embed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="save_pretrained folder (a run's final/ or final_encoder/)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="an image file (JPEG/PNG/DICOM), a folder of images, or a CSV with a "
                                      "'path' column")
    src.add_argument("--texts", help="CSV with a 'text' column (and optionally 'id')")
    p.add_argument("--out", required=True, help="FILE.npy or FILE.parquet")
    p.add_argument("--column", help="CSV column to read (default: path for --images, text for --texts)")
    p.add_argument("--feature", choices=["embedding", "cls"], default="embedding",
                   help="images: the normalised global embedding, or the 768-d final-LN CLS (linear-probe feature)")
    p.add_argument("--vocab", help="texts: vocab.txt (default: the checkpoint folder's)")
    p.add_argument("--no-clean", action="store_true", help="texts: embed as given (default: cleaned as in pretraining)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", help="default: cuda when available, else cpu")
    from .eval.common import PRECISIONS

    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32", help="autocast dtype (output is float32)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="image decoding processes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[List[str]] = None) -> dict:
    """Returns {"out", "rows", "skipped", "skipped_file"}."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.batch_size < 1:  # usage errors: exit status 2, naming the flag, before a model is loaded
        parser.error(f"argument --batch-size: must be >= 1, got {a.batch_size}")
    if a.workers < 0:
        parser.error(f"argument --workers: must be >= 0, got {a.workers}")
    if os.path.splitext(a.out)[1].lower() not in (".npy", ".parquet"):  # before minutes of embedding
        raise ValueError(f"--out {a.out}: the file name must end in .npy or .parquet")
    model = load_model(checkpoint=a.checkpoint, device=a.device)
    if a.images:
        paths = list_images(a.images, a.column or "path")
        kept, emb, skipped = embed_image_files(model, paths, a.feature, a.batch_size, a.workers, a.precision,
                                               not a.no_progress)
        ids = [paths[i] for i in kept]
        skipped = [(paths[i], why) for i, why in skipped]
    else:
        if a.feature != "embedding":
            raise SystemExit("--feature cls is an image feature; texts have the global embedding only")
        row_ids, texts = read_texts(a.texts, a.column or "text")
        tok = load_tokenizer(a.vocab, model, a.checkpoint)
        kept, emb, skipped = embed_text_list(model, tok, texts, a.batch_size, a.precision, not a.no_clean,
                                             not a.no_progress)
        ids = [row_ids[i] for i in kept]
        skipped = [(row_ids[i], why) for i, why in skipped]
    if not ids:
        raise SystemExit(f"embed: nothing to write: all {len(skipped)} inputs were skipped "
                         f"(first: {skipped[0][1] if skipped else '-'})")
    write_embeddings(a.out, ids, emb, skipped)
    skipped_file = side_path(a.out, "skipped")
    log.info("embed: wrote %d rows of %d to %s; %d skipped (listed in %s)", len(ids), emb.shape[1], a.out,
             len(skipped), skipped_file)
    return {"out": a.out, "rows": len(ids), "skipped": len(skipped), "skipped_file": skipped_file}


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as e:
        print(f"medst_fast.embed: error: {e}", file=sys.stderr)
        sys.exit(1)
