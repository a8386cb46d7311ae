"""DALI loader (CPU pipeline: device="cpu") against the PyTorch path and the PIL loader on the real covid-cxr images."""
import os

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali", reason="nvidia-dali not installed (optional extra [dali])")
pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from _loader_index import build_index  # noqa: E402
from medst_fast import ops_image as oi  # noqa: E402
from medst_fast.data.loaders import build_series_loader  # noqa: E402

GREY = 2.0 / 255.0 + 1e-5  # one grey level after normalisation


@pytest.fixture(scope="module")
def index_dir(covid, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("idx"))
    build_index(covid, out, max_studies=26)
    return out


def dali(index_dir, S, bs, train, **kw):
    return build_series_loader("dali", index_dir, "test", kw.pop("tokenizer", None), S, bs, train, device="cpu",
                               workers=kw.pop("workers", 2), **kw)


def centre(n, S):
    R = oi.resize_side(S)
    return torch.tensor([oi.crop_offsets(R, S, False)] * n)


def pil_reference(index, batch, S, filter, offsets_f=None, offsets_l=None):
    """PIL decode + the PyTorch reference transform (docs/interfaces.md), row by row of ``batch``."""
    by_id = {s.study_id: s for s in index.studies}
    R = oi.resize_side(S)
    studies = [by_id[i] for i in batch["study_id"]]
    load = lambda p: torch.from_numpy(np.array(Image.open(index.path(p)).convert("L")))  # noqa: E731
    cen = centre(len(studies), S)
    fr = oi.resize_pad_crop_normalize_ref([load(s.frontal_path) for s in studies], S, R,
                                          cen if offsets_f is None else offsets_f, filter)
    lat = torch.zeros_like(fr)
    rows = [b for b, s in enumerate(studies) if s.lateral_path]
    if rows:
        off = cen[rows] if offsets_l is None else offsets_l[rows]
        lat[rows] = oi.resize_pad_crop_normalize_ref([load(studies[b].lateral_path) for b in rows], S, R, off, filter)
    return fr, lat, torch.tensor([bool(s.lateral_path) for s in studies])


def _maxabs(d, mask):
    d = d[mask]
    return d.abs().max().item() if d.numel() else 0.0


def interior(index, batch, view, S, offsets, margin_extra=1):
    """(B, 1, S, S) mask of crop pixels whose bilinear filter window lies inside the image: DALI clamps to
    the edge there while torch/PIL renormalise the truncated filter, so only these pixels are compared."""
    by_id = {s.study_id: s for s in index.studies}
    R = oi.resize_side(S)
    mask = torch.zeros(len(batch["study_id"]), 1, S, S, dtype=torch.bool)
    for b, sid in enumerate(batch["study_id"]):
        path = getattr(by_id[sid], view + "_path")
        if not path:
            continue
        w, h = Image.open(index.path(path)).size
        nh, nw, top, left = oi.resize_geometry(h, w, R)
        m = int(np.ceil(max(h / nh, w / nw))) + margin_extra
        y0, x0 = int(offsets[b, 0]), int(offsets[b, 1])
        ys, ye = max(0, top + m - y0), min(S, top + nh - m - y0)
        xs, xe = max(0, left + m - x0), min(S, left + nw - m - x0)
        if ye > ys and xe > xs:
            mask[b, 0, ys:ye, xs:xe] = True
    return mask


