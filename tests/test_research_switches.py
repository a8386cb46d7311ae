"""The research switches of issue 14 (LossCfg.local_weighting, temporal_shuffle, local_scope; the views
analysis): each against a direct computation, the defaults unchanged. The fused kernels' own tests of the
switches are in tests/test_ops_local_align.py."""
import pytest
import torch
import torch.nn.functional as F

import medst_fast
from medst_fast.config import LossCfg, MedSTConfig
from medst_fast.kernels.local_align import token_align_loss_ref
from medst_fast.losses import MedSTLoss


# ------------------------------------------------------------------------------------------------ config
def test_switch_defaults_are_the_paper_loss():
    c = LossCfg()
    assert (c.temporal_shuffle, c.local_weighting, c.local_scope) == (False, "learned", "sample")


@pytest.mark.parametrize("field,value,message", [
    ("local_weighting", "mean", "'loss.local_weighting': must be one of"),
    ("local_scope", "global", "'loss.local_scope': must be one of"),
    ("local_scope", 1, "'loss.local_scope': expected a string"),
    ("temporal_shuffle", "true", "'loss.temporal_shuffle': expected true or false"),
])
def test_switch_values_are_checked(field, value, message):
    with pytest.raises(ValueError, match=message):
        LossCfg(**{field: value})
    with pytest.raises(ValueError, match=message):  # the --model-override route
        MedSTConfig().replace(**{f"loss.{field}": value})


def test_switches_round_trip_through_json(tmp_path):
    cfg = MedSTConfig().replace(**{"loss.local_weighting": "uniform", "loss.local_scope": "batch",
                                   "loss.temporal_shuffle": True})
    cfg.to_json(tmp_path / "c.json")
    back = MedSTConfig.from_json(tmp_path / "c.json").loss
    assert (back.local_weighting, back.local_scope, back.temporal_shuffle) == ("uniform", "batch", True)


# ----------------------------------------------------------------------------------- uniform weighting
def direct_uniform_local(q, c, q_mask, c_mask, tau, renorm):
    """Per sample, only its valid tokens: the local loss with every valid query token weighted 1 / n."""
    total = 0.0
    for b in range(q.shape[0]):
        Q = q[b] if q_mask is None else q[b][q_mask[b]]
        C = c[b] if c_mask is None else c[b][c_mask[b]]
        ctx = torch.softmax(Q @ C.t() / tau, -1) @ C
        if renorm:
            ctx = F.normalize(ctx, dim=-1)
        S = Q @ ctx.t() / tau
        tgt = torch.arange(S.shape[0])
        ce = (F.cross_entropy(S, tgt, reduction="none") + F.cross_entropy(S.t(), tgt, reduction="none")) / 2
        total = total + ce.mean()
    return total / q.shape[0]


@pytest.mark.parametrize("B,Tq,Tc,d", [(1, 5, 7, 4), (3, 11, 16, 8), (2, 1, 9, 4)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("renorm", [True, False])
def test_uniform_reference_matches_direct_computation(B, Tq, Tc, d, masked, renorm):
    q = F.normalize(torch.randn(B, Tq, d, dtype=torch.float64), dim=-1).requires_grad_()
    c = F.normalize(torch.randn(B, Tc, d, dtype=torch.float64), dim=-1).requires_grad_()
    w = torch.randn(3 * d, d, dtype=torch.float64)
    bias = torch.randn(3 * d, dtype=torch.float64)
    qm = cm = None
    if masked:
        qm, cm = torch.rand(B, Tq) > 0.3, torch.rand(B, Tc) > 0.3
        qm[:, 0] = cm[:, 0] = True
    got = token_align_loss_ref(q, c, qm, cm, w, bias, 0.1, renorm, weighting="uniform")
    want = direct_uniform_local(q, c, qm, cm, 0.1, renorm)
    # the reference computes in fp32 (the direct loop in fp64)
    assert got.item() == pytest.approx(want.item(), rel=2e-6, abs=1e-9)
    for x, y in zip(torch.autograd.grad(got, (q, c)), torch.autograd.grad(want, (q, c))):
        torch.testing.assert_close(x.double(), y, atol=1e-6, rtol=1e-5)
    # the learned weighting is a different loss on the same inputs (one token aside: its weight is 1 either way)
    learned = token_align_loss_ref(q, c, qm, cm, w, bias, 0.1, renorm)
    if Tq > 1:
        assert abs(learned.item() - got.item()) > 1e-4 * abs(got.item())


def _batch(model, tok, B=8, n_full=2):
    S = model.cfg.vision.img_size
    texts = ["small left pleural effusion improving", "no acute cardiopulmonary process",
             "moderate pulmonary edema worse", "right lower lobe consolidation new"] * 4
    has = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1][:B]).bool()
    return dict(frontal=torch.randn(B, 1, S, S), lateral=torch.randn(B, 1, S, S), has_lateral=has,
                n_full_series=n_full, **tok(texts[:B]))


