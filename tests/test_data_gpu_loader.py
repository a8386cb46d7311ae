"""nvJPEG back-end and the batched loaders' shared reading: JPEG pre-validation, routing to the CPU decoder,
the torchvision decoder + op on the CPU against the reference, decode failures; the background producer
(order, bound, errors, early stop), the decoder probe and its PIL fallback, counts merged on hand-over, and
on CUDA the decode stream's hand-over under allocator reuse."""
import logging
import os
import threading
import time
import traceback

import numpy as np
import pytest
import torch

from medst_fast import ops_image as oi
from medst_fast.data import batching as bt
from medst_fast.data import gpu_loader as gl
from medst_fast.data.gpu_loader import NvjpegSeriesLoader
from medst_fast.data.images import load_gray
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


# -- the decode thread and its hand-over ----------------------------------------------------------------------


def _threads_named(prefix):
    return [t for t in threading.enumerate() if t.name.startswith(prefix) and t.is_alive()]


def _wait_gone(prefix, timeout=10.0):
    end = time.monotonic() + timeout
    while _threads_named(prefix) and time.monotonic() < end:
        time.sleep(0.01)
    return _threads_named(prefix)


def test_background_keeps_order_and_stays_bounded():
    made = []

    def source():
        for i in range(20):
            made.append(i)
            yield i

    it = bt.background(source, 2, "medst-test-order")
    assert next(it) == 0
    time.sleep(0.2)  # give the producer every chance to run ahead
    # taken 1, at most 2 queued, and one more produced while it waits on the full queue
    assert len(made) <= 1 + 2 + 1
    assert [0] + list(it) == list(range(20))
    assert not _wait_gone("medst-test-order")


def test_background_raises_the_producer_error_in_order():
    def source():
        yield 1
        yield 2
        raise ValueError("bad batch 3")

    got = []
    with pytest.raises(ValueError, match="bad batch 3") as info:
        for x in bt.background(source, 4, "medst-test-error"):
            got.append(x)
    assert got == [1, 2]
    # the traceback still reaches the producer's frame
    assert any(f.name == "source" for f in traceback.extract_tb(info.value.__traceback__))
    assert not _wait_gone("medst-test-error")


def test_background_closes_its_source_in_the_producer_thread_when_the_consumer_stops():
    closed_in = []

    def source():
        try:
            for i in range(10 ** 6):
                yield i
        finally:
            closed_in.append(threading.current_thread().name)

    it = bt.background(source, 2, "medst-test-close")
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()
    assert not _threads_named("medst-test-close")  # close() returns after the thread has ended
    assert closed_in == ["medst-test-close"]


def test_probe_tries_the_next_file_when_the_cpu_cannot_read_it_either(tmp_path, covid):
    good = [_first_image(covid, k) for k in range(2)]
    png = str(tmp_path / "x.png")
    open(png, "wb").write(b"\x89PNG\r\n\x1a\n" + bytes(50))  # not a JPEG: never probed
    calls = []

    def decode_fails_on_first(data):
        calls.append(data)
        if len(calls) == 1:
            raise RuntimeError("Error while decoding JPEG images\nmore")
        return torch.zeros(1, *bt.jpeg_size(data))

    # the first JPEG fails on both decoders (a bad file): the probe goes on to the next one, which works
    assert gl.probe_decoder(decode_fails_on_first, iter([png] + good), cpu_ok=lambda p: False) is None
    assert len(calls) == 2
    # one failure on a file the CPU reads, then a success: the decoder works (that file is of an odd kind)
    calls.clear()
    assert gl.probe_decoder(decode_fails_on_first, iter(good), cpu_ok=lambda p: True) is None and len(calls) == 2

    # failing on every good file: the decoder's fault, reported with the first file and the error's first line
    def always_fails(data):
        calls.append(data)
        raise RuntimeError("Error while decoding JPEG images\nmore")

    calls.clear()
    why = gl.probe_decoder(always_fails, iter(good * 5), cpu_ok=lambda p: True)
    assert why == f"{good[0]} (RuntimeError: Error while decoding JPEG images)" and len(calls) == gl.PROBE_TRIES
    calls.clear()
    assert gl.probe_decoder(always_fails, iter(good[:1]), cpu_ok=lambda p: True).startswith(good[0])
    assert len(calls) == 1  # all there was
    # a wrong size is a failure too; nothing to probe (no JPEG within the limit) is not
    assert "decoded size" in gl.probe_decoder(lambda d: torch.zeros(1, 3, 3), iter(good))
    assert gl.probe_decoder(lambda d: 1 / 0, iter([png] * 3)) is None
    assert gl.probe_decoder(lambda d: 1 / 0, iter([png] + good), limit=1) is None


