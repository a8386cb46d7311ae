"""DALI loader (CPU pipeline, device_id=None) against the PyTorch path on the real covid-cxr images."""
import os

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali", reason="nvidia-dali not installed (optional extra [dali])")
pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from _loader_index import build_index  # noqa: E402
from medst_fast import ops_image as oi  # noqa: E402
from medst_fast.data.gpu_loader import make_loader  # noqa: E402

GREY = 2.0 / 255.0 + 1e-5  # one grey level after normalisation


@pytest.fixture(scope="module")
def covid(shared_dir):
    d = os.path.join(shared_dir, "data", "covid-cxr")
    if not os.path.isfile(os.path.join(d, "manifest.csv")):
        pytest.skip("covid-cxr not found")
    return d


@pytest.fixture(scope="module")
def index_dir(covid, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("idx"))
    build_index(covid, out, max_studies=26)
    return out


def pil_reference(index, batch, S, filter, offsets_f=None, offsets_l=None):
    """PIL decode + the PyTorch reference transform (docs/interfaces.md), row by row of ``batch``."""
    by_id = {s.study_id: s for s in index.studies}
    R = oi.resize_target(S)
    studies = [by_id[i] for i in batch["study_id"]]
    load = lambda p: torch.from_numpy(np.array(Image.open(index.path(p)).convert("L")))  # noqa: E731
    cen = oi.crop_offsets(len(studies), R, S, False)
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
    R = oi.resize_target(S)
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
    loader = make_loader(index_dir, "test", tok, S, 3, False, backend="dali", filter=filter, device_id=None,
                         num_threads=2)
    assert type(loader).__name__ == "DaliSeriesLoader"
    n_rows, n_lat = 0, 0
    for batch in loader:
        fr, lat, has = pil_reference(index, batch, S, filter)
        assert batch["frontal"].shape == (len(fr), 1, S, S) and batch["frontal"].dtype == torch.float32
        assert torch.equal(batch["has_lateral"], has)
        if filter == "area":  # decode in DALI, transform by the op: exact everywhere
            assert (batch["frontal"] - fr).abs().max() <= GREY
            assert (batch["lateral"] - lat).abs().max() <= GREY
        else:  # DALI's own resize: exact away from the image edges (see interior())
            cen = oi.crop_offsets(len(fr), oi.resize_target(S), S, False)
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
    assert n_rows == len(index.studies) and n_lat > 0
    assert sum(loader.bad.values()) == 0


def test_dali_batch_layout_matches_series_dataset(index_dir):
    """Same rows, order and flags as collate_series, and the same pixels for images that shrink by exactly 2
    (512 x even), the one case where the PyTorch loader's PIL BOX filter is exact area averaging."""
    ds_mod = pytest.importorskip("medst_fast.data.dataset")
    ds = ds_mod.SeriesDataset(index_dir, "test", None, img_size=224, train=False)
    loader = make_loader(index_dir, "test", None, 224, 4, False, backend="dali", device_id=None, num_threads=2)
    from medst_fast.data.index import SeriesIndex

    index = SeriesIndex.load(index_dir)
    by_id = {s.study_id: s for s in index.studies}
    n_cmp = 0
    for k, batch in enumerate(loader):
        ref = ds_mod.collate_series([ds[i] for i in range(4 * k, min(4 * k + 4, len(ds)))])
        for key in ("study_id", "n_full_series"):
            assert batch[key] == ref[key]
        for key in ("has_lateral", "series_index", "step"):
            assert torch.equal(batch[key], ref[key]), key
        for b, sid in enumerate(batch["study_id"]):
            s = by_id[sid]
            for view, path in (("frontal", s.frontal_path), ("lateral", s.lateral_path)):
                size = Image.open(index.path(path)).size if path else (0, 1)
                if max(size) == 512 and size[0] % 2 == 0 and size[1] % 2 == 0:
                    n_cmp += 1
                    assert (batch[view][b] - ref[view][b]).abs().max() <= GREY, (sid, view)
    assert n_cmp >= 3


