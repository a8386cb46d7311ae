"""Grounding maps: equal to the local alignment's own similarities, geometry back to the image, the PNG, the CLI,
and, on synthetic frontals with one planted finding, which training makes the finding word's map peak in the
planted region: Med-ST's losses with the cross-image local contrast switched on (loss.lambda_cross_local) do,
Med-ST's own losses alone do not (a strict xfail)."""

import numpy as np
import pytest
import torch

import medst_fast
from medst_fast.data import synth, transforms as T
from medst_fast.grounding import peaks_in_region, plot_overlay, similarity_maps


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return medst_fast.create_model("medst_tiny").eval()


@pytest.fixture(scope="module")
def tok(vocab_path):
    return medst_fast.get_tokenizer(vocab_path)


def _xray(seed=0, size=(110, 110), finding="pleural_effusion", sev=3):
    rng = synth._rng(seed, 9, 0)
    anat = synth._Anatomy(rng)
    s = {f: 0 for f in synth.FINDINGS}
    s[finding] = sev
    jitter = synth.peek_jitter(rng)
    return synth.render("PA", s, anat, rng, size), synth.finding_region(finding, sev, anat, size, jitter)


def test_maps_are_the_local_alignment_similarities(model, tok):
    img, _ = _xray()
    text = "Large right pleural effusion."
    m = similarity_maps(model, tok, img, text)
    assert m.words == ["large", "right", "pleural", "effusion", "."]
    # the independent path: the model's own forward gives the normalised local embeddings of both towers
    enc = tok([text])
    x = T.eval_transform(img, 96)[None]
    with torch.no_grad():
        out = model(dict(frontal=x, n_full_series=0, **enc))
    slots = sorted(set(enc["word_slots"][0].tolist()) - {-1, 0})[:-1]  # words, without [SEP]
    cos = out.word_local[0, [s - 1 for s in slots]] @ out.patch_local[0].T
    torch.testing.assert_close(m.patch_cosine.flatten(1), cos, atol=1e-5, rtol=1e-5)
    att = torch.softmax(cos / model.cfg.loss.tau_local, -1)
    torch.testing.assert_close(m.patch_attention.flatten(1), att, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.patch_attention.sum((1, 2)), torch.ones(5))
    # bilinearly upsampled to the 96 x 96 input (16 px per patch): the corners are their patches' values
    assert m.attention.shape == m.cosine.shape == (5, 96, 96) and m.image.shape == (96, 96)
    assert torch.allclose(m.cosine[:, 0, 0], m.patch_cosine[:, 0, 0], atol=1e-6)
    assert torch.allclose(m.attention[:, 95, 95], m.patch_attention[:, -1, -1], atol=1e-7)
    np.testing.assert_array_equal(m.image, np.rint((x[0, 0].numpy() * 0.5 + 0.5) * 255).astype(np.uint8))
    assert m.word_map("Effusion").shape == (96, 96)
    with pytest.raises(KeyError, match="pneumothorax"):
        m.word_map("pneumothorax")


def test_phrases_and_original_geometry(model, tok):
    img, _ = _xray(size=(110, 110))
    m = similarity_maps(model, tok, img, ["small left effusion", "no pneumothorax"], on="original")
    assert m.words == ["small", "left", "effusion", "no", "pneumothorax"] and m.phrase_words == [[0, 1, 2], [3, 4]]
    torch.testing.assert_close(m.phrase_maps("cosine")[1], m.cosine[3:5].mean(0), equal_nan=True)
    inp = similarity_maps(model, tok, img, ["small left effusion", "no pneumothorax"])
    # 110 px is already the resize side: the original is the canvas, and the centre crop starts at 7
    assert m.attention.shape == (5, 110, 110) and m.image.shape == (110, 110)
    torch.testing.assert_close(m.attention[:, 7:103, 7:103], inp.attention, atol=1e-6, rtol=1e-5)
    assert torch.isnan(m.attention[:, :7]).all() and torch.isnan(m.cosine[:, :, 103:]).all()
    # a tall original: resized, padded and cropped; the map covers the crop's part of it, NaN elsewhere
    tall = np.full((300, 150), 90, np.uint8)
    t = similarity_maps(model, tok, tall, "effusion", on="original")
    assert t.attention.shape == (1, 300, 150) and torch.isnan(t.attention[0, :10]).all()
    assert torch.isfinite(t.attention[0, 150]).all()  # the middle row lies inside the crop
    with pytest.raises(ValueError, match="on must be"):
        similarity_maps(model, tok, img, "x", on="canvas")
    with pytest.raises(ValueError, match="non-empty"):
        similarity_maps(model, tok, img, ["ok", " "])