def _pil_frontals(index, batch, train=False):
    """The frontal rows as the project's CPU decoder + the op give them (eval crops: centre)."""
    by_id = {s.study_id: s for s in index.studies}
    imgs = [torch.from_numpy(np.array(load_gray(index.path(by_id[s].frontal_path)), dtype=np.uint8))
            for s in batch["study_id"]]
    off = [oi.crop_offsets(110, 96, False)] * len(imgs)
    return oi.resize_pad_crop_normalize(imgs, 96, 110, off)


def test_failed_probe_decodes_the_run_with_pil_and_logs_once(index_dir, monkeypatch, caplog):
    from medst_fast.data.index import SeriesIndex

    calls = []

    def broken_decode(data, mode=None, device=None):
        calls.append(1)
        raise RuntimeError("decode_jpegs_cuda: torchvision not compiled with nvJPEG support")

    real = gl.import_decode_jpeg()
    monkeypatch.setattr(gl, "import_decode_jpeg", lambda: (broken_decode, real[1]))
    index = SeriesIndex.load(index_dir)
    with caplog.at_level(logging.INFO, logger="medst_fast"):
        loader = build_series_loader("nvjpeg", index_dir, "test", None, 96, 2, False, device="cpu", workers=2)
        batches = list(loader)
    lines = [r.getMessage() for r in caplog.records if "nvjpeg" in r.getMessage() and r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "decoded with PIL on the CPU" in lines[0] and "not compiled with nvJPEG" in lines[0]
    assert len(calls) == gl.PROBE_TRIES  # the probe's calls only: the run never calls the broken decoder
    n_images = 0
    for batch in batches:
        torch.testing.assert_close(batch["frontal"], _pil_frontals(index, batch), atol=1e-6, rtol=0)
        n_images += len(batch["study_id"]) + int(batch["has_lateral"].sum())
    assert n_images > 0 and loader.cpu_decoded == {gl.UNAVAILABLE: n_images} and sum(loader.bad.values()) == 0


def test_working_probe_keeps_the_batched_decoder(index_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="medst_fast"):
        loader = build_series_loader("nvjpeg", index_dir, "test", None, 96, 2, False, device="cpu", workers=2)
    assert loader.reader.cpu_only == "" and not [r for r in caplog.records if "nvjpeg" in r.getMessage()]


def test_decode_errors_reach_the_consumer_and_threads_end(index_dir, monkeypatch):
    loader = build_series_loader("nvjpeg", index_dir, "test", None, 96, 1, False, device="cpu", workers=2)
    assert len(loader) >= 3
    real, seen = loader._batch, []

    def failing(plan):
        seen.append(1)
        if len(seen) == 2:
            raise RuntimeError("decode failed on batch 2")
        return real(plan)

    monkeypatch.setattr(loader, "_batch", failing)
    got = []
    with pytest.raises(RuntimeError, match="decode failed on batch 2"):
        for b in loader:
            got.append(b)
    assert len(got) == 1
    assert not _wait_gone("medst-nvjpeg")
    # stopping early ends the decode and reader threads; a new pass starts from the sampler's first batch
    monkeypatch.setattr(loader, "_batch", real)
    it = iter(loader)
    first = next(it)
    it.close()
    assert not _threads_named("medst-nvjpeg")
    again = next(iter(loader))
    assert first["study_id"] == again["study_id"] and torch.equal(first["frontal"], again["frontal"])


def test_counts_are_merged_when_the_trainer_takes_the_batch(covid, tmp_path, monkeypatch):
    """The decode thread runs ahead; what it counts for a batch must reach ``loader.bad`` only when that batch
    is taken, so a checkpoint after step k counts steps <= k (and a resume does not count a batch twice)."""
    from _loader_index import build_index

    good = _first_image(covid, 1)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\xff\xd8\xff\xc0\x00\x0b\x08\x00\x10\x00\x10\x01\x01\x11\x00" + os.urandom(500) + b"\xff\xd9")
    out = str(tmp_path / "idx")
    build_index(covid, out, max_studies=2, extra=[(good, ""), (str(junk), good), (good, "")])
    loader = build_series_loader("nvjpeg", out, "test", None, 96, 1, False, device="cpu", workers=1)
    assert len(loader) == 2  # the covid series first, then the one with the junk frontal
    prepared = threading.Event()
    real = loader._prepare

    def prepare(plan, n):
        p = real(plan, n)
        if plan.series and any(st.frontal.path == str(junk) for s in plan.series for st in s):
            prepared.set()
        return p

    monkeypatch.setattr(loader, "_prepare", prepare)
    it = iter(loader)
    next(it)
    assert prepared.wait(30)  # the second batch, with the bad file, is decoded and counted in its plan...
    assert sum(loader.bad.values()) == 0 and loader.cpu_decoded == {}  # ...but not taken yet
    next(it)
    assert dict(loader.bad) == {"dropped_study": 1, "unreadable_image": 1}


@pytest.mark.cuda
def test_nvjpeg_on_cuda_hands_over_batches_equal_to_pil(index_dir):
    from medst_fast.data.index import SeriesIndex

    index = SeriesIndex.load(index_dir)
    loader = build_series_loader("nvjpeg", index_dir, "test", None, 96, 2, False, device="cuda", workers=2)
    assert loader.reader.cpu_only == "" and loader._stream is not None
    n = 0
    for batch in loader:
        assert batch["frontal"].is_cuda and batch["lateral"].is_cuda and not batch["has_lateral"].is_cuda
        ref = _pil_frontals(index, batch)
        diff = (batch["frontal"].cpu() - ref).abs()
        # nvJPEG's IDCT and colour handling differ from libjpeg by a grey level or two, not more
        assert diff.max() <= 3 * GREY and diff.mean() <= 0.5 * GREY, (diff.max(), diff.mean())
        n += 1
    assert n > 0 and loader.cpu_decoded == {}


@pytest.mark.cuda
def test_nvjpeg_on_cuda_survives_the_allocator_reusing_freed_memory(index_dir):
    """The race the decode stream removes: right after taking a batch the training thread frees memory and
    allocates blocks of the same sizes (as the optimizer step does with gradients) and overwrites them on
    its stream while later batches decode. Every batch must still equal the PIL reference."""
    from medst_fast.data.index import SeriesIndex

    index = SeriesIndex.load(index_dir)
    loader = build_series_loader("nvjpeg", index_dir, "test", None, 96, 2, False, device="cuda", workers=2)
    loader.prefetch = 3
    dev = loader.device
    sizes = set()
    for rel in {s.frontal_path for s in index.studies} | {s.lateral_path for s in index.studies if s.lateral_path}:
        h, w = bt.jpeg_size(open(index.path(rel), "rb").read())
        sizes.add(h * w)
    held, kept = None, []
    a = torch.randn(4096, 4096, device=dev)
    for _ in range(3):  # three epochs over the split: many reuses
        for batch in loader:
            f = batch["frontal"]
            snap = f.clone()  # on this stream, after the hand-over's wait: the finished decode
            for _ in range(4):  # keep this stream busy while the next batches decode
                a = (a @ a).clamp_(-1, 1)
            late = f.double().sum()  # queued behind that work; f is freed below before it runs
            kept.append((batch["study_id"], snap, late))
            del batch, f  # record_stream keeps the decode stream off this memory until `late` has run
            held = None  # free, then take the same sizes again and write over them on this stream
            held = [torch.full((n,), 255, dtype=torch.uint8, device=dev) for n in sorted(sizes)]
            held.append(torch.full_like(snap, 7.0))
    torch.cuda.synchronize(dev)
    for ids, snap, late in kept:
        assert late.item() == snap.double().sum().item()
        diff = (snap.cpu() - _pil_frontals(index, {"study_id": ids})).abs()
        assert diff.max() <= 3 * GREY and diff.mean() <= 0.5 * GREY, (diff.max(), diff.mean())