@pytest.mark.parametrize("filter,S", [("area", 224), ("area", 96), ("bilinear", 96)])
def test_dali_cpu_eval_matches_pil_reference(index_dir, vocab_path, filter, S):
    from medst_fast.data.index import SeriesIndex
    from medst_fast.text import MedSTTokenizer

    index = SeriesIndex.load(index_dir)
    tok = MedSTTokenizer(vocab_path)
    loader = dali(index_dir, S, 3, False, tokenizer=tok, filter=filter)
    assert type(loader).__name__ == "DaliSeriesLoader" and loader.backend == "dali"
    n_rows, n_lat = 0, 0
    for batch in loader:
        fr, lat, has = pil_reference(index, batch, S, filter)
        assert batch["frontal"].shape == (len(fr), 1, S, S) and batch["frontal"].dtype == torch.float32
        assert torch.equal(batch["has_lateral"], has)
        if filter == "area":  # decode in DALI, transform by the op: exact everywhere
            assert (batch["frontal"] - fr).abs().max() <= GREY
            assert (batch["lateral"] - lat).abs().max() <= GREY
        else:  # DALI's own resize: exact away from the image edges (see interior())
            cen = centre(len(fr), S)
            for view, ref in (("frontal", fr), ("lateral", lat)):
                m = interior(index, batch, view, S, cen)
                assert m.float().mean() > 0.5 if view == "frontal" else True
                assert _maxabs(batch[view] - ref, m) <= GREY
        assert torch.all(batch["lateral"][~has] == 0)  # absent laterals: mid-grey (0 after normalisation)
        ref_tok = tok(batch["text"])
        for k in ("input_ids", "attention_mask", "word_slots"):
            assert torch.equal(batch[k], ref_tok[k])
        n_rows += len(fr)
        n_lat += int(has.sum())
    whole = len(index.series["test"]) // 3 * 3  # the sampler's whole batches
    assert n_rows == sum(len(s) for s in index.series["test"][:whole]) and n_lat > 0
    assert sum(loader.bad.values()) == 0


def test_dali_matches_the_pil_loader(index_dir):
    """Same batches as the trainer's PIL loader (rows, order, flags) and the same pixels within one grey level,
    with random crops: both draw them from the per-series seeded RNG."""
    for train in (False, True):
        kw = dict(seed=3)
        pil = build_series_loader("pil", index_dir, "test", None, 224, 4, train, device="cpu", workers=0, **kw)
        pil.set_epoch(1)
        d = dali(index_dir, 224, 4, train, **kw)
        d.set_epoch(1)
        a, b = list(pil), list(d)
        assert len(a) == len(b) == len(d) > 0
        for x, y in zip(a, b):
            for key in ("study_id", "n_full_series"):
                assert x[key] == y[key]
            for key in ("has_lateral", "series_index", "step"):
                assert torch.equal(x[key], y[key]), key
            for view in ("frontal", "lateral"):
                assert (x[view] - y[view]).abs().max() <= GREY, view


def test_dali_train_crops_match_nvjpeg_path_and_reproduce(index_dir):
    def epoch(backend, filter="area", e=0):
        loader = build_series_loader(backend, index_dir, "test", None, 96, 3, True, seed=5, device="cpu", workers=2,
                                     filter=filter)
        loader.set_epoch(e)
        return list(loader)

    a, b, c, n = epoch("dali"), epoch("dali"), epoch("dali", "bilinear"), epoch("nvjpeg")
    assert len(a) == len(b) == len(c) == len(n) > 0
    from medst_fast.data.index import SeriesIndex

    index = SeriesIndex.load(index_dir)
    seen_crops = set()
    for i, (x, y, z, w) in enumerate(zip(a, b, c, n)):
        assert x["study_id"] == y["study_id"] == z["study_id"] == w["study_id"]
        assert torch.equal(x["frontal"], y["frontal"]) and torch.equal(x["lateral"], y["lateral"])
        assert torch.equal(x["has_lateral"], w["has_lateral"])
        assert (x["frontal"] - w["frontal"]).abs().max() <= GREY  # DALI decode + op == torchvision decode + op
        if i >= 2:
            continue
        # the in-graph DALI path (resize + slice) honours the same random crop origins: recover each origin
        # from the op path's output, then compare DALI's bilinear output with the bilinear reference there
        for view in ("frontal", "lateral"):
            offs = torch.stack([_find_offset(index, sid, view, w[view][k], 96) for k, sid in enumerate(w["study_id"])])
            seen_crops.update(map(tuple, offs.tolist()))
            fr, lat, _ = pil_reference(index, w, 96, "bilinear", offs, offs)
            ref = fr if view == "frontal" else lat
            assert _maxabs(z[view] - ref, interior(index, w, view, 96, offs)) <= GREY
    assert len(seen_crops) > 3  # crops really are random
    e1 = epoch("dali", e=1)  # next epoch: new order and crops
    assert any(u["frontal"].shape != v["frontal"].shape or not torch.equal(u["frontal"], v["frontal"])
               for u, v in zip(a, e1))


