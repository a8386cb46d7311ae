"""build_series_loader: every back-end gives the trainer's batches (series, order, crops, counts, pixels
within one grey level) on an index holding every image format; resume, sharding, back-end choice."""
import logging

import pytest
import torch

from _loader_index import mixed_format_index
from medst_fast.data import loaders as L
from medst_fast.data.images import load_gray
from medst_fast.data.index import SeriesIndex
from medst_fast.data.transforms import eval_transform

pytest.importorskip("pydicom", reason="the mixed-format index has DICOM files")
GREY = 2.0 / 255.0 + 1e-5  # one grey level after (x/255 - 0.5)/0.5
S = 64


def _batched_backends():
    out = ["nvjpeg"]
    if L.dali_missing() is None:
        out.append("dali")
    return out


BACKENDS = ["pil"] + _batched_backends()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    return mixed_format_index(str(tmp_path_factory.mktemp("mixed")))


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """15 series (the mixed pattern three times), for sharding and resume."""
    return mixed_format_index(str(tmp_path_factory.mktemp("many")), repeat=3)


@pytest.fixture(scope="module")
def tok(vocab_path):
    from medst_fast.text import MedSTTokenizer

    return MedSTTokenizer(vocab_path)


def _loader(backend, index, train, bs=1, **kw):
    kw.setdefault("workers", 0 if backend == "pil" else 2)
    return L.build_series_loader(backend, index, "train", kw.pop("tokenizer", None), S, bs, train,
                                 device="cpu", **kw)


def _epoch(loader, epoch=0, start=0):
    loader.set_epoch(epoch, start)
    return list(loader)


def assert_same_batches(a, b, exact=False):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in ("study_id", "text", "n_full_series"):
            assert x[k] == y[k], k
        for k in ("has_lateral", "series_index", "step", "input_ids", "attention_mask", "word_slots"):
            if k in x:
                assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k
        assert x["has_lateral"].device.type == "cpu" and x["has_lateral"].dtype == torch.bool
        for k in ("frontal", "lateral"):
            assert x[k].shape == y[k].shape and x[k].dtype == y[k].dtype == torch.float32
            if exact:
                assert torch.equal(x[k], y[k]), k
            else:
                assert (x[k] - y[k]).abs().max().item() <= GREY, k


EXPECTED_BAD = {"missing_image": 1, "unreadable_image": 2, "dropped_study": 1}


@pytest.mark.parametrize("train", [False, True])
def test_every_backend_same_studies_and_pixels_on_mixed_formats(mixed, tok, train):
    runs = {}
    for be in BACKENDS:
        loader = _loader(be, mixed, train, tokenizer=tok, seed=7)
        assert loader.backend == be and loader.reason.startswith("requested")
        runs[be] = (_epoch(loader, epoch=3), loader)
    ref, pil = runs["pil"]
    assert dict(pil.bad) == EXPECTED_BAD
    rows = [sid for b in ref for sid in b["study_id"]]
    assert len(rows) == 12 and "m2_1" not in rows  # 13 studies, the truncated frontal drops one
    assert sum(int(b["has_lateral"].sum()) for b in ref) == 8  # missing and truncated laterals are absent
    for be in BACKENDS[1:]:
        batches, loader = runs[be]
        assert_same_batches(ref, batches)
        assert dict(loader.bad) == EXPECTED_BAD
        assert loader.cpu_decoded["not_jpeg"] == 12  # PNG + DICOM reach the model through the CPU decoder
    if not train:  # against the definition applied to the project's decoder, image by image
        index = SeriesIndex.load(mixed)
        by_id = {s.study_id: s for s in index.studies}
        for be, (batches, _) in runs.items():
            for b in batches:
                for k, sid in enumerate(b["study_id"]):
                    ref_img = eval_transform(load_gray(index.path(by_id[sid].frontal_path)), S)
                    assert (b["frontal"][k] - ref_img).abs().max().item() <= GREY, (be, sid)


def test_pil_backend_is_the_trainers_pipeline(many):
    from medst_fast.data.dataset import SeriesCollate, SeriesDataset
    from medst_fast.train.data import SeriesBatchSampler, make_loader

    ds = SeriesDataset(many, "train", None, img_size=S, train=True)
    for rank in (0, 1):
        sampler = SeriesBatchSampler(len(ds), 2, rank, 2, seed=11)
        sampler.set_epoch(1, 1)
        trainer = list(make_loader(ds, sampler, SeriesCollate(), 0, 11, pin_memory=False))
        ours = _loader("pil", many, True, bs=2, rank=rank, world_size=2, seed=11)
        assert len(ours) == len(sampler) == 3
        assert_same_batches(trainer, _epoch(ours, 1, 1), exact=True)


