"""The PIL loader's transform and the batched op (extension or its reference) share one resize definition."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from medst_fast.data.transforms import ImageTransform
from medst_fast.ops_image import crop_offsets, resize_pad_crop_normalize, resize_target


@pytest.mark.parametrize("S", [224, 96])
def test_pil_transform_matches_batched_op_within_one_grey_level(shared_dir, S):
    d = os.path.join(shared_dir, "data", "covid-cxr", "images")
    names = sorted(os.listdir(d))[:12]
    imgs = [Image.open(os.path.join(d, n)).convert("L") for n in names]
    tf = ImageTransform(S, train=False)
    pil = torch.stack([tf(im) for im in imgs])
    R = resize_target(S)
    op = resize_pad_crop_normalize([torch.from_numpy(np.asarray(im)) for im in imgs], S, R,
                                   crop_offsets(len(imgs), R, S, train=False))
    # one grey level = 2/255 in normalised units; the PIL path rounds to uint8 after resizing
    assert (pil - op).abs().max().item() <= 2 / 255 + 1e-6
