"""The research switches of docs/method.md §8 (LossCfg.local_weighting, temporal_shuffle, local_scope; the views
analysis): each against a direct computation, the defaults unchanged. The fused kernels' own tests of the
switches are in tests/test_kernels_local_align.py."""
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


# ----------------------------------------------------------------------------------------- batch scope
def direct_local(q, c, q_mask, c_mask, mha_w, mha_b, tau, renorm, pool):
    """The local loss token by token. pool "own": word i of sample b draws its context from the valid tokens
    of c[b] (the paper's loss); "all": from the valid tokens of every c[b'] (the batch scope)."""
    B, Tq, d = q.shape
    keys = {b: c[b] if c_mask is None else c[b][c_mask[b]] for b in range(B)}
    everything = torch.cat([keys[b] for b in range(B)])
    total = 0.0
    for b in range(B):
        Q = q[b] if q_mask is None else q[b][q_mask[b]]
        C = keys[b] if pool == "own" else everything
        ctx = torch.stack([torch.softmax(C @ Q[i] / tau, 0) @ C for i in range(Q.shape[0])])
        if renorm:
            ctx = F.normalize(ctx, dim=-1)
        a = F.normalize(Q * ctx, dim=-1)
        qq = mha_w[:d] @ a.mean(0) + mha_b[:d]
        kk = a @ mha_w[d:2 * d].t() + mha_b[d:2 * d]
        w = torch.softmax(kk @ qq / d ** 0.5, 0)
        S = Q @ ctx.t() / tau
        tgt = torch.arange(S.shape[0])
        ce = (F.cross_entropy(S, tgt, reduction="none") + F.cross_entropy(S.t(), tgt, reduction="none")) / 2
        total = total + (w * ce).sum()
    return total / B


