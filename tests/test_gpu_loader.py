"""nvJPEG back-end and the batched loaders' shared reading: JPEG pre-validation, routing to the CPU decoder,
the torchvision decoder + op on the CPU against the reference, decode failures."""
import os

import numpy as np
import pytest
import torch

from medst_fast import ops_image as oi
from medst_fast.data import batching as bt
from medst_fast.data.gpu_loader import NvjpegSeriesLoader
from medst_fast.data.loaders import build_series_loader

GREY = 2.0 / 255.0 + 1e-5


@pytest.fixture(scope="module")
def index_dir(covid, tmp_path_factory):
    from _loader_index import build_index

    out = str(tmp_path_factory.mktemp("idx"))
    build_index(covid, out, max_studies=14)
    return out


def _first_image(covid, k=0):
    return os.path.join(covid, "images", sorted(os.listdir(os.path.join(covid, "images")))[k])


def test_jpeg_size_reads_header_and_rejects_broken_files(covid):
    from PIL import Image

    path = _first_image(covid)
    data = open(path, "rb").read()
    w, h = Image.open(path).size
    assert bt.jpeg_size(data, path) == (h, w)
    with pytest.raises(bt.CorruptImage, match="truncated"):
        bt.jpeg_size(data[:len(data) // 2], "x.jpg")
    with pytest.raises(bt.CorruptImage, match="x.png: not a JPEG"):
        bt.jpeg_size(b"\x89PNG\r\n\x1a\n" + bytes(100), "x.png")
    with pytest.raises(bt.CorruptImage, match="no frame header"):
        bt.jpeg_size(b"\xff\xd8\xff\xd9", "y.jpg")


def test_gpu_decodable_takes_8bit_grey_and_ycbcr_only(tmp_path):
    from _loader_index import write_format

    want = {"jpeg": True, "jpeg_rgb": True, "jpeg_progressive": True, "jpeg_cmyk": False}
    for kind, ok in want.items():
        p = str(tmp_path / f"{kind}.jpg")
        write_format(p, kind, 40, 30, seed=1)
        assert bt.gpu_decodable(open(p, "rb").read()) is ok, kind


def test_reader_routes_formats_and_errors(tmp_path):
    """JPEGs stay encoded; other formats and a failed header check are decoded on the CPU; the rest are errors."""
    from _loader_index import write_format
    from medst_fast.data.index import SeriesIndex

    paths = {}
    for kind, ext in [("jpeg", ".jpg"), ("png16", ".png"), ("jpeg_cmyk", ".jpg"), ("truncated_jpeg", ".jpg")]:
        paths[kind] = str(tmp_path / f"{kind}{ext}")
        write_format(paths[kind], kind, 50, 40, seed=2)
    data = open(paths["jpeg"], "rb").read()
    paths["trailing"] = str(tmp_path / "trailing.jpg")  # decodable, but the EOI marker is not near the end
    open(paths["trailing"], "wb").write(data + bytes(200))
    r = bt.SeriesReader(SeriesIndex([], {}, {"image_root": str(tmp_path)}), "train", 32, False, 0)
    assert r.read_image(paths["jpeg"]).encoded == data
    for kind, reason in [("png16", "not_jpeg"), ("jpeg_cmyk", "jpeg_format"), ("trailing", "jpeg_header")]:
        item = r.read_image(paths[kind])
        assert item.encoded is None and item.pixels.shape == (50, 40) and item.pixels.dtype == np.uint8, kind
        assert item.cpu_reason == reason
    assert "truncated" in str(r.read_image(paths["truncated_jpeg"]))
    assert "not found" in str(r.read_image(str(tmp_path / "nope.jpg")))


def test_nvjpeg_backend_on_cpu_matches_reference(index_dir):
    from PIL import Image

    from medst_fast.data.index import SeriesIndex

    index = SeriesIndex.load(index_dir)
    loader = build_series_loader("nvjpeg", index_dir, "test", None, 96, 2, False, device="cpu", workers=2)
    assert isinstance(loader, NvjpegSeriesLoader) and loader.backend == "nvjpeg"
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
        ref = oi.resize_pad_crop_normalize_ref(imgs, 96, 110, [oi.crop_offsets(110, 96, False)] * B)
        assert (batch["frontal"] - ref).abs().max() <= GREY
    n_series = len(index.series["test"]) // 2 * 2  # the sampler's whole batches
    assert rows == sum(len(s) for s in index.series["test"][:n_series]) > 0
    assert sum(loader.bad.values()) == 0 and loader.cpu_decoded == {}


def test_nvjpeg_backend_skips_undecodable_frontal(covid, tmp_path):
    """A file with a valid frame header and a random body passes the header check, fails the batched
    decoder and the CPU decoder: its study is dropped and counted as the PIL path counts it."""
    from _loader_index import build_index

    good = _first_image(covid, 1)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\xff\xd8\xff\xc0\x00\x0b\x08\x00\x10\x00\x10\x01\x01\x11\x00" + os.urandom(500) + b"\xff\xd9")
    out = str(tmp_path / "idx")
    build_index(covid, out, max_studies=2, extra=[(good, ""), (str(junk), good), (good, "")])
    counts = {}
    for backend in ("nvjpeg", "pil"):
        loader = build_series_loader(backend, out, "test", None, 96, 2, False, device="cpu", workers=0)
        (batch,) = list(loader)
        assert len(batch["study_id"]) == 2 + 2  # the undecodable frontal drops its study
        assert batch["step"].tolist()[-2:] == [0, 1]  # its series is rebuilt without it, rows consecutive
        counts[backend] = dict(loader.bad)
    assert counts["nvjpeg"] == counts["pil"] == {"dropped_study": 1, "unreadable_image": 1}