@pytest.fixture(scope="module")
def tiny(vocab_path):
    torch.manual_seed(0)
    tok = medst_fast.get_tokenizer(vocab_path)
    model = medst_fast.create_model("medst_tiny", text={"hidden_dropout": 0.0, "attn_dropout": 0.0})
    return model, _batch(model, tok)


def _losses(model, batch, **loss_fields):
    cfg = model.cfg.loss
    crit = MedSTLoss(LossCfg(**{**vars(cfg), **loss_fields}), model.cfg.faithful)
    return crit(model(batch), model)


def test_uniform_weighting_changes_only_the_local_loss(tiny):
    model, batch = tiny
    base, uni = _losses(model, batch), _losses(model, batch, local_weighting="uniform")
    assert uni.ita == base.ita and uni.temporal == base.temporal
    assert abs(uni.local.item() - base.local.item()) > 1e-5 * base.local.item()
    model.zero_grad()
    uni.total.backward()
    # the weighting attentions take no part: no gradient reaches them
    assert all(p.grad is None or (p.grad == 0).all() for p in model.word_weighting.parameters())
    assert all(p.grad is None or (p.grad == 0).all() for p in model.patch_weighting.parameters())
    model.zero_grad()


# ------------------------------------------------------------------------------------- temporal shuffle
from medst_fast.losses import series_permutation, temporal_loss  # noqa: E402


def test_series_permutation_is_a_real_permutation_per_series():
    torch.manual_seed(1)
    perm = series_permutation(64, 4, "cpu")
    assert perm.shape == (64, 4) and perm.dtype == torch.int64
    assert (perm.sort(dim=1).values == torch.arange(4)).all()  # every row a permutation of 0..3
    identity = (perm == torch.arange(4)).all(1)
    assert not identity.all() and identity.sum() < 16  # 1 in 24 is the identity: expect ~3 of 64
    assert len({tuple(r) for r in perm.tolist()}) > 12  # many distinct orders, not one repeated
    torch.manual_seed(1)
    assert torch.equal(series_permutation(64, 4, "cpu"), perm)  # the seed fixes it


def _permuted_rows(x, perm, T):
    """x with the rows of each complete series reordered by perm (an explicit index, no gather)."""
    n = perm.shape[0]
    out = x.clone()
    for s in range(n):
        for t in range(T):
            out[s * T + t] = x[s * T + perm[s, t]]
    return out


@pytest.mark.parametrize("n_full,extra", [(3, 2), (1, 0)])
def test_shuffled_temporal_loss_equals_loss_of_explicitly_permuted_inputs(n_full, extra):
    T, E = 4, 6
    img = F.normalize(torch.randn(n_full * T + extra, E), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(n_full * T + extra, E), dim=-1).requires_grad_()
    plain, shuffled = LossCfg(), LossCfg(temporal_shuffle=True)
    seed = 5
    torch.manual_seed(seed)
    perm = series_permutation(n_full, T, "cpu")
    assert not (perm == torch.arange(T)).all(), "pick a seed whose permutation is not the identity"
    want = temporal_loss(_permuted_rows(img, perm, T), _permuted_rows(txt, perm, T), n_full, plain)
    torch.manual_seed(seed)
    got = temporal_loss(img, txt, n_full, shuffled)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, (img, txt)), torch.autograd.grad(want, (img, txt))):
        torch.testing.assert_close(a, b)
    # the order matters to the loss, so the shuffle changes it
    assert abs(got.item() - temporal_loss(img, txt, n_full, plain).item()) > 1e-4


def test_temporal_shuffle_changes_only_the_temporal_loss(tiny):
    model, batch = tiny
    torch.manual_seed(2)
    base = _losses(model, batch)
    torch.manual_seed(2)
    shuf = _losses(model, batch, temporal_shuffle=True)
    # dropout is off, so both forwards give the same embeddings; only the temporal term sees the order
    assert shuf.ita == base.ita and shuf.local == base.local
    assert abs(shuf.temporal.item() - base.temporal.item()) > 1e-5


def test_temporal_shuffle_traces_without_a_graph_break():
    """A host sync (.item(), a data-dependent shape) would break a fullgraph trace; the shuffle has none."""
    torch._dynamo.reset()
    cfg = LossCfg(temporal_shuffle=True)
    fn = torch.compile(lambda i, t: temporal_loss(i, t, 2, cfg), fullgraph=True, backend="aot_eager")
    img, txt = F.normalize(torch.randn(9, 6), dim=-1), F.normalize(torch.randn(9, 6), dim=-1)
    torch.manual_seed(3)
    got = fn(img, txt)
    torch.manual_seed(3)
    torch.testing.assert_close(got, temporal_loss(img, txt, 2, cfg))
