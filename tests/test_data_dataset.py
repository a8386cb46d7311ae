import numpy as np
import pytest
import torch
from PIL import Image

from medst_fast.data import prepare as prep
from medst_fast.data import synth
from medst_fast.data.dataset import SeriesCollate, SeriesDataset, collate_series
from medst_fast.data.transforms import ImageTransform, crop_offsets, resize_pad, resize_side


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    synth.generate(root / "tree", patients=16, seed=5, extras=False, image_size=(96, 80))
    prep.prepare_mimic(root / "tree", root / "tree", root / "idx", cache_size=None, workers=0, progress=False)
    return root / "idx"


@pytest.fixture(scope="module")
def tok(vocab_path):
    from medst_fast import get_tokenizer

    return get_tokenizer(vocab_path)


def test_resize_side():
    assert resize_side(224) == 256 and resize_side(96) == 110


@pytest.mark.parametrize("wh", [(300, 200), (200, 300), (77, 255), (256, 256), (1000, 999)])
def test_resize_pad_against_reference(wh):
    w, h = wh
    img = Image.fromarray(np.full((h, w), 200, np.uint8))
    a = resize_pad(img, 256)
    # reference: the longer side becomes 256, the shorter int(side*scale), zero padding floor/ceil around it
    s = 256 / max(w, h)
    nh, nw = (256, int(w * s)) if h >= w else (int(h * s), 256)
    ref = np.zeros((256, 256), np.uint8)
    top, left = (256 - nh) // 2, (256 - nw) // 2
    ref[top:top + nh, left:left + nw] = 200
    np.testing.assert_array_equal(a, ref)


def test_transform_eval_is_centre_crop_and_normalised():
    img = Image.fromarray(np.arange(300 * 200, dtype=np.int64).reshape(300, 200).astype(np.uint8) % 251)
    t = ImageTransform(224, train=False)(img)
    assert t.shape == (1, 224, 224) and t.dtype == torch.float32
    padded = resize_pad(img, 256)
    ref = (torch.from_numpy(padded[16:240, 16:240]).float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(t[0], ref, rtol=0, atol=1e-6)
    assert t.min() >= -1 and t.max() <= 1


def test_train_crop_is_random_and_in_range():
    offs = {crop_offsets(256, 224, True) for _ in range(200)}
    assert len(offs) > 50
    assert all(0 <= a <= 32 and 0 <= b <= 32 for a, b in offs)
    assert crop_offsets(256, 224, False) == (16, 16)


def test_series_dataset_items(index_dir, tok):
    ds = SeriesDataset(index_dir, "train", tok, img_size=64, train=True)
    assert len(ds) == len(ds.index.series["train"]) > 0
    for i in range(len(ds)):
        item = ds[i]
        rows = ds.index.series["train"][i]
        assert [d["row"] for d in item] == rows
        for d in item:
            s = ds.index.studies[d["row"]]
            assert d["frontal"].shape == (1, 64, 64)
            assert (d["lateral"] is not None) == bool(s.lateral_path)
            assert d["text"] == s.text
            assert d["tokens"]["input_ids"].shape == (112,)
            assert int(d["tokens"]["input_ids"][0]) == tok.cls_token_id


def _fake(series_lens, lateral_every=2, S=8):
    """Series whose frontal carries its global study number and whose lateral carries number + 0.5."""
    items, k = [], 0
    for L in series_lens:
        it = []
        for _ in range(L):
            has = k % lateral_every == 0
            it.append({"row": k, "study_id": str(k), "frontal": torch.full((1, S, S), float(k)),
                       "lateral": torch.full((1, S, S), k + 0.5) if has else None, "text": f"t{k}",
                       "tokens": {"input_ids": torch.full((112,), k, dtype=torch.long)}})
            k += 1
        items.append(it)
    return items


def _official_collate_ref(items):
    """Plain re-statement of the official multimodal_collate_fn ordering (docs/method.md §4.5, §6.2.1)."""
    imgs4, imgs_rest, ces, flags = [], [], [], []
    for it in items:
        target = imgs4 if len(it) == 4 else imgs_rest
        for st in it:
            target.append(st["frontal"])
            ces.append(st["lateral"] if st["lateral"] is not None else torch.zeros_like(st["frontal"]))
            flags.append(st["lateral"] is not None)
    return torch.stack(imgs4 + imgs_rest), torch.stack(ces), torch.tensor(flags), len(imgs4)


@pytest.mark.parametrize("lens", [[2, 4, 1, 4, 3], [4, 4], [1, 2, 3], [3, 4]])
def test_collate_keeps_each_lateral_with_its_frontal(lens):
    items = _fake(lens)
    b = collate_series(items)
    nf = sum(1 for L in lens if L == 4)
    assert b["n_full_series"] == nf
    assert b["frontal"].shape[0] == sum(lens)
    ids = b["frontal"][:, 0, 0, 0]
    for r in range(len(ids)):
        k = int(ids[r])
        assert b["has_lateral"][r] == (k % 2 == 0)
        assert float(b["lateral"][r, 0, 0, 0]) == (k + 0.5 if k % 2 == 0 else 0.0)
        assert b["text"][r] == f"t{k}" and int(b["input_ids"][r, 0]) == k
    # the first n_full*4 rows are complete series, consecutive and in time order
    assert b["step"][: nf * 4].tolist() == [0, 1, 2, 3] * nf
    for r in range(1, len(ids)):
        if b["step"][r] > 0:  # consecutive steps of one series are consecutive studies
            assert ids[r] - ids[r - 1] == 1 and b["series_index"][r] == b["series_index"][r - 1]
    assert b["series_index"].tolist() == sorted(b["series_index"].tolist())


@pytest.mark.parametrize("lens", [[2, 4, 1, 4, 3], [4, 1], [3, 4]])
def test_collate_replicates_the_official_misalignment(lens):
    items = _fake(lens)
    b = collate_series(items, replicate_official_bug=True)
    f, ces, flags, s_len = _official_collate_ref(items)
    torch.testing.assert_close(b["frontal"], f)
    torch.testing.assert_close(b["lateral"], ces)
    assert torch.equal(b["has_lateral"], flags)
    assert b["n_full_series"] * 4 == s_len
    fixed = collate_series(items)
    if lens[0] != 4:  # a shorter series first: the bug shifts laterals against frontals
        assert not torch.equal(fixed["lateral"], b["lateral"])


def test_dataloader_over_prepared_index(index_dir, tok):
    ds = SeriesDataset(index_dir, "train", tok, img_size=32, train=False)
    dl = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=SeriesCollate(), num_workers=0)
    n = 0
    for b in dl:
        B = b["frontal"].shape[0]
        assert b["lateral"].shape == (B, 1, 32, 32) and b["input_ids"].shape == (B, 112)
        assert torch.all(b["lateral"][~b["has_lateral"]] == 0)
        n += B
    assert n == sum(len(s) for s in ds.index.series["train"])
