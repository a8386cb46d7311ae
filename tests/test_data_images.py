"""medst_fast.data.images.load_gray is the one reader with one DICOM rule (extension or the 'DICM' marker at
byte 128): a DICOM without an extension reads the same through every entry point, and a file named .dcm that is
not a DICOM is refused with one line naming it."""
import os
import shutil

import numpy as np
import pytest

from medst_fast.data import images


def _entry_points():
    """Every way the package turns a path into 8-bit grey pixels, as uint8 (H, W) arrays."""
    from medst_fast.data.batching import cpu_decode
    from medst_fast.eval import common
    from medst_fast.factory import to_gray_u8

    return {
        "data.images.load_gray": lambda p: np.asarray(images.load_gray(p)),
        "data.batching.cpu_decode (DALI / nvJPEG fallback)": cpu_decode,
        "eval.common.read_image (evaluation, embed)": common.read_image,
        "factory.to_gray_u8 (Preprocess, drop-in API)": to_gray_u8,
    }


@pytest.fixture
def dicoms(tmp_path):
    pytest.importorskip("pydicom")
    from _loader_index import chest_like, write_dicom

    a = chest_like(48, 40, seed=3, dtype=np.uint16, peak=4095)
    named = str(tmp_path / "scan.dcm")
    write_dicom(named, a, mono1=True)
    bare = str(tmp_path / "1.2.840.113619.2.55")  # RSNA-style: a UID, no extension
    shutil.copyfile(named, bare)
    # the RSNA reading by hand: scale by 255/max, round, MONOCHROME1 inverted
    want = (255 - np.clip(np.rint(a.astype(np.float32) * (255.0 / a.max())), 0, 255)).astype(np.uint8)
    return named, bare, want


def test_the_dicom_rule():
    assert images.is_dicom("x.DCM") and images.is_dicom("x.dicom")  # by extension, even without the file


def test_a_dicom_without_extension_reads_the_same_everywhere(dicoms):
    named, bare, want = dicoms
    assert images.is_dicom(bare) and images.has_dicm_marker(bare)
    for name, read in _entry_points().items():
        for p in (named, bare):
            got = read(p)
            assert got.dtype == np.uint8 and np.array_equal(got, want), (name, p)


def test_a_dicom_without_extension_through_the_transforms_and_the_cache(dicoms, tmp_path):
    from medst_fast.data import cache, transforms
    from medst_fast.eval import common
    from medst_fast.factory import Preprocess

    named, bare, want = dicoms
    ref = transforms.eval_transform(want, 32)
    assert np.array_equal(Preprocess(32, train=False)(bare).numpy(), ref.numpy())
    assert np.array_equal(common.ImageListDataset([bare], 32)[0].numpy(), ref.numpy())
    dst = str(tmp_path / "cache" / "bare.jpg")
    assert cache.check_or_cache(bare, None, 36, draft=True) is None  # readable: not a skip
    assert cache.check_or_cache(bare, dst, 36, draft=True) is None and os.path.isfile(dst)


def test_a_dicom_without_extension_is_found_by_embed_and_the_rsna_task(dicoms):
    from medst_fast.embed import list_images
    from medst_fast.eval.rsna_zeroshot import image_path

    named, bare, _ = dicoms
    assert list_images(bare) == [bare]
    os.unlink(named)
    assert image_path(os.path.dirname(bare), os.path.basename(bare)) == bare


@pytest.mark.parametrize("content", ["png", "text"])
def test_a_dcm_that_is_not_dicom_is_one_clear_line(tmp_path, content):
    pytest.importorskip("pydicom")
    from PIL import Image

    p = str(tmp_path / "fake.dcm")
    if content == "png":
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(p, format="PNG")
    else:
        with open(p, "w") as f:
            f.write("patient,label\n1,0\n")
    want = f"{p}: not a DICOM file (no 'DICM' marker at byte 128)"
    for name, read in _entry_points().items():
        with pytest.raises((images.ImageReadError, ValueError)) as e:
            read(p)
        assert str(e.value) == want, name


def test_a_missing_dicom_names_the_file(tmp_path):
    p = str(tmp_path / "gone.dcm")
    with pytest.raises(images.ImageReadError, match="gone.dcm: DICOM file not found"):
        images.load_gray(p)
