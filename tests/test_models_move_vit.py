"""MoVE ViT against an independent einsum reference that loops over views."""
import math

import pytest
import torch
import torch.nn.functional as F

import medst_fast
from medst_fast.config import VisionCfg
from medst_fast.models.move_vit import MoVEViT


def _cfg(**kw):
    base = dict(img_size=32, patch_size=8, width=24, depth=2, heads=3, mlp_ratio=2.0)
    base.update(kw)
    return VisionCfg(**base)


def _ln(x, mod):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + mod.eps) * mod.weight + mod.bias


def _ffn(x, mlp):
    h = torch.einsum("bnd,hd->bnh", x, mlp.fc1.weight) + mlp.fc1.bias
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return torch.einsum("bnh,dh->bnd", h, mlp.fc2.weight) + mlp.fc2.bias


def reference_forward(vit: MoVEViT, frontal, lateral=None, has_lateral=None):
    """Plain re-derivation of docs/method.md §2.1: patchify by unfold, explicit softmax attention, per-view FFN loop."""
    cfg = vit.cfg
    p = cfg.patch_size

    def patchify(img):
        if img.shape[1] == 1:
            img = img.expand(-1, 3, -1, -1)
        cols = F.unfold(img, p, stride=p)  # (B, C*p*p, N)
        w = vit.patch_embed.proj.weight.reshape(cfg.width, -1)
        return torch.einsum("bkn,dk->bnd", cols, w) + vit.patch_embed.proj.bias

    B = frontal.shape[0]
    x = torch.cat([vit.cls_token.expand(B, -1, -1), patchify(frontal)], 1) + vit.pos_embed
    nf = x.shape[1]
    views = [x]
    if lateral is not None:
        views.append(patchify(lateral) + vit.pos_embed[:, 1:])
    x = torch.cat(views, 1)
    N = x.shape[1]
    keep = torch.ones(B, N, dtype=torch.bool)
    if lateral is not None and has_lateral is not None:
        keep[:, nf:] = has_lateral[:, None]
    H, Dh = cfg.heads, cfg.width // cfg.heads
    for blk in vit.blocks:
        h = _ln(x, blk.norm1)
        qkv = torch.einsum("bnd,ed->bne", h, blk.attn.qkv.weight) + blk.attn.qkv.bias
        q, k, v = qkv.view(B, N, 3, H, Dh).unbind(2)
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(Dh)
        s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
        o = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v).reshape(B, N, -1)
        x = x + torch.einsum("bnd,ed->bne", o, blk.attn.proj.weight) + blk.attn.proj.bias
        outs = [_ffn(_ln(x[:, :nf], blk.norm2), blk.mlp)]
        if N > nf:
            outs.append(_ffn(_ln(x[:, nf:], blk.norm2_l), blk.mlp_l))
        x = x + torch.cat(outs, 1)
    return _ln(x, vit.norm)


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("lat", ["none", "all", "mixed"])
def test_move_vit_matches_reference_forward_and_grads(B, lat):
    torch.set_default_dtype(torch.float64)
    try:
        vit = MoVEViT(_cfg())
        f = torch.randn(B, 3, 32, 32, requires_grad=True)
        l = torch.randn(B, 3, 32, 32, requires_grad=True) if lat != "none" else None
        has = None
        if lat == "mixed":
            has = torch.arange(B) % 2 == 0
        elif lat == "all":
            has = torch.ones(B, dtype=torch.bool)
        out = vit.forward_features(f, l, has)
        ref = reference_forward(vit, f, l, has)
        assert out.shape == (B, 17 + (16 if l is not None else 0), 24)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
        g = torch.randn_like(out)
        inputs = [f] + ([l] if l is not None else []) + list(vit.parameters())
        ga = torch.autograd.grad(out, inputs, g, allow_unused=True)
        gb = torch.autograd.grad(ref, inputs, g, allow_unused=True)
        for a, b in zip(ga, gb):
            if a is None or b is None:
                assert a is None or not a.abs().any()
                continue
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
    finally:
        torch.set_default_dtype(torch.float32)


def test_absent_lateral_equals_single_view():
    """A study whose lateral is masked must produce exactly the single-view (plain ViT) CLS and frontal tokens."""
    vit = MoVEViT(_cfg()).eval()
    f = torch.randn(2, 3, 32, 32)
    junk = torch.randn(2, 3, 32, 32) * 5
    two = vit.forward_features(f, junk, torch.tensor([False, False]))
    one = vit.forward_features(f)
    torch.testing.assert_close(two[:, :17], one, atol=1e-5, rtol=1e-5)
    # and with a present lateral the frontal tokens do change
    two_present = vit.forward_features(f, junk, torch.tensor([True, True]))
    assert (two_present[:, :17] - one).abs().max() > 1e-3


def test_frontal_only_vit_refuses_a_lateral():
    import dataclasses

    vit = MoVEViT(dataclasses.replace(_cfg(), lateral_expert=False)).eval()
    f = torch.randn(2, 3, 32, 32)
    assert vit.forward_features(f).shape[1] == 17
    with pytest.raises(ValueError, match="no lateral expert"):
        vit.forward_features(f, f, torch.tensor([True, True]))


