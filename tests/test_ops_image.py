"""medst_fast::resize_pad_crop_normalize (csrc/) against its PyTorch reference (medst_fast/ops_image.py)."""
import numpy as np
import pytest
import torch

from medst_fast import ext
from medst_fast import ops_image as oi

SIZES = [(512, 409), (300, 500), (256, 256), (97, 31), (20, 700), (5, 3), (1, 1), (3000, 2500)]
GREY = 2.0 / 255.0  # one grey level after (x/255 - 0.5)/0.5

needs_ext = pytest.mark.skipif(not ext.load(), reason=f"medst_fast._C not built ({ext.load_error()})")


def _offsets(n, resize_to, out_size, train, generator=None):
    """(n, 2) crop origins, one ``crop_offsets`` draw per image (top, then left), as the loaders draw them."""
    return torch.tensor([oi.crop_offsets(resize_to, out_size, train, generator) for _ in range(n)], dtype=torch.long)


def _images(sizes, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, s, dtype=torch.uint8, generator=g).to(device) for s in sizes]


def test_geometry_matches_official_resize_img():
    # longer side -> R, shorter floored, ties resize the height; pad floor before / ceil after
    assert oi.resize_geometry(512, 409, 256) == (256, 204, 0, 26)
    assert oi.resize_geometry(409, 512, 256) == (204, 256, 26, 0)
    assert oi.resize_geometry(300, 300, 256) == (256, 256, 0, 0)
    assert oi.resize_side(224) == 256 and oi.resize_side(96) == 110
    assert oi.center_offset(256, 224) == 16 and oi.center_offset(439, 384) == 28  # torchvision's round()


def test_area_weights_are_exact_area_averages():
    w = oi.area_weights(5, 2)  # each output covers 2.5 input pixels
    expected = torch.tensor([[1, 1, 0.5, 0, 0], [0, 0, 0.5, 1, 1]], dtype=torch.float64) / 2.5
    torch.testing.assert_close(w, expected)
    for n, m in [(7, 3), (3, 7), (256, 256), (3000, 256)]:
        torch.testing.assert_close(oi.area_weights(n, m).sum(1), torch.ones(m, dtype=torch.float64))


def test_ref_area_equals_block_mean_for_integer_factor():
    # 512 -> 256 is an exact 2x2 mean (PIL Image.reduce(2) up to its uint8 rounding)
    PIL = pytest.importorskip("PIL.Image")
    img = _images([(512, 512)], seed=3)[0]
    out = oi.resize_pad_crop_normalize_ref([img], 256, 256, torch.zeros(1, 2, dtype=torch.long), "area")
    px = (out[0, 0] * 0.5 + 0.5) * 255
    mean = img.float().reshape(256, 2, 256, 2).mean((1, 3))
    torch.testing.assert_close(px, mean, atol=1e-3, rtol=0)
    pil = torch.from_numpy(np.array(PIL.fromarray(img.numpy()).reduce(2))).float()
    assert (px - pil).abs().max() <= 0.5 + 1e-3


def test_ref_bilinear_matches_pil_bilinear():
    PIL = pytest.importorskip("PIL.Image")
    img = _images([(301, 187)], seed=4)[0]
    nh, nw, top, left = oi.resize_geometry(301, 187, 110)
    out = oi.resize_pad_crop_normalize_ref([img], 110, 110, torch.zeros(1, 2, dtype=torch.long), "bilinear")
    px = (out[0, 0] * 0.5 + 0.5) * 255
    pil = np.asarray(PIL.fromarray(img.numpy()).resize((nw, nh), PIL.BILINEAR)).astype(np.float32)
    assert (px[top:top + nh, left:left + nw] - torch.from_numpy(pil)).abs().max() <= 1.0
    assert torch.all(px[:, :left] == 0) and torch.all(px[:, left + nw:] == 0)  # zero padding


@needs_ext
@pytest.mark.parametrize("filter", ["area", "bilinear"])
@pytest.mark.parametrize("resize_to,out_size", [(256, 224), (110, 96), (37, 31), (16, 16)])
def test_ext_cpu_matches_ref(filter, resize_to, out_size):
    imgs = _images(SIZES, seed=resize_to)
    if resize_to != 256:
        imgs = imgs[:-1]  # keep the large image for one case only (test time)
    g = torch.Generator().manual_seed(1)
    for train in (True, False):
        off = _offsets(len(imgs), resize_to, out_size, train, g)
        got = oi.resize_pad_crop_normalize(imgs, out_size, resize_to, off, filter, use_ext=True)
        ref = oi.resize_pad_crop_normalize_ref(imgs, out_size, resize_to, off, filter)
        assert got.shape == (len(imgs), 1, out_size, out_size) and got.dtype == torch.float32
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@needs_ext
def test_ext_accepts_decoder_layout_and_validates():
    imgs = [im[None] for im in _images([(40, 30), (30, 40)])]  # torchvision decode_jpeg gives (1, H, W)
    off = torch.tensor([[0, 3], [5, 0]])
    got = oi.resize_pad_crop_normalize(imgs, 20, 32, off, use_ext=True)
    torch.testing.assert_close(got, oi.resize_pad_crop_normalize_ref(imgs, 20, 32, off), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="offsets"):
        oi.resize_pad_crop_normalize(imgs, 20, 32, torch.tensor([[0, 13], [0, 0]]), use_ext=True)
    with pytest.raises(TypeError, match=r"images\[1\]"):
        oi.resize_pad_crop_normalize([imgs[0], imgs[1].float()], 20, 32, off, use_ext=True)
    with pytest.raises(RuntimeError, match="offsets"):  # the op checks on its own too
        torch.ops.medst_fast.resize_pad_crop_normalize([i.contiguous() for i in imgs], off[:1], 32, 20, 0)


