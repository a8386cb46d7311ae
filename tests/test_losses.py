"""Med-ST loss formulas against hand-computed cases and straightforward per-sample references."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import medst_fast
from medst_fast.config import LossCfg
from medst_fast.kernels.local_align import token_align_loss_ref
from medst_fast.losses import MedSTLoss, cycle_alignment_loss, ita_loss, temporal_loss


def test_ita_hand_case():
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    tau = 0.5
    # i2t row 0: logits [2, 1.2], target 0; row 1: [0, 1.6], target 1
    l_i2t = (-(2 - math.log(math.exp(2) + math.exp(1.2))) - (1.6 - math.log(1 + math.exp(1.6)))) / 2
    # t2i row 0 (v0): [2, 0], target 0; row 1 (v1): [1.2, 1.6], target 1
    l_t2i = (-(2 - math.log(math.exp(2) + 1)) - (1.6 - math.log(math.exp(1.2) + math.exp(1.6)))) / 2
    assert ita_loss(u, v, tau).item() == pytest.approx(l_i2t + l_t2i, rel=1e-6)  # directions summed


def tcc_reference(u, v, tau, lam, delta, parts=False):
    """One series at a time, straight from the TCC definitions (docs/method.md §3.3). parts: return (FMC, RMR)."""
    total_fmc, total_rmr, n = 0.0, 0.0, 0
    for s in range(u.shape[0]):
        U, V = u[s], v[s]
        T = U.shape[0]
        steps = torch.arange(T, dtype=U.dtype) / (T + 1e-7)
        for i in range(T):
            logits = torch.stack([-(U[i] - V[j]).pow(2).sum() / tau for j in range(T)])
            total_fmc = total_fmc - torch.log_softmax(logits, 0)[i]
            alpha = torch.softmax(logits, 0)
            vt = (alpha[:, None] * V).sum(0)
            back = torch.stack([-(vt - U[k]).pow(2).sum() / tau for k in range(T)])
            beta = torch.softmax(back, 0)
            mu = (beta * steps).sum()
            var = (beta * (steps - mu) ** 2).sum()
            err = steps[i] - mu
            if err.abs() < delta:
                total_rmr = total_rmr + err ** 2 / torch.exp(torch.log(var + 1e-7)) + lam * torch.log(var + 1e-7)
            else:
                total_rmr = total_rmr + delta * (err.abs() - 0.5 * delta)
            n += 1
    if parts:
        return total_fmc / n, total_rmr / n
    return total_fmc / n + total_rmr / n


def test_fmc_and_rmr_weights_scale_each_half():
    u = F.normalize(torch.randn(3, 4, 5, dtype=torch.float64), dim=-1).requires_grad_()
    v = F.normalize(torch.randn(3, 4, 5, dtype=torch.float64), dim=-1)
    fmc, rmr = tcc_reference(u, v, 0.1, 0.001, 2.0, parts=True)
    for wf, wr in ((1.0, 0.0), (0.0, 1.0), (0.3, 2.0)):
        got = cycle_alignment_loss(u, v, 0.1, 0.001, 2.0, w_fmc=wf, w_rmr=wr)
        want = wf * fmc + wr * rmr
        assert got.item() == pytest.approx(want.item(), rel=1e-5)  # the loss runs in fp32
        torch.testing.assert_close(torch.autograd.grad(got, u)[0].double(), torch.autograd.grad(want, u, retain_graph=True)[0],
                                   atol=1e-5, rtol=1e-4)
    cfg = LossCfg(lambda_rmr=0.0)
    img, txt = u.detach().reshape(12, 5), v.reshape(12, 5)
    assert temporal_loss(img, txt, 3, cfg).item() == pytest.approx(
        (fmc + tcc_reference(v, u.detach(), 0.1, 0.001, 2.0, parts=True)[0]).item(), rel=1e-5)


@pytest.mark.parametrize("S,T,d", [(1, 4, 2), (3, 4, 8), (2, 5, 3)])
def test_cycle_alignment_matches_reference(S, T, d):
    u = F.normalize(torch.randn(S, T, d, dtype=torch.float64), dim=-1).requires_grad_()
    v = F.normalize(torch.randn(S, T, d, dtype=torch.float64), dim=-1).requires_grad_()
    a = cycle_alignment_loss(u, v, 0.1, 0.001, 2.0)
    b = tcc_reference(u, v, 0.1, 0.001, 2.0)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    ga = torch.autograd.grad(a, (u, v))
    gb = torch.autograd.grad(b, (u, v))
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x.double(), y, atol=1e-5, rtol=1e-4)


def test_cycle_alignment_official_fixture():
    # The official temporal_alignment.py __main__ example (1 x 4 x 2), evaluated with the l2 similarity Med-ST uses.
    e1 = torch.tensor([[[0.1, 0.25], [0.5, 0.6], [0.8, 0.9], [1.5, 1.9]]], dtype=torch.float64)
    e2 = torch.tensor([[[0.12, 0.2], [0.55, 0.65], [0.85, 0.95], [1.5, 1.9]]], dtype=torch.float64)
    got = cycle_alignment_loss(e1, e2, 0.1, 0.001, 2.0).item()
    assert got == pytest.approx(tcc_reference(e1, e2, 0.1, 0.001, 2.0).item(), rel=1e-6)
    # spreading the aligned series further apart makes both FMC and RMR easier: the loss must drop
    assert cycle_alignment_loss(10 * e1, 10 * e2, 0.1, 0.001, 2.0).item() < got - 0.1
    # and a shuffled (misaligned) V must cost more than the aligned one
    assert cycle_alignment_loss(e1, e2[:, [2, 0, 3, 1]], 0.1, 0.001, 2.0).item() > got + 1.0


def test_temporal_uses_only_full_series_and_both_directions():
    cfg = LossCfg()
    img = F.normalize(torch.randn(11, 6), dim=-1)
    txt = F.normalize(torch.randn(11, 6), dim=-1)
    got = temporal_loss(img, txt, 2, cfg)
    u, v = img[:8].view(2, 4, 6), txt[:8].view(2, 4, 6)
    want = cycle_alignment_loss(u, v) + cycle_alignment_loss(v, u)
    torch.testing.assert_close(got, want)
    img2 = img.clone()
    img2[8:] += 1.0  # rows of shorter series do not enter
    torch.testing.assert_close(temporal_loss(img2, txt, 2, cfg), got)
    assert temporal_loss(img, txt, 0, cfg).item() == 0.0


def official_style_local(q, c, q_mask, c_mask, mha: nn.MultiheadAttention, tau, renorm):
    """Per sample: keep only the valid tokens, then apply the official formulas with nn.MultiheadAttention."""
    B = q.shape[0]
    total = 0.0
    for b in range(B):
        Q = q[b] if q_mask is None else q[b][q_mask[b]]
        C = c[b] if c_mask is None else c[b][c_mask[b]]
        ctx = torch.softmax(Q @ C.t() / tau, -1) @ C
        if renorm:
            ctx = F.normalize(ctx, dim=-1)
        a = F.normalize(Q * ctx, dim=-1)
        _, w = mha(a.mean(0)[None, None], a[None], a[None], need_weights=True)
        w = w.reshape(-1)
        S = Q @ ctx.t() / tau
        tgt = torch.arange(S.shape[0])
        row = F.cross_entropy(S, tgt, reduction="none")
        col = F.cross_entropy(S.t(), tgt, reduction="none")
        total = total + (w * (row + col) / 2).sum()
    return total / B


@pytest.mark.parametrize("B,Tq,Tc,d", [(1, 5, 7, 4), (3, 11, 16, 8), (2, 1, 9, 4)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("renorm", [True, False])
def test_token_align_ref_matches_official_style(B, Tq, Tc, d, masked, renorm):
    torch.manual_seed(B * 100 + Tq)
    mha = nn.MultiheadAttention(d, 1, batch_first=True).double()
    nn.init.normal_(mha.in_proj_bias)
    q = F.normalize(torch.randn(B, Tq, d, dtype=torch.float64), dim=-1).requires_grad_()
    c = F.normalize(torch.randn(B, Tc, d, dtype=torch.float64), dim=-1).requires_grad_()
    qm = cm = None
    if masked:
        qm = torch.rand(B, Tq) > 0.3
        qm[:, 0] = True
        cm = torch.rand(B, Tc) > 0.3
        cm[:, 0] = True
    got = token_align_loss_ref(q, c, qm, cm, mha.in_proj_weight, mha.in_proj_bias, 0.1, renorm)
    want = official_style_local(q, c, qm, cm, mha, 0.1, renorm)
    assert got.item() == pytest.approx(want.item(), rel=1e-6, abs=1e-9)
    inputs = (q, c, mha.in_proj_weight, mha.in_proj_bias)
    ga = torch.autograd.grad(got, inputs)
    gb = torch.autograd.grad(want, inputs)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x.double(), y, atol=1e-6, rtol=1e-5)


def _batch(model, tok, B=8, n_full=2, has=None):
    S = model.cfg.vision.img_size
    texts = ["small left pleural effusion improving", "no acute cardiopulmonary process",
             "moderate pulmonary edema worse", "right lower lobe consolidation new"] * 4
    enc = tok(texts[:B])
    if has is None:
        has = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1][:B]).bool()
    return dict(frontal=torch.randn(B, 1, S, S), lateral=torch.randn(B, 1, S, S), has_lateral=has,
                n_full_series=n_full, **enc)


def test_faithful_and_default_differ_exactly_where_documented(vocab_path):
    tok = medst_fast.get_tokenizer(vocab_path)
    torch.manual_seed(0)
    base = medst_fast.create_model("medst_tiny", text={"hidden_dropout": 0.0, "attn_dropout": 0.0})
    faith = medst_fast.create_model("medst_tiny", faithful=True, text={"hidden_dropout": 0.0, "attn_dropout": 0.0})
    faith.load_state_dict(base.state_dict())
    batch = _batch(base, tok)
    # Default: an absent lateral's pixels cannot influence anything.
    b2 = dict(batch, lateral=batch["lateral"].clone())
    b2["lateral"][~batch["has_lateral"]] = 7.0
    crit, crit_f = MedSTLoss(base.cfg.loss), MedSTLoss(faith.cfg.loss, faithful=True)
    l1, l2 = crit(base(batch), base), crit(base(b2), base)
    torch.testing.assert_close(l1.total, l2.total)
    # Faithful: the official computes absent-lateral tokens into the local loss, so it does change.
    f1, f2 = crit_f(faith(batch), faith), crit_f(faith(b2), faith)
    assert abs(f1.local.item() - f2.local.item()) > 1e-4
    # ITA does not see patch tokens; with all laterals present and the same positions, only PAD handling and
    # positions remain, so differences must come from the text side.
    assert abs(f1.ita.item() - f2.ita.item()) < 1e-5


def test_default_masked_loss_equals_official_on_unpadded_inputs():
    """With every token valid the two semantics must coincide in the local loss."""
    mha = nn.MultiheadAttention(8, 1, batch_first=True)
    q = F.normalize(torch.randn(3, 6, 8), dim=-1)
    c = F.normalize(torch.randn(3, 10, 8), dim=-1)
    ones_q, ones_c = torch.ones(3, 6, dtype=torch.bool), torch.ones(3, 10, dtype=torch.bool)
    a = token_align_loss_ref(q, c, None, None, mha.in_proj_weight, mha.in_proj_bias)
    b = token_align_loss_ref(q, c, ones_q, ones_c, mha.in_proj_weight, mha.in_proj_bias)
    torch.testing.assert_close(a, b)


def test_tiny_full_loss_forward_backward(vocab_path):
    """medst_tiny, 2 series of 4 studies with mixed lateral presence, full loss, backward: finite grads."""
    tok = medst_fast.get_tokenizer(vocab_path)
    for faithful in (False, True):
        model = medst_fast.create_model("medst_tiny", faithful=faithful)
        out = model(_batch(model, tok))
        loss = MedSTLoss(model.cfg.loss, faithful)(out, model)
        assert all(torch.isfinite(t) for t in (loss.total, loss.ita, loss.local, loss.temporal))
        assert loss.temporal.item() > 0 and loss.local.item() > 0
        loss.total.backward()
        no_grad = [n for n, p in model.named_parameters() if p.grad is None]
        # only the unused out_proj of the weighting attentions (kept for checkpoint compatibility) and the
        # text positions beyond 112 / PAD embeddings may be gradient-free
        assert all("out_proj" in n for n in no_grad), no_grad
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_packed_encoder_gives_same_default_loss(vocab_path):
    """float64 so that any difference is a semantic one, not reordered fp32 rounding."""
    tok = medst_fast.get_tokenizer(vocab_path)
    torch.set_default_dtype(torch.float64)
    try:
        model = medst_fast.create_model("medst_tiny", text={"hidden_dropout": 0.0, "attn_dropout": 0.0})
        batch = _batch(model, tok)
        crit = MedSTLoss(model.cfg.loss)
        model.packed = False
        dense = crit(model(batch), model).total
        g_dense = torch.autograd.grad(dense, list(model.visual.parameters()))
        model.packed = True
        packed = crit(model(batch), model).total
        g_packed = torch.autograd.grad(packed, list(model.visual.parameters()))
        torch.testing.assert_close(packed, dense, atol=1e-10, rtol=1e-10)
        for a, b in zip(g_packed, g_dense):
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-8)
    finally:
        torch.set_default_dtype(torch.float32)


def test_losses_under_autocast_equal_fp32(vocab_path):
    tok = medst_fast.get_tokenizer(vocab_path)
    model = medst_fast.create_model("medst_tiny", text={"hidden_dropout": 0.0, "attn_dropout": 0.0})
    out = model(_batch(model, tok))
    crit = MedSTLoss(model.cfg.loss)
    ref = crit(out, model).total
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = crit(out, model).total
        mha = model.word_weighting
        direct = token_align_loss_ref(out.word_local, out.patch_local, out.word_mask, out.patch_mask,
                                      mha.in_proj_weight, mha.in_proj_bias)
    torch.testing.assert_close(got, ref)
    assert direct.dtype == torch.float32
