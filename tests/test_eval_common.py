"""Eval plumbing: transform geometry, image reading, image lookup, model loading."""
import os

import numpy as np
import pytest
import torch

from medst_fast.eval import common
from medst_fast.eval.msxrt_image import ImageResolver


def test_resize_size():
    assert common.resize_size(224) == 256 and common.resize_size(96) == 110


def test_resize_pad_tall_image_by_hand():
    img = np.full((100, 50), 200, np.uint8)  # tall: height -> 20, width -> int(50*20/100) = 10
    out = common.resize_pad(img, 20)
    assert out.shape == (20, 20)
    assert (out[:, 5:15] == 200).all() and (out[:, :5] == 0).all() and (out[:, 15:] == 0).all()


def test_resize_pad_wide_image_truncates_short_side():
    img = np.full((33, 100), 80, np.uint8)  # wide: width -> 10, height -> int(33*10/100) = 3, pad 3 top / 4 bottom
    out = common.resize_pad(img, 10)
    rows = np.flatnonzero(out[:, 0])
    assert list(rows) == [3, 4, 5]


def test_resize_pad_is_area_downscale():
    img = np.zeros((4, 4), np.uint8)
    img[:2, :2] = 200  # one 2x2 block -> one output pixel of its mean under BOX
    out = common.resize_pad(img, 2)
    assert out[0, 0] == 200 and out[1, 1] == 0


def test_eval_transform_geometry_and_normalisation():
    img = np.full((300, 150), 255, np.uint8)
    x = common.eval_transform(img, 96)
    assert x.shape == (1, 96, 96) and x.dtype == torch.float32
    # R = 110: the width is int(150 * (110/300)) = int(54.99999999999999) = 54 as the official float64
    # product truncates (the old eval path computed 150*110/300 = 55), placed at (110-54)//2 = 28; after
    # the centre crop (offset 7) the content is columns 21..74
    assert x[0, 48, 48] == 1.0 and x[0, 48, 0] == -1.0 and x[0, 0, 48] == 1.0
    cols = torch.nonzero(x[0, 48] > 0).ravel()
    assert cols.min().item() == 28 - 7 and cols.max().item() == 28 + 54 - 1 - 7


def test_center_crop_offsets():
    a = np.arange(110 * 110).reshape(110, 110)
    c = common.center_crop(a, 96)
    assert c[0, 0] == a[7, 7]
    with pytest.raises(ValueError):
        common.center_crop(a, 111)


def test_read_image_formats_and_errors(tmp_path):
    from PIL import Image

    a = (np.arange(64 * 48) % 256).astype(np.uint8).reshape(64, 48)
    Image.fromarray(a).save(tmp_path / "g.png")
    assert np.array_equal(common.read_image(tmp_path / "g.png"), a)
    Image.fromarray(np.stack([a] * 3, -1)).save(tmp_path / "rgb.png")
    assert np.array_equal(common.read_image(tmp_path / "rgb.png"), a)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ValueError, match="bad.jpg"):
        common.read_image(tmp_path / "bad.jpg")
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        common.read_image(tmp_path / "missing.jpg")


def _jpg(path, value=128):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((40, 30), value, np.uint8)).save(path)


def test_image_resolver_layouts(tmp_path):
    flat = tmp_path / "flat"
    _jpg(flat / "files" / "d1.jpg")
    assert ImageResolver([str(flat)]).find("d1") == str(flat / "files" / "d1.jpg")

    mimic = tmp_path / "mimic"
    _jpg(mimic / "files" / "p10" / "p10000032" / "s50414267" / "d2.jpg")
    (mimic / "mimic-cxr-2.0.0-metadata.csv").write_text(
        "dicom_id,subject_id,study_id,ViewPosition\nd2,10000032,50414267,PA\n")
    sub = mimic / "ms-cxr-t"
    sub.mkdir()
    r = ImageResolver([str(sub)])  # the metadata is found in the parent of the CSV folder
    assert r.metadata.endswith("mimic-cxr-2.0.0-metadata.csv")
    assert r.resolve(["d2"])["d2"] == str(mimic / "files" / "p10" / "p10000032" / "s50414267" / "d2.jpg")
    r2 = ImageResolver([str(mimic)])
    assert r2.resolve(["d2"])["d2"].endswith(os.path.join("p10", "p10000032", "s50414267", "d2.jpg"))

    loose = tmp_path / "loose"
    _jpg(loose / "a" / "b" / "d3.jpg")
    assert ImageResolver([str(loose)]).find("d3") == str(loose / "a" / "b" / "d3.jpg")
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageResolver([str(loose)]).resolve(["d3", "nope"])