def test_grey_input_equals_replicated_rgb():
    vit = MoVEViT(_cfg()).eval()
    g = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(vit.forward_features(g), vit.forward_features(g.expand(-1, 3, -1, -1)),
                               atol=1e-5, rtol=1e-5)


def test_vit_b16_parameter_count_matches_spec():
    m = medst_fast.create_model("medst_vit_b16")
    trunk = sum(p.numel() for p in m.visual.parameters())
    # docs/method.md §2.1: ViT-B/16 85.80M + 12 lateral MLPs 56.67M + 12 x 1,536 norm2_l = ~142.5M
    assert trunk == 85_798_656 + 12 * 4_722_432 + 12 * 1_536
    frontal_only = sum(p.numel() for n, p in m.visual.named_parameters() if "_l." not in n)
    assert abs(frontal_only / 1e6 - 85.80) < 0.01


def test_grad_checkpointing_same_grads():
    vit = MoVEViT(_cfg()).train()
    f, l = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    has = torch.tensor([True, False])
    out = vit.forward_features(f, l, has).sum()
    g1 = torch.autograd.grad(out, list(vit.parameters()))
    vit.grad_checkpointing = True
    out2 = vit.forward_features(f, l, has).sum()
    g2 = torch.autograd.grad(out2, list(vit.parameters()))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("has", [[True], [False], [True, False, True], [False, False, True, False, True, True, False]])