def test_fallback_without_ext_matches_ref():
    imgs = _images([(50, 70), (90, 20)])
    off = _offsets(2, 40, 32, True, torch.Generator().manual_seed(0))
    got = oi.resize_pad_crop_normalize(imgs, 32, 40, off, use_ext=False)
    assert torch.equal(got, oi.resize_pad_crop_normalize_ref(imgs, 32, 40, off))


def test_random_offsets_reproducible_and_in_range():
    a = _offsets(64, 256, 224, True, torch.Generator().manual_seed(7))
    b = _offsets(64, 256, 224, True, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 32 and len(a.unique()) > 10
    assert torch.all(_offsets(3, 256, 224, False) == 16)


@needs_ext
@pytest.mark.cuda
@pytest.mark.parametrize("filter", ["area", "bilinear"])
def test_ext_cuda_matches_ref(filter):
    assert ext.has_cuda(), "medst_fast._C was built without its CUDA kernels"
    imgs = _images(SIZES, device="cuda")
    off = _offsets(len(imgs), 256, 224, True, torch.Generator().manual_seed(2))
    got = oi.resize_pad_crop_normalize(imgs, 224, 256, off, filter, use_ext=True)
    ref = oi.resize_pad_crop_normalize_ref([i.cpu() for i in imgs], 224, 256, off, filter)
    assert got.is_cuda
    torch.testing.assert_close(got.cpu(), ref, atol=1e-5, rtol=0)
    cpu = oi.resize_pad_crop_normalize([i.cpu() for i in imgs], 224, 256, off, filter, use_ext=True)
    torch.testing.assert_close(got.cpu(), cpu, atol=1e-6, rtol=0)


NO_KERNEL = ("CUDA error: no kernel image is available for execution on the device\n"
             "CUDA kernel errors might be asynchronously reported at some other API call")


def _failing_op(message, calls):
    def op(*args):
        calls.append(args)
        raise RuntimeError(message)
    return op


def test_no_kernel_for_the_gpu_falls_back_to_pytorch_once(monkeypatch, caplog):
    """An extension built for other GPUs ("no kernel image is available", e.g. a T4 with an sm_80+ build):
    the PyTorch result, one log line, and the op is not tried again on that device."""
    import logging

    calls = []
    monkeypatch.setattr(ext, "op", lambda name: _failing_op(NO_KERNEL, calls))
    monkeypatch.setitem(ext._state, "no_kernel", set())
    imgs = _images([(50, 70), (90, 20), (31, 31)])
    off = _offsets(3, 40, 32, True, torch.Generator().manual_seed(3))
    ref = oi.resize_pad_crop_normalize_ref(imgs, 32, 40, off)
    with caplog.at_level(logging.INFO, logger="medst_fast"):
        for _ in range(3):
            assert torch.equal(oi.resize_pad_crop_normalize(imgs, 32, 40, off), ref)
    lines = [r.getMessage() for r in caplog.records if "no CUDA kernel for" in r.getMessage()]
    assert len(lines) == 1 and "no kernel image is available" in lines[0] and "PyTorch path" in lines[0]
    assert len(calls) == 1


def test_other_op_errors_and_forced_ext_are_not_hidden(monkeypatch):
    calls = []
    monkeypatch.setitem(ext._state, "no_kernel", set())
    imgs, off = _images([(20, 30)]), torch.tensor([[0, 0]])
    monkeypatch.setattr(ext, "op", lambda name: _failing_op("CUDA error: an illegal memory access", calls))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        oi.resize_pad_crop_normalize(imgs, 16, 16, off)
    monkeypatch.setattr(ext, "op", lambda name: _failing_op(NO_KERNEL, calls))
    with pytest.raises(RuntimeError, match="no kernel image"):  # use_ext=True tests the op itself
        oi.resize_pad_crop_normalize(imgs, 16, 16, off, use_ext=True)
    assert ext._state["no_kernel"] == set()
    assert ext.call(lambda x: x + 1, (1,), lambda: 0, torch.device("cpu")) == 2