@pytest.mark.parametrize("B,Tq,Tc,d", [(3, 5, 7, 4), (2, 6, 3, 8), (1, 4, 5, 4)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("renorm", [True, False])
def test_batch_scope_reference_matches_direct_computation(B, Tq, Tc, d, masked, renorm):
    q = F.normalize(torch.randn(B, Tq, d, dtype=torch.float64), dim=-1).requires_grad_()
    c = F.normalize(torch.randn(B, Tc, d, dtype=torch.float64), dim=-1).requires_grad_()
    w = (torch.randn(3 * d, d, dtype=torch.float64) / d ** 0.5).requires_grad_()
    bias = (0.1 * torch.randn(3 * d, dtype=torch.float64)).requires_grad_()
    qm = cm = None
    if masked:
        qm, cm = torch.rand(B, Tq) > 0.3, torch.rand(B, Tc) > 0.3
        qm[:, 0] = cm[:, 0] = True
    inputs = (q, c, w, bias)
    for scope, pool in (("batch", "all"), ("sample", "own")):  # one definition, two pools
        got = token_align_loss_ref(q, c, qm, cm, w, bias, 0.1, renorm, scope=scope)
        want = direct_local(q, c, qm, cm, w, bias, 0.1, renorm, pool)
        assert got.item() == pytest.approx(want.item(), rel=2e-6, abs=1e-6), scope  # the reference is fp32
        for x, y in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(want, inputs)):
            torch.testing.assert_close(x.double(), y, atol=2e-6, rtol=1e-5)
    per_sample = token_align_loss_ref(q, c, qm, cm, w, bias, 0.1, renorm)
    batch = token_align_loss_ref(q, c, qm, cm, w, bias, 0.1, renorm, scope="batch")
    if B == 1:
        torch.testing.assert_close(batch, per_sample)
    else:
        assert abs(batch.item() - per_sample.item()) > 1e-4


def test_batch_scope_changes_only_the_local_loss(tiny):
    model, batch = tiny
    base, wide = _losses(model, batch), _losses(model, batch, local_scope="batch")
    assert wide.ita == base.ita and wide.temporal == base.temporal
    assert abs(wide.local.item() - base.local.item()) > 1e-4
    model.zero_grad()
    wide.total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad()


# ----------------------------------------------------------------------------------- views analysis
from medst_fast import analysis  # noqa: E402


def hsic_cka(x, y):
    """Linear CKA in its kernel form: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), K = x x^T, L = y y^T,
    HSIC(K, L) = tr(K H L H) with the centring matrix H = I - 11^T / n."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    H = torch.eye(n, dtype=torch.float64) - 1.0 / n
    K, L = x @ x.t(), y @ y.t()

    def hsic(a, b):
        return torch.trace(a @ H @ b @ H)

    return (hsic(K, L) / torch.sqrt(hsic(K, K) * hsic(L, L))).item()


@pytest.mark.parametrize("n,p,q", [(7, 5, 3), (20, 16, 16), (3, 40, 9)])
def test_linear_cka_matches_the_kernel_formula(n, p, q):
    x, y = torch.randn(n, p), torch.randn(n, q)
    assert analysis.linear_cka(x, y) == pytest.approx(hsic_cka(x, y), rel=1e-9)
    y2 = x[:, :min(p, q)] @ torch.randn(min(p, q), q) + 0.1 * y
    assert analysis.linear_cka(x, y2) == pytest.approx(hsic_cka(x, y2), rel=1e-9)


def test_linear_cka_invariances():
    x = torch.randn(30, 8, dtype=torch.float64)
    rot, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    assert analysis.linear_cka(x, 3.0 * x @ rot + 5.0) == pytest.approx(1.0, abs=1e-12)  # rotation, scale, shift
    assert analysis.linear_cka(x, torch.randn(30, 8)) < 0.6  # unrelated features score well below 1
    with pytest.raises(ValueError, match="at least 2"):
        analysis.linear_cka(x[:1], x[:1])


@pytest.fixture(scope="module")
def views_setup(tmp_path_factory):
    """A small synthetic index and a saved medst_tiny model."""
    from medst_fast.data import prepare, synth

    root = tmp_path_factory.mktemp("views")
    synth.generate(root / "tree", patients=8, seed=3, extras=False, image_size=(96, 80))
    prepare.prepare_mimic(root / "tree", root / "tree", root / "idx", cache_size=None, workers=0, progress=False)
    torch.manual_seed(0)
    model = medst_fast.create_model("medst_tiny")
    medst_fast.save_pretrained(model, root / "model")
    return root, model


def test_block_taps_read_the_documented_points(views_setup):
    """The hooks' "after" features are the blocks' outputs and "before" the residual stream after attention,
    both recomputed here block by block."""
    _, model = views_setup
    vit = model.eval().visual
    xf, xl = torch.randn(3, 1, 96, 96), torch.randn(3, 1, 96, 96)
    taps = analysis._BlockTaps(vit)
    with torch.no_grad():
        vit.forward_features(xf, xl)
    taps.remove()
    feats = taps.features()
    nf = vit.num_frontal_tokens
    with torch.no_grad():
        x = vit.embed(xf, xl)
        for k, blk in enumerate(vit.blocks):
            mid = x + blk.attn(blk.norm1(x))
            x = blk(x, nf)
            for point, h in (("before", mid), ("after", x)):
                f, l = h[:, 1:nf], h[:, nf:]
                torch.testing.assert_close(feats[(k, point, "frontal")][:, 0], f.mean(1))
                torch.testing.assert_close(feats[(k, point, "lateral")][:, 0], l.mean(1))
                torch.testing.assert_close(feats[(k, point, "lateral")][:, 1], F.normalize(l, dim=-1).mean(1))
    assert not vit.blocks[0]._forward_hooks and not vit.blocks[0].norm2._forward_pre_hooks  # removed


@pytest.mark.parametrize("with_matplotlib", [True, False])
def test_views_cli_writes_the_table_and_the_plot(views_setup, monkeypatch, capsys, with_matplotlib):
    root, _ = views_setup
    if not with_matplotlib:  # as if the [plot] extra were not installed
        import builtins

        real_import = builtins.__import__

        def no_matplotlib(name, *a, **k):
            if name.startswith("matplotlib"):
                raise ImportError("No module named 'matplotlib'")
            return real_import(name, *a, **k)

        monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    out = root / f"report-{with_matplotlib}" / "views"
    rc = analysis.main(["views", "--checkpoint", str(root / "model"), "--data", str(root / "idx"), "--split", "train",
                        "--max-studies", "12", "--out", str(out), "--device", "cpu", "--batch-size", "5"])
    printed = capsys.readouterr().out
    assert rc == 0
    table = (root / f"report-{with_matplotlib}" / "views.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 2  # medst_tiny has 2 blocks
    for line in rows:
        vals = [float(v) for v in line.strip("|").split("|")[1:]]
        assert all(-1.0 <= v <= 1.0 + 1e-9 for v in vals), line
    assert "Frontal-only embedding spread" in table and "studies with both views" in table
    png = root / f"report-{with_matplotlib}" / "views.png"
    if with_matplotlib:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not png.exists()
        assert "matplotlib is not installed" in printed


def test_views_cli_errors_name_the_problem(views_setup, capsys):
    root, _ = views_setup
    rc = analysis.main(["views", "--checkpoint", str(root / "model"), "--data", str(root / "idx"), "--split", "nope",
                        "--out", str(root / "x")])
    assert rc == 1 and "no study has field 'split' == 'nope'" in capsys.readouterr().err


# ------------------------------------------------------------------------------ trainer flags of the switches
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from medst_fast.train import build as build_mod # noqa: E402
from medst_fast.train import state as state_mod
from medst_fast.train import step as step_mod
from medst_fast import weights as W
from medst_fast.train.args import parse_args  # noqa: E402

SMALL = ["--model-override", "vision.img_size=32", "--model-override", "text.max_length=32"]
SWITCH_FLAGS = ["--temporal-shuffle", "--local-weighting", "uniform", "--local-scope", "batch"]


def _argv(out, vocab, *extra):
    return ["--dataset-type", "random", "--random-series", "8", "--vocab", vocab, "--out", str(out), "--workers", "0",
            "--batch-series", "2", "--log-every", "1", "--no-export", *SMALL, *extra]


def test_switch_flags_default_to_the_paper_loss(vocab_path):
    a = parse_args(_argv("unused", vocab_path))
    assert (a.temporal_shuffle, a.local_weighting, a.local_scope, a.series_len) == (False, "learned", "sample", 4)
    loss = build_mod.model_overrides(a)["loss"]
    assert {k: loss[k] for k in ("temporal_shuffle", "local_weighting", "local_scope", "series_len")} == {
        k: getattr(LossCfg(), k) for k in ("temporal_shuffle", "local_weighting", "local_scope", "series_len")}


def test_switch_flags_set_the_loss_config(vocab_path):
    o = build_mod.model_overrides(parse_args(_argv("unused", vocab_path, *SWITCH_FLAGS, "--series-len", "6",
                                                  "--model-override", "loss.tau_local=0.2")))
    cfg = medst_fast.get_model_config("medst_tiny").replace(**o).loss
    assert (cfg.temporal_shuffle, cfg.local_weighting, cfg.local_scope, cfg.series_len) == (True, "uniform", "batch", 6)
    assert cfg.tau_local == 0.2  # other loss overrides are kept beside the flags


@pytest.mark.parametrize("override", ["loss.temporal_shuffle=true", "loss.local_weighting=\"uniform\"",
                                      "loss.local_scope=\"batch\"", "loss.series_len=4",
                                      'loss={"local_scope": "sample"}'])
def test_switch_set_by_flag_and_model_override_is_an_error(vocab_path, override):
    with pytest.raises(SystemExit, match="have their own flags"):
        build_mod.model_overrides(parse_args(_argv("unused", vocab_path, "--model-override", override)))


@pytest.mark.parametrize("extra,flag", [(["--series-len", "3"], "--series-len"), (["--temporal-shuffle"], "--temporal-shuffle"),
                                        (["--local-weighting", "uniform"], "--local-weighting"),
                                        (["--local-scope", "batch"], "--local-scope")])
def test_faithful_refuses_every_switch(vocab_path, capsys, extra, flag):
    with pytest.raises(SystemExit):
        parse_args(_argv("unused", vocab_path, "--faithful", *extra))
    err = capsys.readouterr().err
    assert f"--faithful cannot be combined with {flag}" in err and "faithful mode keeps the paper's" in err
    # the same through the config route: --model-override faithful=true
    with pytest.raises(SystemExit, match=f"faithful=true cannot be combined with {flag}: faithful mode keeps"):
        build_mod.model_overrides(parse_args(_argv("unused", vocab_path, "--model-override", "faithful=true", *extra)))
    assert build_mod.model_overrides(parse_args(_argv("unused", vocab_path, "--faithful")))["faithful"] is True


@pytest.mark.parametrize("n", ["1", "9", "0"])
def test_series_len_range_is_checked(vocab_path, capsys, n):
    with pytest.raises(SystemExit):
        parse_args(_argv("unused", vocab_path, "--series-len", n))
    assert f"--series-len must be in 2..8, got {n}" in capsys.readouterr().err


def test_switch_values_from_a_config_file_are_checked(tmp_path, vocab_path):
    p = tmp_path / "run.json"
    p.write_text('{"local-scope": "global"}')
    with pytest.raises(SystemExit, match="field 'local_scope' \\(--local-scope\\): expected one of"):
        parse_args(_argv("unused", vocab_path, "--config", str(p)))
    p.write_text('{"temporal-shuffle": "true"}')
    with pytest.raises(SystemExit, match="expected true or false"):
        parse_args(_argv("unused", vocab_path, "--config", str(p)))


def test_uniform_weighting_freezes_the_weighting_attentions():
    learned = medst_fast.create_model("medst_tiny")
    assert all(n.startswith(step_mod.UNUSED_PARAMS) for n in step_mod.freeze_unused(learned))
    assert learned.word_weighting.in_proj_weight.requires_grad and learned.patch_weighting.in_proj_bias.requires_grad
    uni = medst_fast.create_model("medst_tiny", loss={"local_weighting": "uniform"})
    frozen = step_mod.freeze_unused(uni)
    weighting = [n for n, _ in uni.named_parameters() if n.startswith(("word_weighting.", "patch_weighting."))]
    assert sorted(frozen) == sorted(weighting) and len(weighting) == 8
    assert not any(p.requires_grad for m in (uni.word_weighting, uni.patch_weighting) for p in m.parameters())
    assert all(p.requires_grad for n, p in uni.named_parameters() if n not in frozen)


def test_switch_run_records_flags_and_keeps_weighting_weights(tmp_path, vocab_path):
    """A short run with every switch: args.json and the checkpoint's config hold them; the frozen weighting
    attentions are not in the optimizer, so weight decay leaves them bit for bit as initialised."""
    from medst_fast.pretrain import main

    out = tmp_path / "r"
    res = main(_argv(out, vocab_path, *SWITCH_FLAGS, "--max-steps", "2", "--wd", "0.5", "--lr", "1e-2"))
    args = json.loads((out / "args.json").read_text())
    assert (args["temporal_shuffle"], args["local_weighting"], args["local_scope"], args["series_len"]) == (
        True, "uniform", "batch", 4)
    st = W.load_checkpoint(res.last_checkpoint)
    loss = st["config"]["loss"]
    assert (loss["temporal_shuffle"], loss["local_weighting"], loss["local_scope"]) == (True, "uniform", "batch")
    torch.manual_seed(args["seed"])  # the trainer's initial weights: create_model after set_seed(seed)
    init = medst_fast.create_model("medst_tiny", vision={"img_size": 32}, text={"max_length": 32},
                                   loss={"local_weighting": "uniform"})
    for k, v in init.state_dict().items():
        if k.startswith(("word_weighting.", "patch_weighting.")):
            assert torch.equal(st["model"][k], v), k
    moved = [k for k, v in init.state_dict().items() if k.startswith("visual.") and v.is_floating_point()
             and v.shape == st["model"][k].shape and not torch.equal(st["model"][k], v)]
    assert moved  # the rest of the model did train (and the initial weights above are the trainer's)


def test_resume_config_comparison_fills_fields_added_later():
    """A checkpoint written before a config field existed compares equal to the same config now."""
    now = MedSTConfig().to_dict()
    old = json.loads(json.dumps(now))
    for k in ("local_scope", "local_weighting", "temporal_shuffle", "lambda_fmc"):
        del old["loss"][k]
    del old["vision"]["lateral_expert"]
    assert state_mod.architecture(old) == state_mod.architecture(now)
    other = json.loads(json.dumps(now))
    other["vision"]["depth"] = 3
    assert state_mod.architecture(other) != state_mod.architecture(now)
    # loss fields that are flags are compared as arguments, not as the model
    flagged = MedSTConfig().replace(**{"loss.local_scope": "batch", "loss.series_len": 6}).to_dict()
    assert state_mod.architecture(flagged) == state_mod.architecture(now)
    with pytest.raises(W.CheckpointError, match="cannot be read by this version"):
        state_mod.architecture({**now, "vision": {**now["vision"], "bogus": 1}})


def test_uniform_weighting_under_ddp_two_ranks(tmp_path, vocab_path):
    """torchrun, 2 gloo ranks, uniform weighting: DDP would stop at the second step on the weighting
    attentions' missing gradients if they were left trainable."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "medst_fast.pretrain", *_argv(out, vocab_path, "--local-weighting", "uniform", "--max-steps", "3",
                                         "--batch-series", "2")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    st = W.load_checkpoint(W.list_checkpoints(str(out))[-1])
    assert st["step"] == 3 and st["args"]["world_size"] == 2 and st["config"]["loss"]["local_weighting"] == "uniform"