def _find_offset(index, sid, view, out, S):
    """The crop origin that reproduces ``out`` with the reference (area filter), by search over R-S+1 squared."""
    s = {x.study_id: x for x in index.studies}[sid]
    path = getattr(s, view + "_path")
    if not path:
        return torch.zeros(2, dtype=torch.long)
    R = oi.resize_side(S)
    img = torch.from_numpy(np.array(Image.open(index.path(path)).convert("L")))
    full = oi.resize_pad_crop_normalize_ref([img], R, R, torch.zeros(1, 2, dtype=torch.long))[0, 0]
    for y in range(R - S + 1):
        for x in range(R - S + 1):
            if (full[y:y + S, x:x + S] - out[0]).abs().max() <= GREY:
                return torch.tensor([y, x])
    raise AssertionError(f"no crop of {path} matches the loader output")


def test_dali_skips_and_counts_corrupt_images(covid, tmp_path):
    good = os.path.join(covid, "images", sorted(os.listdir(os.path.join(covid, "images")))[0])
    data = open(good, "rb").read()
    trunc = tmp_path / "truncated.jpg"
    trunc.write_bytes(data[: len(data) // 2])
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\xff\xd8" + os.urandom(2000) + b"\xff\xd9")  # valid markers, undecodable body
    out = str(tmp_path / "idx")
    build_index(covid, out, max_studies=3, extra=[(str(trunc), ""), (good, str(junk)), (good, str(tmp_path / "no.jpg"))])
    loader = dali(out, 96, 2, False, workers=1)
    batches = list(loader)
    ids = [sid for b in batches for sid in b["study_id"]]
    assert len(ids) == 3 + 2  # the truncated frontal drops its study
    last = batches[-1]
    assert not last["has_lateral"][-2:].any()  # undecodable and missing laterals become absent views
    assert dict(loader.bad) == {"dropped_study": 1, "missing_image": 1, "unreadable_image": 2}
    pil = build_series_loader("pil", out, "test", None, 96, 2, False, device="cpu", workers=0)
    assert [sid for b in pil for sid in b["study_id"]] == ids and pil.bad == loader.bad


def test_dali_decode_failure_falls_back_to_the_cpu(covid, tmp_path, caplog):
    """A file that passes the header check but that DALI cannot decode fails the whole DALI batch: the batch
    is decoded on the CPU instead, so its good images still arrive and only the bad one is counted."""
    good = os.path.join(covid, "images", sorted(os.listdir(os.path.join(covid, "images")))[0])
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\xff\xd8\xff\xc0\x00\x0b\x08\x00\x10\x00\x10\x01\x01\x11\x00" + os.urandom(500) + b"\xff\xd9")
    out = str(tmp_path / "idx")
    build_index(covid, out, max_studies=2, extra=[(good, str(junk)), (good, good)])
    for filter in ("area", "bilinear"):
        loader = dali(out, 96, 2, False, filter=filter)
        (batch,) = list(loader)
        assert len(batch["study_id"]) == 4 and batch["has_lateral"][-2:].tolist() == [False, True]
        assert dict(loader.bad) == {"unreadable_image": 1} and loader.cpu_decoded["decoder_failed"] >= 1
    assert any("DALI failed on a batch" in r.getMessage() for r in caplog.records)