def test_packed_path_equals_dense_forward_and_grads(has):
    torch.set_default_dtype(torch.float64)
    try:
        vit = MoVEViT(_cfg())
        B = len(has)
        has_t = torch.tensor(has)
        f = torch.randn(B, 1, 32, 32, requires_grad=True)
        l = torch.randn(B, 1, 32, 32, requires_grad=True)
        cls_p, pat_p = vit(f, l, has_t, packed=True)
        cls_d, pat_d = vit(f, l, has_t)
        torch.testing.assert_close(cls_p, cls_d, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(pat_p[:, :16], pat_d[:, :16], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(pat_p[has_t, 16:], pat_d[has_t, 16:], atol=1e-10, rtol=1e-10)
        assert not pat_p[~has_t, 16:].any()  # absent laterals are not computed at all
        # gradients of a loss that, like the default semantics, ignores absent-lateral tokens
        w = torch.randn_like(pat_d) * torch.cat([torch.ones(B, 16), has_t[:, None].double().expand(B, 16)], 1)[..., None]
        gc = torch.randn_like(cls_d)
        inputs = [f, l] + list(vit.parameters())
        ga = torch.autograd.grad((pat_p * w).sum() + (cls_p * gc).sum(), inputs, allow_unused=True)
        gb = torch.autograd.grad((pat_d * w).sum() + (cls_d * gc).sum(), inputs, allow_unused=True)
        for a, b in zip(ga, gb):
            if a is None or b is None:
                assert (a is None or not a.any()) and (b is None or not b.any())
                continue
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
    finally:
        torch.set_default_dtype(torch.float32)


# -- timm-style API (the interop against timm itself is tests/test_convert_interop.py) ----------------------------
def test_intermediates_are_the_block_outputs():
    torch.set_default_dtype(torch.float64)
    try:
        vit = MoVEViT(_cfg(depth=3)).eval()
        x = torch.randn(2, 1, 32, 32)
        final, inter = vit.forward_intermediates(x, output_fmt="NLC")
        torch.testing.assert_close(final, reference_forward(vit, x), atol=1e-10, rtol=1e-10)
        # the last block's output, normed, is forward_features; the first is one block of the reference
        torch.testing.assert_close(vit.norm(torch.cat([final[:, :1] * 0, inter[-1]], 1))[:, 1:], final[:, 1:],
                                   atol=1e-10, rtol=1e-10)
        one = MoVEViT(_cfg(depth=1)).eval()
        one.load_state_dict({k: v for k, v in vit.state_dict().items() if not k.startswith(("blocks.1", "blocks.2"))})
        h = vit.forward_intermediates(x, indices=[0], output_fmt="NLC", norm=True, intermediates_only=True)[0]
        torch.testing.assert_close(h, reference_forward(one, x)[:, 1:], atol=1e-10, rtol=1e-10)
        # NCHW is the same tokens laid out on the 4x4 patch grid, row-major
        maps = vit.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [m.shape for m in maps] == [(2, 24, 4, 4)] * 2
        torch.testing.assert_close(maps[-1].flatten(2).transpose(1, 2), inter[-1])
        assert len(vit.forward_intermediates(x, indices=[0, -1], intermediates_only=True)) == 2
        for bad in (0, 4, [3], [-4], []):
            with pytest.raises(ValueError):
                vit.forward_intermediates(x, indices=bad)
        with pytest.raises(ValueError, match="output_fmt"):
            vit.forward_intermediates(x, output_fmt="NHWC")
        with pytest.raises(ValueError, match=r"expected \(B, 1 or 3, 32, 32\)"):
            vit.forward_intermediates(torch.randn(1, 1, 48, 48))
    finally:
        torch.set_default_dtype(torch.float32)


def test_head_and_backbone_use():
    vit = MoVEViT(_cfg())
    assert vit.num_features == 24 and [f["reduction"] for f in vit.feature_info] == [8, 8]
    x = torch.randn(3, 1, 32, 32)
    feats = vit.forward_features(x)
    torch.testing.assert_close(vit.forward_head(feats), feats[:, 0])  # no classifier: the pooled CLS
    vit.reset_classifier(5)
    assert vit.forward_head(feats).shape == (3, 5)
    torch.testing.assert_close(vit.forward_head(feats, pre_logits=True), feats[:, 0])
    # a dense head on the NCHW maps trains the trunk: gradients reach the patch embedding
    seg = torch.nn.Conv2d(24, 2, 1)
    maps = vit.forward_intermediates(x, indices=[0, 1], norm=True, intermediates_only=True)
    logits = torch.nn.functional.interpolate(seg(maps[0] + maps[1]), size=(32, 32), mode="bilinear")
    loss = torch.nn.functional.cross_entropy(logits, torch.randint(0, 2, (3, 32, 32)))
    loss.backward()
    assert vit.patch_embed.proj.weight.grad.abs().sum() > 0 and vit.pos_embed.grad.abs().sum() > 0


def test_set_grad_checkpointing_same_grads_in_intermediates():
    vit = MoVEViT(_cfg()).train()
    x = torch.randn(2, 1, 32, 32)

    def grads():
        final, inter = vit.forward_intermediates(x)
        params = [p for n, p in vit.named_parameters() if "_l." not in n]  # frontal only: no lateral expert
        return torch.autograd.grad(final.sum() + sum(i.square().sum() for i in inter), params)

    g1 = grads()
    vit.set_grad_checkpointing()
    assert vit.grad_checkpointing
    g2 = grads()
    assert len(g1) == len(g2) and all(a.abs().sum() > 0 for a in g1)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


# -- the packed varlen encoder on a GPU ------------------------------------------------------------------
def _rel_err(a, ref):
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.mark.cuda
def test_packed_varlen_encoder_matches_dense_masked_encoder_bf16_vit_b():
    """ViT-B at 224 px, mixed laterals, bf16 autocast (the trainer's precision): the packed encoder, whose
    attention is torch's varlen flash attention on CUDA, against the dense encoder with a key mask. Forward
    outputs and every gradient (images and parameters): the packed path's error against an fp64 dense
    reference is at most 2x the dense bf16 path's error (plus 1e-4 for tensors both get almost exact)."""
    import copy

    from medst_fast.models import packing

    if packing._varlen is None:
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen (the packed path is masked SDPA)")
    calls = {"n": 0}
    real = packing._varlen

    def counted(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    dev = torch.device("cuda")
    torch.manual_seed(0)
    vit = MoVEViT(VisionCfg()).to(dev)  # ViT-B/16: width 768, depth 12, 12 heads, 224 px
    ref_vit = copy.deepcopy(vit).double()
    has = torch.tensor([True, False, True, True, False, False], device=dev)
    B, P = has.shape[0], vit.cfg.num_patches
    f = torch.randn(B, 1, 224, 224, device=dev)
    l = torch.randn(B, 1, 224, 224, device=dev) * has[:, None, None, None]
    # a loss that, like the default semantics, ignores the tokens of absent laterals
    wp = torch.randn(B, 2 * P, vit.cfg.width, device=dev, dtype=torch.float64)
    wp[:, P:] *= has[:, None, None]
    wc = torch.randn(B, vit.cfg.width, device=dev, dtype=torch.float64)

    def run(model, dtype, packed):
        fi = f.to(dtype).requires_grad_()
        li = l.to(dtype).requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.float32):
            cls, pat = model(fi, li, has, packed=packed)
        loss = (pat.double() * wp).sum() + (cls.double() * wc).sum()
        grads = torch.autograd.grad(loss, [fi, li] + list(model.parameters()), allow_unused=True)
        return [cls.detach(), pat.detach()[:, :P], pat.detach()[has][:, P:]], grads

    ref_out, ref_g = run(ref_vit, torch.float64, False)
    dense_out, dense_g = run(vit, torch.float32, False)
    packing._varlen = counted
    try:
        packed_out, packed_g = run(vit, torch.float32, True)
    finally:
        packing._varlen = real
    assert calls["n"] == vit.cfg.depth  # every block's attention ran through varlen, none fell back
    names = ["cls", "frontal patches", "present lateral patches"]
    for name, p, d, r in zip(names, packed_out, dense_out, ref_out):
        assert _rel_err(p, r) <= 2 * _rel_err(d, r) + 1e-4, (name, _rel_err(p, r), _rel_err(d, r))
    names = ["d frontal", "d lateral"] + [n for n, _ in vit.named_parameters()]
    for name, p, d, r in zip(names, packed_g, dense_g, ref_g):
        if r is None or not r.any():
            continue
        assert p is not None and torch.isfinite(p).all(), name
        assert _rel_err(p, r) <= 2 * _rel_err(d, r) + 1e-4, (name, _rel_err(p, r), _rel_err(d, r))
