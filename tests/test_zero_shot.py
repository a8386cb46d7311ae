"""build_zero_shot_classifier / zero_shot_logits against a plain re-computation (open_clip's and BioViL's rules)."""
import copy

import numpy as np
import pytest
import torch

import medst_fast
from medst_fast.zero_shot import build_zero_shot_classifier, predict, zero_shot_logits


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return medst_fast.create_model("medst_tiny").eval()


@pytest.fixture(scope="module")
def tok(vocab_path):
    return medst_fast.get_tokenizer(vocab_path)


def _text(model, tok, texts, normalize):
    enc = tok(texts)
    with torch.no_grad():
        return model.encode_text(enc["input_ids"], enc["attention_mask"], normalize=normalize)


def test_templates_follow_open_clip_rule(model, tok):
    names = ["pleural effusion", "pneumothorax", "edema"]
    templates = ["there is {}", lambda c: f"findings consistent with {c}.", "no change in {}"]
    clf = build_zero_shot_classifier(model, tok, names, templates)
    assert clf.shape == (model.cfg.head.embed_dim, 3)
    for j, c in enumerate(names):
        prompts = [f"there is {c}", f"findings consistent with {c}.", f"no change in {c}"]
        e = _text(model, tok, prompts, normalize=True)  # open_clip: normalise, mean, normalise
        want = e.mean(0) / e.mean(0).norm()
        torch.testing.assert_close(clf[:, j], want, atol=1e-6, rtol=1e-6)
    e = _text(model, tok, ["there is edema", "findings consistent with edema.", "no change in edema"], False)
    raw = build_zero_shot_classifier(model, tok, names, templates, normalize_prompts=False)
    torch.testing.assert_close(raw[:, 2], e.mean(0) / e.mean(0).norm(), atol=1e-6, rtol=1e-6)


class _Stub(torch.nn.Module):
    """encode_text = a fixed vector per prompt with very different norms, so the two rules must differ."""

    def __init__(self, vectors):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.vectors = vectors

    def encode_text(self, input_ids, attention_mask, normalize=True):
        e = torch.stack([self.vectors[int(ids[1])] for ids in input_ids])
        return torch.nn.functional.normalize(e, dim=-1) if normalize else e


def test_prompt_normalisation_switch(tok):
    a, b = tok(["effusion"])["input_ids"][0, 1].item(), tok(["pneumothorax"])["input_ids"][0, 1].item()
    stub = _Stub({a: torch.tensor([10.0, 0.0]), b: torch.tensor([0.0, 1.0])})
    clip = build_zero_shot_classifier(stub, tok, {"c": ["effusion", "pneumothorax"]})[:, 0]
    biovil = build_zero_shot_classifier(stub, tok, {"c": ["effusion", "pneumothorax"]}, normalize_prompts=False)[:, 0]
    torch.testing.assert_close(clip, torch.tensor([1.0, 1.0]) / 2 ** 0.5)  # unit prompts weigh the same
    torch.testing.assert_close(biovil, torch.tensor([10.0, 1.0]) / 101 ** 0.5)  # the long one dominates


def test_mapping_of_prompts_preprocess_and_batches(model, tok):
    prompts = {"pos": ["Findings consistent with pneumonia", "Pneumonia."], "neg": ["No pneumonia"]}
    a = build_zero_shot_classifier(model, tok, prompts, preprocess=str.lower, batch_size=1)
    b = build_zero_shot_classifier(model, tok, {k: [p.lower() for p in v] for k, v in prompts.items()})
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="not both"):
        build_zero_shot_classifier(model, tok, prompts, ["{}"])
    with pytest.raises(ValueError, match="templates"):
        build_zero_shot_classifier(model, tok, ["a"], [])
    with pytest.raises(ValueError, match="class 1"):
        build_zero_shot_classifier(model, tok, {"a": ["x"], "b": [""]})


def test_logits_scale_and_precomputed_embeddings(model, tok):
    clf = build_zero_shot_classifier(model, tok, ["effusion", "pneumothorax"], ["there is {}"])
    x = torch.randn(5, 1, 96, 96)
    with torch.no_grad():
        emb = model.encode_image(x)
    logits = zero_shot_logits(model, clf, x)
    torch.testing.assert_close(logits, emb @ clf / model.cfg.loss.tau_global, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(zero_shot_logits(model, clf, emb, logit_scale=1.0), emb @ clf, atol=1e-6, rtol=1e-6)
    np.testing.assert_array_equal(predict(logits), (emb @ clf).argmax(-1).numpy())
    # MoVE: the lateral view changes the image side of the score
    lat = zero_shot_logits(model, clf, x, lateral=torch.randn(5, 1, 96, 96), has_lateral=torch.ones(5, dtype=torch.bool))
    assert (lat - logits).abs().max() > 1e-4
    with pytest.raises(ValueError, match="embedding width"):
        zero_shot_logits(model, clf, torch.randn(2, 7))
    with pytest.raises(ValueError, match="logits"):
        predict(torch.tensor([[0.1, float("nan")]]))


def test_nan_prompt_embedding_is_an_error(model, tok):
    bad = copy.deepcopy(model)
    with torch.no_grad():
        next(bad.text_global_head.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match=r"my_task: 2 of 2 rows of prompt embeddings"):
        build_zero_shot_classifier(bad, tok, ["a"], ["{}", "there is {}"], name="my_task")


def test_open_clip_call_returns_embeddings_and_logit_scale(model, tok):
    """model(images, texts) as open_clip's models answer it: the encoders' outputs and 1/tau as logit_scale."""
    torch.manual_seed(1)
    v = model.cfg.vision
    images = torch.randn(3, v.in_chans, v.img_size, v.img_size)
    enc = tok(["small left effusion", "no pneumothorax", "clear lungs"])
    with torch.no_grad():
        img, txt, scale = model(images, enc)
        want_img = model.encode_image(images)
        want_txt = model.encode_text(enc["input_ids"], enc["attention_mask"])
        _, txt_ids, _ = model(None, enc["input_ids"])  # a bare ids tensor: the mask comes from the pad id
    torch.testing.assert_close(img, want_img)
    torch.testing.assert_close(txt, want_txt)
    torch.testing.assert_close(txt_ids, want_txt)
    assert float(scale) == pytest.approx(1.0 / model.cfg.loss.tau_global)
    assert float(model.logit_scale) == float(scale)
    logits = scale * img @ txt.T  # open_clip's usage
    assert logits.shape == (3, 3) and torch.isfinite(logits).all()
    with pytest.raises(TypeError, match="pretraining batch"):
        model({"frontal": images}, enc)
