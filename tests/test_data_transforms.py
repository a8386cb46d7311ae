"""One transform everywhere: the trainer's PIL transform, the evaluation, the batched op (reference, C++ and
CUDA) and the loaders give the same image within one grey level, from 320x384 up to 3000x2500."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from medst_fast import ext
from medst_fast import ops_image as oi
from medst_fast.data import transforms as T
from medst_fast.eval import common

GREY = 2 / 255 + 1e-5  # one grey level in normalised units
SIZES = [(320, 384), (384, 320), (1000, 777), (2500, 3000), (3000, 2500)]


def _image(h, w, seed=0):
    """Smooth structure plus full-range noise: the worst case for rounding differences."""
    from _loader_index import chest_like

    rng = np.random.default_rng(seed)
    a = chest_like(h, w, seed).astype(np.int16) + rng.integers(-40, 41, (h, w))
    return np.clip(a, 0, 255).astype(np.uint8)


def _centre(n, S):
    R = T.resize_side(S)
    return torch.tensor([T.crop_offsets(R, S, False)] * n)


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("S", [224, 96])
def test_train_with_centre_crop_equals_eval_on_every_path(hw, S):
    a = _image(*hw, seed=hw[0])
    R = T.resize_side(S)
    ev = common.eval_transform(a, S)
    train_centre = T.transform_u8(Image.fromarray(a), S, T.crop_offsets(R, S, train=False))
    assert ev.shape == (1, S, S) and torch.equal(ev, train_centre)  # one code path: bit-identical
    assert torch.equal(ev, T.ImageTransform(S, train=False)(Image.fromarray(a)))
    x = torch.from_numpy(a)
    ref = oi.resize_pad_crop_normalize_ref([x], S, R, _centre(1, S))[0]
    # the op resizes in float without rounding, the PIL path rounds once to uint8: at most half a level
    assert (ev - ref).abs().max().item() <= 1 / 255 + 1e-5
    if ext.load():
        op = oi.resize_pad_crop_normalize([x], S, R, _centre(1, S), use_ext=True)[0]
        assert (ev - op).abs().max().item() <= GREY
    if torch.cuda.is_available() and ext.load() and ext.has_cuda():
        cu = oi.resize_pad_crop_normalize([x.cuda()], S, R, _centre(1, S), use_ext=True)[0]
        assert (ev - cu.cpu()).abs().max().item() <= GREY


def test_cache_resize_is_the_transforms_resize():
    """prepare's cache (images.resize_longer) and the transform resample identically, so a cached image is
    not resampled a second time and gives the same pixels as the full-size file."""
    from medst_fast.data.images import resize_longer

    for h, w in [(320, 384), (3000, 2500), (97, 31)]:
        a = _image(h, w, seed=w)
        cached = np.asarray(resize_longer(Image.fromarray(a), 256))
        nh, nw, top, left = T.resize_geometry(h, w, 256)
        assert cached.shape == (nh, nw)
        assert np.array_equal(cached, T.area_resize_u8(a, nh, nw))
        assert np.array_equal(T.resize_pad(cached, 256), T.resize_pad(a, 256))


def test_generator_draws_equal_the_seeded_global_rng():
    """The batched loaders draw from a Generator seeded like the trainer seeds the global RNG per series."""
    torch.manual_seed(1234)
    a = [T.crop_offsets(256, 224, True) for _ in range(6)]
    g = torch.Generator().manual_seed(1234)
    assert a == [T.crop_offsets(256, 224, True, g) for _ in range(6)]
    assert len(set(a)) > 1 and T.crop_offsets(256, 224, False) == (16, 16)
    with pytest.raises(ValueError, match="smaller than the crop"):
        T.crop_offsets(200, 224, True)


def test_single_definition_is_reexported():
    """The op module, the eval module and the transforms share one R, one crop origin and one geometry."""
    assert oi.resize_side is T.resize_side and common.resize_size is T.resize_side
    assert oi.crop_offsets is T.crop_offsets and oi.resize_geometry is T.resize_geometry
    assert T.resize_side(224) == 256 and T.resize_side(96) == 110


def test_rejects_non_grey_input():
    with pytest.raises(ValueError, match="8-bit grey"):
        T.resize_pad(np.zeros((4, 4, 3), np.uint8), 8)
    with pytest.raises(ValueError, match="empty side"):
        T.resize_geometry(0, 5, 8)


@pytest.mark.parametrize("S", [224, 96])
def test_pil_transform_matches_batched_op_within_one_grey_level(shared_dir, S):
    d = os.path.join(shared_dir, "data", "covid-cxr", "images")
    names = sorted(os.listdir(d))[:12]
    imgs = [Image.open(os.path.join(d, n)).convert("L") for n in names]
    tf = T.ImageTransform(S, train=False)
    pil = torch.stack([tf(im) for im in imgs])
    R = T.resize_side(S)
    op = oi.resize_pad_crop_normalize([torch.from_numpy(np.array(im)) for im in imgs], S, R, _centre(len(imgs), S))
    assert (pil - op).abs().max().item() <= GREY


def test_loaders_at_full_size_agree_with_eval(tmp_path):
    """A 320x384 and a 3000x2500 JPEG through every loader back-end (centre crops) and through the evaluation."""
    from _loader_index import _study
    from medst_fast.data.images import load_gray
    from medst_fast.data.index import SeriesIndex
    from medst_fast.data.loaders import build_series_loader, dali_missing

    paths = []
    for k, (h, w) in enumerate([(320, 384), (3000, 2500)]):
        p = str(tmp_path / f"img{k}.jpg")
        Image.fromarray(_image(h, w, seed=k)).save(p, quality=90)
        paths.append(p)
    studies = [_study(0, "a", "a0", 0, paths[0], paths[1], "test"), _study(1, "a", "a1", 1, paths[1], paths[0], "test")]
    index = SeriesIndex(studies, {"test": [[0, 1]]}, {"image_root": str(tmp_path), "mode": "study"})
    index.save(str(tmp_path / "idx"))
    ev = {p: common.eval_transform(load_gray(p), 224) for p in paths}
    backends = ["pil", "nvjpeg"] + (["dali"] if dali_missing() is None else [])
    for be in backends:
        (batch,) = list(build_series_loader(be, str(tmp_path / "idx"), "test", None, 224, 1, False, device="cpu",
                                            workers=1))
        for k, (fr, la) in enumerate([(paths[0], paths[1]), (paths[1], paths[0])]):
            assert (batch["frontal"][k] - ev[fr]).abs().max().item() <= GREY, (be, fr)
            assert (batch["lateral"][k] - ev[la]).abs().max().item() <= GREY, (be, la)
