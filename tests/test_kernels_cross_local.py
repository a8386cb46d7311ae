"""The cross-image local contrast (docs/method.md §8.4, kernels/cross_local.py, loss.lambda_cross_local): the reference
against a per-pair loop, the SDPA path against the reference (forward and gradients, odd shapes, masks,
chunks, bf16/fp16), errors, MedSTLoss with the switch off (the paper's loss, exactly) and on, the faithful
refusal and the trainer flag."""
import csv
import math

import pytest
import torch
import torch.nn.functional as F

import medst_fast
from medst_fast.config import LossCfg, MedSTConfig
from medst_fast.kernels import cross_local as cl
from medst_fast.kernels.cross_local import (cross_local_loss, cross_local_loss_ref, cross_local_scores,
                                            cross_local_scores_ref, default_chunk)
from medst_fast.losses import MedSTLoss, cross_image_local_loss, ita_loss, local_loss, temporal_loss

D = 24


def _inputs(B, Tw, Tp, masked, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(B, Tw, D, generator=g).requires_grad_()
    p = torch.randn(B, Tp, D, generator=g).requires_grad_()
    if not masked:
        return w, p, None, None
    wm = torch.rand(B, Tw, generator=g) > 0.35  # some PAD words
    pm = torch.rand(B, Tp, generator=g) > 0.3  # some absent patches
    wm[:, 0] = pm[:, 0] = True
    wm[-1] = False
    wm[-1, Tw // 2] = True  # a report with one valid word
    pm[0, Tp // 2:] = False  # an image with its second half absent (a missing view)
    return w, p, wm, pm


def _scores_by_pair(w, p, wm, pm, tau_local):
    """The definition, one (report, image) pair at a time over the valid tokens only, in float64."""
    w, p = F.normalize(w.double(), dim=-1), F.normalize(p.double(), dim=-1)
    B = w.shape[0]
    rows = []
    for r in range(B):
        Q = w[r] if wm is None else w[r][wm[r]]
        row = []
        for i in range(B):
            P = p[i] if pm is None else p[i][pm[i]]
            ctx = F.normalize(torch.softmax(Q @ P.T / tau_local, -1) @ P, dim=-1)
            row.append((Q * ctx).sum(-1).mean())
        rows.append(torch.stack(row))
    return torch.stack(rows)


def _loss_and_grads(fn, w, p, *args, **kw):
    loss = fn(w, p, *args, **kw)
    return [loss.detach()] + [g.detach() for g in torch.autograd.grad(loss, (w, p))]


SHAPES = [(3, 7, 11), (5, 13, 19), (5, 7, 19), (3, 13, 11)]


@pytest.mark.parametrize("B,Tw,Tp", [(3, 7, 11), (5, 13, 19)])
@pytest.mark.parametrize("masked", [False, True])
def test_reference_matches_the_pairwise_definition(B, Tw, Tp, masked):
    w, p, wm, pm = _inputs(B, Tw, Tp, masked)
    got = cross_local_scores_ref(w, p, wm, pm, 0.1)
    want = _scores_by_pair(w, p, wm, pm, 0.1)
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5)
    labels = torch.arange(B)
    loss = F.cross_entropy(want / 0.07, labels) + F.cross_entropy(want.T / 0.07, labels)
    assert cross_local_loss_ref(w, p, wm, pm, 0.1, 0.07).item() == pytest.approx(loss.item(), rel=1e-5)


@pytest.mark.parametrize("B,Tw,Tp", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("chunk", [None, 2, 1])
def test_sdpa_path_matches_the_reference_fp32(B, Tw, Tp, masked, chunk):
    w, p, wm, pm = _inputs(B, Tw, Tp, masked, seed=B * Tw)
    ref = _loss_and_grads(cross_local_loss_ref, w, p, wm, pm, 0.1, 0.07)
    got = _loss_and_grads(cross_local_loss, w, p, wm, pm, 0.1, 0.07, chunk=chunk)
    for name, g, r in zip(("loss", "d word", "d patch"), got, ref):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    assert ref[1].abs().max() > 0 and ref[2].abs().max() > 0  # the gradients compared are not trivially zero


def test_masked_slots_have_no_effect_and_get_no_gradient():
    w, p, wm, pm = _inputs(5, 13, 19, True)
    base = _loss_and_grads(cross_local_loss, w, p, wm, pm, chunk=2)
    w2 = w.detach().clone()
    p2 = p.detach().clone()
    w2[~wm] = 100.0  # garbage in the PAD words and the absent patches
    p2[~pm] = -7.0
    w2.requires_grad_(), p2.requires_grad_()
    moved = _loss_and_grads(cross_local_loss, w2, p2, wm, pm, chunk=2)
    torch.testing.assert_close(moved[0], base[0], atol=1e-6, rtol=1e-6)
    assert moved[1][~wm].abs().max() == 0 and moved[2][~pm].abs().max() == 0


def test_chunks_run_separately_and_the_backward_recomputes_them(monkeypatch):
    """B=5 with chunk=2 runs 3 SDPA calls forward and 3 more in the backward (checkpointed chunks); one chunk
    keeps its forward for the backward."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counted(q, k, v, **kw):
        calls.append(k.shape[0])
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(cl.F, "scaled_dot_product_attention", counted)
    w, p, wm, pm = _inputs(5, 7, 11, True)
    loss = cross_local_loss(w, p, wm, pm, chunk=2)
    assert calls == [2, 2, 1]
    loss.backward()
    assert sorted(calls) == [1, 1, 2, 2, 2, 2]
    calls.clear()
    cross_local_loss(w, p, wm, pm, chunk=5).backward()
    assert calls == [5]


def test_default_chunk_keeps_a_chunk_within_the_budget():
    B, Tw, Tp, d = 64, 97, 392, 128  # ViT-B two views, a full text: one image's share is 4.0 M elements
    c = default_chunk(B, Tw, Tp, d)
    assert 1 <= c < B and c * B * Tw * (Tp + 3 * d) <= cl.CHUNK_BUDGET_ELEMS
    assert (c + 1) * B * Tw * (Tp + 3 * d) > cl.CHUNK_BUDGET_ELEMS  # the largest that fits
    assert default_chunk(5, 13, 19, 24) == 5  # small batches: one chunk, nothing recomputed
    assert default_chunk(4096, 512, 4096, 1024) == 1  # never 0, whatever the sizes


def test_one_sample_is_a_zero_loss_with_zero_gradients():
    w, p, _, _ = _inputs(1, 7, 11, False)
    for fn in (cross_local_loss_ref, cross_local_loss):
        loss, gw, gp = _loss_and_grads(fn, w, p)
        assert loss.item() == 0.0  # cross-entropy over one class
        assert torch.count_nonzero(gw) == 0 and torch.count_nonzero(gp) == 0


def _scores_in_dtype(w, p, wm, pm, ct, tau_local=0.1):
    """The reference's maths run in plain torch ``ct`` (every op on ct tensors): the low-precision baseline."""
    w, p = F.normalize(w.to(ct), dim=-1), F.normalize(p.to(ct), dim=-1)
    s = torch.einsum("rte,ije->rtij", w, p) / tau_local
    s = s.masked_fill(~pm[None, None], float("-inf"))
    ctx = F.normalize(torch.einsum("rtij,ije->rtie", torch.softmax(s, -1), p), dim=-1)
    wt = wm.to(ct) / wm.sum(1, keepdim=True).to(ct)
    return (torch.einsum("rte,rtie->rti", w, ctx) * wt[:, :, None]).sum(1).float()


def _infonce(score, tau_global=0.07):
    labels = torch.arange(score.shape[0])
    return F.cross_entropy(score / tau_global, labels) + F.cross_entropy(score.T / tau_global, labels)


@pytest.mark.parametrize("ct", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("seed", [0, 1])
def test_low_precision_error_within_twice_plain_torch_in_that_dtype(ct, chunk, seed):
    """err(SDPA path in ct, fp32 reference) <= 2 * err(the reference's maths in plain torch ct, fp32 reference)
    + 1e-6 (the rule of tests/test_kernels_move_ffn.py) for the (B, B) scores and both gradients of the loss. The
    scalar loss sums signed errors (which cancel by chance, either path), so it is held to what the score error
    allows: |d loss| <= 4 max |d score| / tau_global (each cross-entropy moves at most 2x its largest logit)."""
    w, p, wm, pm = _inputs(5, 13, 19, True, seed=seed)
    paths = {"ref": lambda a, b: cross_local_scores_ref(a, b, wm, pm),
             "plain": lambda a, b: _scores_in_dtype(a, b, wm, pm, ct),
             "sdpa": lambda a, b: cross_local_scores(a, b, wm, pm, compute_dtype=ct, chunk=chunk)}
    res = {}
    for k, fn in paths.items():
        score = fn(w, p)
        loss = _infonce(score)
        res[k] = [score.detach(), *torch.autograd.grad(loss, (w, p)), loss.detach()]
    for i, name in enumerate(("scores", "d word", "d patch")):
        err_k, err_t = ((res[k][i] - res["ref"][i]).abs().max().item() for k in ("sdpa", "plain"))
        assert err_k <= 2 * err_t + 1e-6, f"{ct} {name}: SDPA path err {err_k:.3e} vs plain torch err {err_t:.3e}"
    d_score = (res["sdpa"][0] - res["ref"][0]).abs().max().item()
    assert d_score > 0  # the path does compute in ct (the comparison is not vacuous)
    assert (res["sdpa"][3] - res["ref"][3]).abs().item() <= 4 * d_score / 0.07 + 1e-6
    loss = cross_local_loss(w, p, wm, pm, compute_dtype=ct, chunk=chunk)
    assert loss.item() == pytest.approx(res["sdpa"][3].item(), abs=1e-6)  # the loss is the InfoNCE of these scores


def test_a_word_equal_to_one_of_its_images_patches_raises_its_pairs_score():
    w, p, _, _ = _inputs(4, 9, 16, False, seed=5)
    w, p = w.detach(), p.detach()
    before = cross_local_scores(w, p)
    w2 = w.clone()
    w2[2, 4] = p[2, 7] * 3.0  # the scale goes in the normalisation
    after = cross_local_scores(w2, p)
    torch.testing.assert_close(after, cross_local_scores_ref(w2, p), atol=1e-5, rtol=1e-5)
    # the word now attends to that patch almost alone in its own image: its cosine there is ~1
    assert after[2, 2] - before[2, 2] > 0.5 * (1 - before[2, 2]) / 9
    others = [i for i in range(4) if i != 2]
    assert (after[2, 2] - after[2, others].max()) > (before[2, 2] - before[2, others].max())
    torch.testing.assert_close(after[others], before[others])  # other reports are untouched


@pytest.mark.parametrize("call,message", [
    (lambda w, p: cross_local_loss(w[:, :, :5], p), "word, patch must be"),
    (lambda w, p: cross_local_loss(w[:2], p), "word, patch must be .*same B and d"),
    (lambda w, p: cross_local_loss(w[0], p[0]), "word, patch must be"),
    (lambda w, p: cross_local_loss(w, p, torch.ones(3, 6, dtype=torch.bool)), "word_mask must be None or bool"),
    (lambda w, p: cross_local_loss(w, p, None, torch.ones(3, 11)), "patch_mask must be None or bool"),
    (lambda w, p: cross_local_loss(w, p, None, torch.zeros(3, 11, dtype=torch.bool)),
     "patch_mask must be True somewhere in every row .*empty rows \\[0, 1, 2\\]"),
    (lambda w, p: cross_local_loss_ref(w, p, torch.tensor([[True] * 7, [False] * 7, [True] * 7])),
     "word_mask must be True somewhere .*empty rows \\[1\\]"),
    (lambda w, p: cross_local_loss(w, p, compute_dtype=torch.float64), "compute_dtype must be None or one of"),
    (lambda w, p: cross_local_loss(w, p, chunk=0), "chunk must be None or an integer >= 1"),
    (lambda w, p: cross_local_loss(w, p, tau_global=0.0), "tau_global must be > 0"),
    (lambda w, p: cross_local_loss_ref(w, p, tau_local=-1.0), "tau_local must be > 0"),
])
def test_bad_input_is_an_error_naming_the_argument(call, message):
    w, p, _, _ = _inputs(3, 7, 11, False)
    with pytest.raises(ValueError, match="kernels/cross_local.py: " + message):
        call(w, p)


# ------------------------------------------------------------------------------------------- config
def test_config_field_defaults_to_off_and_is_checked(tmp_path):
    assert LossCfg().lambda_cross_local == 0.0
    for bad, message in ((-0.5, "'loss.lambda_cross_local': must be >= 0"),
                         (math.nan, "'loss.lambda_cross_local'.*finite"), ("1", "'loss.lambda_cross_local'.*number")):
        with pytest.raises(ValueError, match=message):
            LossCfg(lambda_cross_local=bad)
        with pytest.raises(ValueError, match=message):  # the --model-override route
            MedSTConfig().replace(**{"loss.lambda_cross_local": bad})
    cfg = MedSTConfig().replace(**{"loss.lambda_cross_local": 0.5})
    cfg.to_json(tmp_path / "c.json")
    assert MedSTConfig.from_json(tmp_path / "c.json").loss.lambda_cross_local == 0.5


# ---------------------------------------------------------------------------------------- MedSTLoss
@pytest.fixture(scope="module")
def tiny(vocab_path):
    from test_losses_switches import _batch

    torch.manual_seed(0)
    tok = medst_fast.get_tokenizer(vocab_path)
    model = medst_fast.create_model("medst_tiny", text={"hidden_dropout": 0.0, "attn_dropout": 0.0})
    batch = _batch(model, tok)  # two views, some laterals absent: the patch mask takes part
    frontal = {k: v for k, v in batch.items() if k not in ("lateral", "has_lateral")}
    return model, batch, frontal


def _crit(model, **fields):
    return MedSTLoss(LossCfg(**{**vars(model.cfg.loss), **fields}), model.cfg.faithful)


@pytest.mark.parametrize("views", ["two", "frontal"])
def test_medst_loss_off_is_the_paper_loss_and_on_adds_the_term(tiny, views):
    model, two, frontal = tiny
    batch = two if views == "two" else frontal
    torch.manual_seed(1)
    out = model(batch)
    c = model.cfg.loss
    off = _crit(model)(out, model)
    paper = (c.lambda_ita * ita_loss(out.img_global, out.txt_global, c.tau_global)
             + c.lambda_local * local_loss(out, model, c, False)
             + c.lambda_temporal * temporal_loss(out.img_global, out.txt_global, out.n_full_series, c))
    assert torch.equal(off.total, paper) and off.cross_local.item() == 0.0
    on = _crit(model, lambda_cross_local=0.5)(out, model)
    pm = out.patch_mask if views == "two" else None
    if views == "two":
        assert not out.patch_mask.all()  # the masked path is the one tested here
    else:
        assert out.patch_local.shape[1] == model.cfg.vision.num_patches and out.patch_mask.all()
    want = cross_local_loss_ref(out.word_local, out.patch_local, out.word_mask, out.patch_mask, c.tau_local,
                                c.tau_global)
    torch.testing.assert_close(on.cross_local, want.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(on.total, off.total + 0.5 * want, atol=1e-5, rtol=1e-5)
    assert torch.equal(on.ita, off.ita) and torch.equal(on.local, off.local) and torch.equal(on.temporal, off.temporal)
    assert on.cross_local.item() > 0
    direct = cross_image_local_loss(out, model, c)
    torch.testing.assert_close(direct, cross_local_loss(out.word_local, out.patch_local, out.word_mask, pm,
                                                        c.tau_local, c.tau_global))


def test_medst_loss_term_trains_the_local_heads(tiny):
    model, batch, _ = tiny
    model.zero_grad()
    out = model(batch)
    lo = _crit(model, lambda_ita=0.0, lambda_local=0.0, lambda_temporal=0.0, lambda_cross_local=1.0)(out, model)
    lo.total.backward()
    heads = [p.grad for n, p in model.named_parameters() if n.startswith(("visual_local_head.", "text_local_head."))]
    assert heads and all(g is not None for g in heads) and any(g.abs().max() > 0 for g in heads)
    model.zero_grad()


def test_medst_loss_under_autocast_uses_its_dtype(tiny):
    model, batch, _ = tiny
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
    assert out.amp_dtype == torch.bfloat16
    c = model.cfg.loss
    got = _crit(model, lambda_cross_local=1.0)(out, model).cross_local
    args = (out.word_local.float(), out.patch_local.float(), out.word_mask, out.patch_mask, c.tau_local, c.tau_global)
    torch.testing.assert_close(got, cross_local_loss(*args, compute_dtype=torch.bfloat16).detach())
    assert got.item() != cross_local_loss(*args).item()  # not the fp32 value


def test_faithful_refuses_the_switch(vocab_path, capsys):
    with pytest.raises(ValueError, match="lambda_cross_local=1.0 cannot be combined with faithful mode"):
        MedSTLoss(LossCfg(lambda_cross_local=1.0), faithful=True)
    MedSTLoss(LossCfg(lambda_cross_local=0.0), faithful=True)  # off is the official loss
    from test_losses_switches import _argv

    from medst_fast.train.args import parse_args

    with pytest.raises(SystemExit):
        parse_args(_argv("unused", vocab_path, "--faithful", "--lambda-cross-local", "0.5"))
    err = capsys.readouterr().err
    assert "--faithful cannot be combined with --lambda-cross-local" in err and "no cross-image local term" in err
    with pytest.raises(SystemExit):
        parse_args(_argv("unused", vocab_path, "--lambda-cross-local", "-1"))
    assert "--lambda-cross-local must be a finite number >= 0, got -1.0" in capsys.readouterr().err
    assert parse_args(_argv("unused", vocab_path)).lambda_cross_local == 0.0


# ---------------------------------------------------------------------------------------- trainer
def test_flag_reaches_the_model_loss_config(vocab_path):
    from test_losses_switches import _argv

    from medst_fast.train import build as build_mod
    from medst_fast.train.args import parse_args

    o = build_mod.model_overrides(parse_args(_argv("unused", vocab_path, "--lambda-cross-local", "0.5")))
    assert medst_fast.get_model_config("medst_tiny").replace(**o).loss.lambda_cross_local == 0.5


def test_trainer_run_logs_the_term(tmp_path, vocab_path):
    from test_losses_switches import _argv

    from medst_fast import weights as W
    from medst_fast.pretrain import main

    out = tmp_path / "r"
    res = main(_argv(out, vocab_path, "--lambda-cross-local", "1.0", "--max-steps", "2"))
    assert W.load_checkpoint(res.last_checkpoint)["config"]["loss"]["lambda_cross_local"] == 1.0
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(float(r["cross_local"]) > 0 for r in rows)
    steps = [ln for ln in (out / "train.log").read_text().splitlines() if " cross_local " in ln and "step " in ln]
    assert len(steps) == len(rows)  # every log line names the term beside ita / local / temporal


# ---------------------------------------------------------------------------------------- CUDA (device_check.sh)
@pytest.mark.cuda
@pytest.mark.parametrize("masked", [False, True])  # no mask: flash is eligible; a mask: memory-efficient / math
def test_cuda_sdpa_path_matches_the_reference_at_vit_b_shapes(masked):
    """ViT-B-like sizes (111 word slots, 392 patches, d 128, 3 chunks): fp32 to 1e-4 (SDPA's fused kernels sum
    in another order), bf16 within the rule against plain torch bf16."""
    B, Tw, Tp, d = 12, 111, 392, 128
    g = torch.Generator().manual_seed(0)
    w = torch.randn(B, Tw, d, generator=g).cuda().requires_grad_()
    p = torch.randn(B, Tp, d, generator=g).cuda().requires_grad_()
    wm = pm = None
    if masked:
        wm = (torch.rand(B, Tw, generator=g) > 0.3).cuda()
        pm = torch.ones(B, Tp, dtype=torch.bool)
        pm[::2, Tp // 2:] = False  # every other study without its lateral
        pm, wm[:, 0] = pm.cuda(), True
    ref = cross_local_scores_ref(w, p, wm, pm)
    ref_g = torch.autograd.grad(_infonce(ref), (w, p))
    out = cross_local_scores(w, p, wm, pm, chunk=5)
    out_g = torch.autograd.grad(_infonce(out), (w, p))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for a, b in zip(out_g, ref_g):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
    res = {}
    ones_w, ones_p = torch.ones(B, Tw, dtype=torch.bool).cuda(), torch.ones(B, Tp, dtype=torch.bool).cuda()
    plain_masks = (ones_w if wm is None else wm, ones_p if pm is None else pm)
    for k, fn in (("plain", lambda: _scores_in_dtype(w, p, *plain_masks, torch.bfloat16)),
                  ("sdpa", lambda: cross_local_scores(w, p, wm, pm, compute_dtype=torch.bfloat16, chunk=5))):
        s = fn()
        res[k] = [s.detach(), *torch.autograd.grad(_infonce(s), (w, p))]
    for i, name in enumerate(("scores", "d word", "d patch")):
        r = [ref, *ref_g][i]
        err_k, err_t = ((res[k][i] - r).abs().max().item() for k in ("sdpa", "plain"))
        assert err_k <= 2 * err_t + 1e-6, f"bf16 {name}: SDPA path err {err_k:.3e} vs plain torch err {err_t:.3e}"