def test_dali_train_crops_match_nvjpeg_path_and_reproduce(index_dir):
    kw = dict(seed=5, device_id=None, num_threads=2)
    a = list(make_loader(index_dir, "test", None, 96, 3, True, backend="dali", filter="area", **kw))
    b = list(make_loader(index_dir, "test", None, 96, 3, True, backend="dali", filter="area", **kw))
    c = list(make_loader(index_dir, "test", None, 96, 3, True, backend="dali", filter="bilinear", **kw))
    kw.pop("device_id"), kw.pop("num_threads")
    n = list(make_loader(index_dir, "test", None, 96, 3, True, backend="nvjpeg", filter="area", **kw))
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
    loader = make_loader(index_dir, "test", None, 96, 3, True, backend="dali", **kw)
    e0 = [x["frontal"] for x in loader]
    e1 = [x["frontal"] for x in loader]  # next epoch: new order and crops
    assert any(u.shape != v.shape or not torch.equal(u, v) for u, v in zip(e0, e1))


def _find_offset(index, sid, view, out, S):
    """The crop origin that reproduces ``out`` with the reference (area filter), by search over R-S+1 squared."""
    s = {x.study_id: x for x in index.studies}[sid]
    path = getattr(s, view + "_path")
    if not path:
        return torch.zeros(2, dtype=torch.long)
    R = oi.resize_target(S)
    img = torch.from_numpy(np.array(Image.open(index.path(path)).convert("L")))
    full = oi.resize_pad_crop_normalize_ref([img], R, R, torch.zeros(1, 2, dtype=torch.long))[0, 0]
    for y in range(R - S + 1):
        for x in range(R - S + 1):
            if (full[y:y + S, x:x + S] - out[0]).abs().max() <= GREY:
                return torch.tensor([y, x])
    raise AssertionError(f"no crop of {path} matches the loader output")


def test_dali_shards_partition_series(index_dir):
    ids = []
    for shard in range(2):
        loader = make_loader(index_dir, "test", None, 96, 2, False, backend="dali", device_id=None, num_threads=1,
                             shard_id=shard, num_shards=2)
        ids.append([sid for b in loader for sid in b["study_id"]])
    assert not set(ids[0]) & set(ids[1])
    from medst_fast.data.index import SeriesIndex

    assert sorted(ids[0] + ids[1]) == sorted(s.study_id for s in SeriesIndex.load(index_dir).studies)
    counts = [len(make_loader(index_dir, "test", None, 96, 2, True, backend="dali", device_id=None, shard_id=s,
                              num_shards=3)) for s in range(3)]
    assert len(set(counts)) == 1  # training: the same number of steps on every rank


def test_dali_skips_and_counts_corrupt_images(covid, tmp_path):
    good = os.path.join(covid, "images", sorted(os.listdir(os.path.join(covid, "images")))[0])
    data = open(good, "rb").read()
    trunc = tmp_path / "truncated.jpg"
    trunc.write_bytes(data[: len(data) // 2])
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\xff\xd8" + os.urandom(2000) + b"\xff\xd9")  # valid markers, undecodable body
    out = str(tmp_path / "idx")
    build_index(covid, out, max_studies=3, extra=[(str(trunc), ""), (good, str(junk)), (good, str(tmp_path / "no.jpg"))])
    loader = make_loader(out, "test", None, 96, 8, False, backend="dali", device_id=None, num_threads=1)
    batches = list(loader)
    ids = [sid for b in batches for sid in b["study_id"]]
    assert len(ids) == 3 + 2  # the truncated frontal drops its study
    last = batches[-1]
    assert not last["has_lateral"][-2:].any()  # undecodable and missing laterals become absent views
    assert loader.bad["dropped_study"] == 1 and loader.bad["missing_image"] == 1
    assert loader.bad["unreadable_image"] == 2