def test_load_model_variants(tmp_path):
    import medst_fast

    torch.manual_seed(0)
    ref = medst_fast.create_model("medst_tiny")
    medst_fast.save_pretrained(ref, tmp_path / "m")
    m = common.load_model(checkpoint=str(tmp_path / "m"), device="cpu")
    assert not m.training
    for a, b in zip(ref.state_dict().values(), m.state_dict().values()):
        assert torch.equal(a, b)
    r1 = common.load_model(random_init="medst_tiny", device="cpu", seed=3)
    r2 = common.load_model(random_init="medst_tiny", device="cpu", seed=3)
    assert torch.equal(r1.visual.pos_embed, r2.visual.pos_embed)
    # a checkpoint file needs --model for its config
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    with pytest.raises(ValueError, match="--model"):
        common.load_model(checkpoint=str(tmp_path / "w.pt"))
    m3 = common.load_model(checkpoint=str(tmp_path / "w.pt"), model_name="medst_tiny", device="cpu")
    assert torch.equal(m3.visual.pos_embed, ref.visual.pos_embed)
    with pytest.raises(ValueError, match="exactly one"):
        common.load_model(checkpoint=str(tmp_path / "m"), random_init="medst_tiny")
    with pytest.raises(FileNotFoundError):
        common.load_model(checkpoint=str(tmp_path / "nothing.pt"), model_name="medst_tiny")


def test_embed_images_matches_direct_forward(tmp_path):
    import medst_fast

    model = medst_fast.create_model("medst_tiny").eval()
    paths = []
    for i in range(5):
        p = str(tmp_path / f"{i}.jpg")
        _jpg(p, 30 + 40 * i)
        paths.append(p)
    e = common.embed_images(model, paths, batch_size=2)
    with torch.no_grad():
        ref = model.encode_image(torch.stack([common.eval_transform(common.read_image(p), 96) for p in paths]))
    assert e.shape == (5, model.cfg.head.embed_dim)
    assert torch.allclose(e, ref, atol=1e-5)
    f = common.embed_images(model, paths, fn=lambda m, x: m.image_features(x), batch_size=3)
    assert f.shape == (5, model.cfg.vision.width)


# -- the one embedding engine (eval tasks and python -m medst_fast.embed) -----------------------------------
@pytest.fixture(scope="module")
def tiny():
    import medst_fast

    torch.manual_seed(0)
    return medst_fast.create_model("medst_tiny").eval()


def _with_bad(tmp_path):
    """Five readable images with a truncated and a missing one between them (indices 1 and 4)."""
    paths = []
    for i in range(5):
        p = str(tmp_path / f"{i}.jpg")
        _jpg(p, 30 + 40 * i)
        paths.append(p)
    with open(tmp_path / "cut.jpg", "wb") as f:
        f.write(open(paths[0], "rb").read()[:60])
    paths.insert(1, str(tmp_path / "cut.jpg"))
    paths.insert(4, str(tmp_path / "gone.jpg"))
    return paths


def test_eval_and_embed_share_rows_skips_and_reasons(tmp_path, tiny):
    from medst_fast.embed import embed_image_files

    paths = _with_bad(tmp_path)
    kept, emb, skipped = common.embed_images_kept(tiny, paths, batch_size=2)
    kept2, emb2, skipped2 = embed_image_files(tiny, paths, batch_size=2, progress=False)
    assert kept == kept2 == [0, 2, 3, 5, 6]
    assert skipped == skipped2 and [i for i, _ in skipped] == [1, 4]
    assert "cut.jpg" in skipped[0][1] and "gone.jpg" in skipped[1][1] and "not found" in skipped[1][1]
    assert isinstance(emb2, np.ndarray) and emb2.dtype == np.float32
    np.testing.assert_array_equal(emb.numpy(), emb2)  # one engine: the same numbers, not merely close
    with torch.no_grad():
        ref = tiny.encode_image(torch.stack([common.eval_transform(common.read_image(paths[i]), 96) for i in kept]))
    torch.testing.assert_close(emb, ref, atol=1e-5, rtol=0)


def test_engine_autocast_rule(tmp_path, tiny):
    paths = _with_bad(tmp_path)[:1]
    ds = common.ImageListDataset(paths, 96)
    _, fp32, _ = common.embed_dataset(tiny, ds, common.image_step(tiny), progress=False)
    _, bf16, _ = common.embed_dataset(tiny, ds, common.image_step(tiny), precision="bf16", progress=False)
    assert bf16.dtype == torch.float32 and 0 < (bf16 - fp32).abs().max() < 0.1  # ran in bf16, returned as fp32
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16, got 'fp64'"):
        common.embed_dataset(tiny, ds, common.image_step(tiny), precision="fp64", progress=False)
    with pytest.raises(ValueError, match="batch size must be >= 1"):
        common.embed_dataset(tiny, ds, common.image_step(tiny), batch_size=0)


def test_engine_nothing_readable(tmp_path, tiny):
    paths = [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")]
    kept, emb, skipped = common.embed_dataset(tiny, common.ImageListDataset(paths, 96), common.image_step(tiny),
                                              progress=False)
    assert kept == [] and emb.shape == (0, 0) and len(skipped) == 2  # embed then says "nothing to write"
    with pytest.raises(ValueError, match=r"images: none of the 2 inputs could be read \(first: .*a.jpg"):
        common.embed_images_kept(tiny, paths)


def test_engine_lets_a_bug_through(tmp_path, tiny):
    """Only a bad file is a skip: any other error in reading (here a TypeError) ends the run."""
    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise TypeError("a bug, not a bad file")

    with pytest.raises(TypeError, match="a bug"):
        common.embed_dataset(tiny, Broken(), common.image_step(tiny), progress=False)