def test_pil_workers_bring_their_counts_back(mixed):
    """With worker processes the dataset counts in the workers; the counts still reach loader.bad."""
    one, two = _loader("pil", mixed, True, seed=4, workers=0), _loader("pil", mixed, True, seed=4, workers=2)
    assert_same_batches(_epoch(one), _epoch(two), exact=True)
    assert dict(two.bad) == dict(one.bad) == EXPECTED_BAD


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_and_ddp_shards(many, backend):
    full, shards = {}, []
    for rank in (0, 1):
        loader = _loader(backend, many, True, bs=2, rank=rank, world_size=2, seed=5)
        assert len(loader) == 3  # 15 series // (2 per batch * 2 ranks)
        full[rank] = _epoch(loader, 2)
        assert_same_batches(full[rank][1:], _epoch(loader, 2, 1), exact=True)  # resume at batch 1: the same tail
        shards.append({sid.split("_")[0] for b in full[rank] for sid in b["study_id"]})
        other = _epoch(loader, 3)
        assert [b["study_id"] for b in other] != [b["study_id"] for b in full[rank]]  # a new epoch reshuffles
    assert not shards[0] & shards[1]  # whole series per rank, never shared


@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_batched_backends_follow_pil_in_ddp_and_bug_mode(many, backend):
    for rank in (0, 1):
        kw = dict(bs=3, rank=rank, world_size=2, seed=2, replicate_official_bug=True)
        assert_same_batches(_epoch(_loader("pil", many, True, **kw), 4), _epoch(_loader(backend, many, True, **kw), 4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_unreadable_batch_is_counted_and_stood_in(tmp_path, backend):
    index = mixed_format_index(str(tmp_path), layout=[[("missing", None), ("truncated_jpeg", "png8")],
                                                      [("png8", None)]])
    from medst_fast.train.data import BAD_BATCH

    loader = _loader(backend, index, False)
    first, second = _epoch(loader)  # one item per sampler batch: the trainer's step count holds
    assert len(loader) == 2 and first == {BAD_BATCH: "all 1 series of the batch are unreadable", "n_series": 1}
    assert second["study_id"] == ["m1_0"]
    assert dict(loader.bad) == {"missing_image": 1, "unreadable_image": 1, "dropped_study": 2, "empty_batch": 1}


@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_rejected_jpeg_is_decoded_on_the_cpu(mixed, backend, monkeypatch):
    """A JPEG the batched decoder rejects but the CPU decoder reads reaches the model, with the same pixels."""
    loader = _loader(backend, mixed, False)
    monkeypatch.setattr(type(loader), "_decode", lambda self, items: [None] * len(items))
    assert_same_batches(_epoch(_loader("pil", mixed, False)), _epoch(loader))
    assert loader.cpu_decoded["decoder_failed"] > 0 and dict(loader.bad) == EXPECTED_BAD


def test_backend_choice(monkeypatch, mixed, caplog):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert L.choose_backend("auto", cpu)[0] == "pil"
    monkeypatch.setattr(L, "_op_note", lambda: "op")
    monkeypatch.setattr(L, "dali_missing", lambda: None)
    name, why = L.choose_backend("auto", cuda)
    assert name == "dali" and "GPU" in why
    monkeypatch.setattr(L, "dali_missing", lambda: "no nvidia.dali")
    name, why = L.choose_backend("auto", cuda)
    assert name == "nvjpeg" and "no nvidia.dali" in why
    monkeypatch.setattr(L, "torchvision_missing", lambda: "no torchvision")
    name, why = L.choose_backend("auto", cuda)
    assert name == "pil" and "no nvidia.dali" in why and "no torchvision" in why
    with pytest.raises(RuntimeError, match="'dali' was requested but no nvidia.dali"):
        L.choose_backend("dali", cpu)
    with pytest.raises(ValueError, match="back-end must be one of"):
        L.choose_backend("gpu", cpu)
    caplog.set_level(logging.INFO, logger="medst_fast")
    loader = _loader("auto", mixed, False)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loader:")]
    assert loader.backend == "pil" and lines == [f"loader: pil ({loader.reason})"]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_cuda_backends_match_pil(mixed, backend):
    for train in (False, True):
        ref = _epoch(_loader("pil", mixed, train, seed=1))
        loader = L.build_series_loader(backend, mixed, "train", None, S, 1, train, seed=1, workers=2, device="cuda")
        got = _epoch(loader)
        assert got[0]["frontal"].is_cuda and not got[0]["has_lateral"].is_cuda
        assert_same_batches(ref, [{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in b.items()} for b in got])
        assert dict(loader.bad) == EXPECTED_BAD
