"""torch.compile(fullgraph=True) of the image encoder matches eager, forward and gradients (CPU inductor)."""
import pytest
import torch

import medst_fast


def test_compiled_encoder_matches_eager():
    torch._dynamo.reset()
    m = medst_fast.create_model("medst_tiny").train()
    f, l = torch.randn(3, 1, 96, 96), torch.randn(3, 1, 96, 96)
    has = torch.tensor([True, False, True])
    compiled = torch.compile(m.visual, fullgraph=True)
    cls_c, pat_c = compiled(f, l, has)
    cls_e, pat_e = m.visual(f, l, has)
    torch.testing.assert_close(cls_c, cls_e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pat_c, pat_e, atol=1e-5, rtol=1e-5)
    params = list(m.visual.parameters())
    gc = torch.autograd.grad(cls_c.square().sum() + pat_c.sum(), params)
    ge = torch.autograd.grad(cls_e.square().sum() + pat_e.sum(), params)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
