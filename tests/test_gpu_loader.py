"""gpu_loader: JPEG pre-validation, per-rank planning, backend degradation, the nvJPEG(+op) loader on CPU."""
import logging
import os

import numpy as np
import pytest
import torch

from medst_fast import ops_image as oi
from medst_fast.data import gpu_loader as gl


@pytest.fixture(scope="module")
def covid(shared_dir):
    d = os.path.join(shared_dir, "data", "covid-cxr")
    if not os.path.isfile(os.path.join(d, "manifest.csv")):
        pytest.skip("covid-cxr not found")
    return d


@pytest.fixture(scope="module")
def index_dir(covid, tmp_path_factory):
    from _loader_index import build_index

    out = str(tmp_path_factory.mktemp("idx"))
    build_index(covid, out, max_studies=14)
    return out


def test_jpeg_size_reads_header_and_rejects_broken_files(covid):
    from PIL import Image

    path = os.path.join(covid, "images", sorted(os.listdir(os.path.join(covid, "images")))[0])
    data = open(path, "rb").read()
    w, h = Image.open(path).size
    assert gl.jpeg_size(data, path) == (h, w)
    with pytest.raises(gl.CorruptImage, match="truncated"):
        gl.jpeg_size(data[:len(data) // 2], "x.jpg")
    with pytest.raises(gl.CorruptImage, match="x.png: not a JPEG"):
        gl.jpeg_size(b"\x89PNG\r\n\x1a\n" + bytes(100), "x.png")
    with pytest.raises(gl.CorruptImage, match="no frame header"):
        gl.jpeg_size(b"\xff\xd8\xff\xd9", "y.jpg")


def test_plan_epoch_shards_and_shuffles():
    ev = [gl.plan_epoch(11, 3, False, 0, 0, r, 2, False) for r in range(2)]
    flat = [s for r in ev for b in r for s in b]
    assert sorted(flat) == list(range(11))
    tr = [gl.plan_epoch(11, 2, True, 0, 0, r, 3, True) for r in range(3)]
    assert len({len(t) for t in tr}) == 1 and all(len(b) == 2 for t in tr for b in t)
    ids = [s for t in tr for b in t for s in b]
    assert len(ids) == len(set(ids))
    assert gl.plan_epoch(11, 2, True, 1, 0, 0, 1, True) != gl.plan_epoch(11, 2, True, 0, 0, 0, 1, True)
    with pytest.raises(ValueError, match="shard_id"):
        gl.plan_epoch(4, 2, True, 0, 0, 2, 2, True)


def test_nvjpeg_backend_on_cpu_matches_reference(index_dir):
    from PIL import Image

    from medst_fast.data.index import SeriesIndex

    index = SeriesIndex.load(index_dir)
    loader = gl.make_loader(index_dir, "test", None, 96, 2, False, backend="nvjpeg", device="cpu")
    assert isinstance(loader, gl.NvjpegSeriesLoader)
    by_id = {s.study_id: s for s in index.studies}
    rows = 0
    for batch in loader:
        B = len(batch["study_id"])
        rows += B
        assert batch["frontal"].shape == (B, 1, 96, 96) and batch["series_index"].shape == (B,)
        full = batch["n_full_series"]
        assert batch["step"][:4 * full].tolist() == [0, 1, 2, 3] * full
        imgs = [torch.from_numpy(np.array(Image.open(index.path(by_id[s].frontal_path)).convert("L")))
                for s in batch["study_id"]]
        ref = oi.resize_pad_crop_normalize_ref(imgs, 96, 110, oi.crop_offsets(B, 110, 96, False))
        assert (batch["frontal"] - ref).abs().max() <= 2 / 255 + 1e-5
    assert rows == len(index.studies)


def test_nvjpeg_backend_skips_undecodable_frontal(covid, tmp_path):
    from _loader_index import build_index

    good = os.path.join(covid, "images", sorted(os.listdir(os.path.join(covid, "images")))[1])
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\xff\xd8\xff\xc0\x00\x0b\x08\x00\x10\x00\x10\x01\x01\x11\x00" + os.urandom(500) + b"\xff\xd9")
    out = str(tmp_path / "idx")
    build_index(covid, out, max_studies=2, extra=[(good, ""), (str(junk), good), (good, "")])
    loader = gl.make_loader(out, "test", None, 96, 8, False, backend="nvjpeg", device="cpu")
    (batch,) = list(loader)
    assert len(batch["study_id"]) == 2 + 2  # the undecodable frontal drops its study
    assert loader.bad["dropped_study"] == 1 and loader.bad["unreadable_image"] == 1
    # the dropped study's series is rebuilt without it: rows stay consecutive per series
    assert batch["step"].tolist()[-2:] == [0, 1]


def test_degradation_chain_logs_one_line(index_dir, monkeypatch, caplog):
    pytest.importorskip("medst_fast.data.dataset")
    caplog.set_level(logging.INFO, logger="medst_fast")
    if not torch.cuda.is_available():
        loader = gl.make_loader(index_dir, "test", None, 96, 2, False, backend="auto", num_workers=0)
        assert isinstance(loader, torch.utils.data.DataLoader)
        msgs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loader:")]
        assert len(msgs) == 2 and "DALI" in msgs[0] and "PIL" in msgs[1]
        batch = next(iter(loader))
        assert batch["frontal"].shape[1:] == (1, 96, 96)
    caplog.clear()
    monkeypatch.setattr(gl, "_dali_importable", lambda: "ImportError: No module named 'nvidia.dali'")
    loader = gl.make_loader(index_dir, "test", None, 96, 2, False, backend="dali", device="cpu")
    assert isinstance(loader, gl.NvjpegSeriesLoader)
    msgs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loader:")]
    assert len(msgs) == 1 and "nvidia.dali" in msgs[0]
    monkeypatch.setattr(gl, "_torchvision_importable", lambda: "ImportError: torchvision")
    loader = gl.make_loader(index_dir, "test", None, 96, 2, False, backend="nvjpeg", num_workers=0)
    assert isinstance(loader, torch.utils.data.DataLoader)
    with pytest.raises(ValueError, match="backend"):
        gl.make_loader(index_dir, "test", None, 96, 2, False, backend="gpu")