def test_plot_overlay_and_cli(tmp_path, model, tok, vocab_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    img, _ = _xray()
    m = similarity_maps(model, tok, img, ["large right pleural effusion", "no pneumothorax"])
    out = plot_overlay(m, tmp_path / "map.png", words=["effusion", "pneumothorax"], kind="cosine")
    with Image.open(out) as im:
        im.load()
        assert im.format == "PNG" and im.size[0] > 300
    medst_fast.save_pretrained(model, tmp_path / "m", vocab=vocab_path)
    Image.fromarray(img).save(tmp_path / "x.png")
    from medst_fast.ground import main

    png = main(["--checkpoint", str(tmp_path / "m"), "--image", str(tmp_path / "x.png"), "--text",
                "large right pleural effusion", "--out", str(tmp_path / "cli.png"), "--on", "original"])
    with Image.open(png) as im:
        im.load()
    medst_fast.save_pretrained(model, tmp_path / "enc", components=["visual", "visual_global_head"])
    with pytest.raises((RuntimeError, ValueError), match="enc"):
        main(["--checkpoint", str(tmp_path / "enc"), "--vocab", vocab_path, "--image", str(tmp_path / "x.png"),
              "--text", "effusion", "--out", str(tmp_path / "no.png")])


class _Spread(torch.nn.Module):
    """A text side that embeds every report in its own direction (what a model that learned reports does)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def encode_text(self, input_ids, **_):
        return torch.eye(input_ids.shape[0], 16)


def test_grounding_warns_when_the_model_is_at_chance(tmp_path, model, tok, vocab_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    from PIL import Image

    from medst_fast.ground import main
    from medst_fast.grounding import at_chance_warning

    assert at_chance_warning(model, tok).startswith("model at chance: it embeds 8 reports")  # random weights
    assert at_chance_warning(_Spread(), tok) is None
    titles = []
    real = Figure.suptitle
    monkeypatch.setattr(Figure, "suptitle", lambda self, t, **kw: (titles.append(t), real(self, t, **kw))[1])
    medst_fast.save_pretrained(model, tmp_path / "m", vocab=vocab_path)
    Image.fromarray(_xray()[0]).save(tmp_path / "x.png")
    main(["--checkpoint", str(tmp_path / "m"), "--image", str(tmp_path / "x.png"), "--text", "effusion",
          "--out", str(tmp_path / "cli.png")])
    assert "warning: model at chance" in capsys.readouterr().out
    assert len(titles) == 1 and "WARNING: model at chance" in titles[0]


# -- does pretraining ground? ---------------------------------------------------------------------------------
# Med-ST's losses + the switch loss.lambda_cross_local=1 (ITA + local + cross-image local), measured with the
# package's loss under 2 threads (pytest's here): hit rates 0.27 / 0.32 / 0.35 / 0.22 / 0.23 after 100 / 150 /
# 200 / 300 / 450 steps (0.32 after 200 with 1 thread), random weights 0.017, Med-ST alone 0.0 after 150. In
# place of Med-ST's local loss (lambda_local 0): 0.07 / 0.05 / 0.35 / 0.18 after 100 / 150 / 200 / 300. The rate
# moves by about 0.1 between checkpoints and with the float path (the earlier test-local einsum version of the
# loss gave 0.25 / 0.30 / 0.45 after 150 / 300 / 450), so read it as "far above random", not as an exact rate.
CROSS_STEPS = 200


def _planted(n, seed, train):
    """Frontal synthetic X-rays with one planted finding each (synth.planted_frontals, drawn at 110 = the resize
    side of 96, so the eval transform only centre-crops): (input, report sentence, region on the crop, word)."""
    tf = T.ImageTransform(96, train=train)
    g = torch.Generator().manual_seed(seed)
    cases = synth.planted_frontals(n, seed, train, 110)
    return [(tf(c.image, g), c.text, c.region[7:103, 7:103], c.word) for c in cases]


def _assert_grounds(trained, baseline):
    # 0.2: the region is ~6% of the image (random weights hit 2%), and the best Med-ST-only run reached 0.17
    assert trained >= 0.2 and trained >= 4 * max(baseline, 0.05), (trained, baseline)


def _hit_rate(model, tok, cases):
    return float(np.mean([peaks_in_region(model, tok, x, text, word, region) for x, text, region, word in cases]))


def _pretrain(vocab_path, steps, local=1.0, cross_local=0.0):
    """medst_tiny trained on planted findings with MedSTLoss: ITA + ``local`` times Med-ST's local loss (one
    view, no series) + ``cross_local`` times the cross-image local contrast (the loss.lambda_cross_local
    switch, kernels/cross_local.py); returns (trained, its random init, tok)."""
    from medst_fast.losses import MedSTLoss

    torch.manual_seed(0)
    tok = medst_fast.get_tokenizer(vocab_path, max_length=24)
    loss = {"lambda_temporal": 0.0, "lambda_local": local, "lambda_cross_local": cross_local}
    model = medst_fast.create_model("medst_tiny", loss=loss, text={"max_length": 24})
    random_init = medst_fast.create_model("medst_tiny", loss=loss, text={"max_length": 24}).eval()
    random_init.load_state_dict(model.state_dict())
    data = _planted(300, 0, train=True)
    x = torch.stack([d[0] for d in data])
    enc = tok([d[1] for d in data])
    c = model.cfg.loss
    loss_fn, opt = MedSTLoss(c), torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(data), (32,), generator=g)
        out = model(dict(frontal=x[idx], n_full_series=0, **{k: v[idx] for k, v in enc.items()}))
        loss = loss_fn(out, model).total
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), random_init, tok


@pytest.fixture(scope="module")
def pretrained(vocab_path):
    return _pretrain(vocab_path, 150)


@pytest.mark.xfail(strict=True, reason="measured (60 held-out images, peak in the planted region; random weights "
                   "2%): the Med-ST losses 0% after 150-900 steps (local_scope='sample'), 0-5% with "
                   "local_scope='batch', 0-5% ITA only, 5% ITA first then Med-ST, 17% at lr 3e-4, 7% with uniform "
                   "token weights. Med-ST contrasts a word only with the other words of its own report, so each "
                   "word settles on a fixed patch, the same in every image (see the README, 'Zero-shot and "
                   "grounding'); test_medst_with_the_cross_local_switch_grounds is the configuration that does")
def test_medst_losses_alone_point_at_the_planted_finding(pretrained):
    model, random_init, tok = pretrained
    cases = _planted(60, 1, train=False)
    _assert_grounds(_hit_rate(model, tok, cases), _hit_rate(random_init, tok, cases))


def test_medst_with_the_cross_local_switch_grounds(vocab_path):
    """The maps are right when the local embeddings carry the finding: trained with Med-ST's losses plus the
    cross-image local contrast (loss.lambda_cross_local=1, what ``--lambda-cross-local 1`` trains), the finding
    word's map peaks in the planted region far more often than with random weights."""
    model, random_init, tok = _pretrain(vocab_path, CROSS_STEPS, local=1.0, cross_local=1.0)
    assert model.cfg.loss.lambda_cross_local == 1.0 and model.cfg.loss.lambda_local == 1.0
    cases = _planted(60, 1, train=False)
    _assert_grounds(_hit_rate(model, tok, cases), _hit_rate(random_init, tok, cases))
