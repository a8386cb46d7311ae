"""Interop against the real libraries (timm, transformers), not self-round-trips.

timm's ``vit_base_patch16_224`` (random init, seeded) loaded through medst_fast.convert gives the same
frontal-only features, head input and intermediates as timm; a Hugging Face ``BertModel`` built from the shared
6-layer BioClinicalBERT config and loaded through ``load_hf_bert`` gives the same token states. ViT-B on the
CPU is heavy: batch 1, no grad, one model per module.
"""
import os

import pytest
import torch

import medst_fast
from medst_fast.convert import load_hf_bert, text_config_from_hf

timm = pytest.importorskip("timm")

# a small text tower beside ViT-B keeps the model build cheap; the image tower is the paper's
_SMALL_TEXT = {"hidden": 64, "layers": 1, "heads": 2, "intermediate": 128}


@pytest.fixture(scope="module")
def vit_pair(tmp_path_factory):
    torch.manual_seed(0)
    ref = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    path = tmp_path_factory.mktemp("timm") / "vit_b16.pt"
    torch.save(ref.state_dict(), path)
    ours = medst_fast.create_model("medst_vit_b16", pretrained=str(path), text=_SMALL_TEXT).eval()
    return ref, ours


@torch.no_grad()
def test_timm_vit_b16_features_and_head(vit_pair):
    ref, ours = vit_pair
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    want = ref.forward_features(x)
    got = ours.visual.forward_features(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.visual.forward_head(got, pre_logits=True), ref.forward_head(want, pre_logits=True),
                               atol=1e-5, rtol=1e-5)
    assert ours.visual.num_features == ref.num_features == 768
    # a grey image is the same as its 3-channel copy (the patch weights are folded)
    g = x[:, :1]
    torch.testing.assert_close(ours.visual.forward_features(g), ref.forward_features(g.expand(-1, 3, -1, -1)),
                               atol=1e-4, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("kw", [
    dict(indices=[1, -1], norm=True),  # selected blocks, final norm applied, final features too
    dict(indices=2, output_fmt="NLC", return_prefix_tokens=True, stop_early=True),
    dict(indices=[0, 3], intermediates_only=True, stop_early=True),
])
def test_timm_vit_b16_intermediates(vit_pair, kw):
    ref, ours = vit_pair
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    want, got = ref.forward_intermediates(x, **kw), ours.visual.forward_intermediates(x, **kw)
    if not kw.get("intermediates_only"):
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
        want, got = want[1], got[1]
    assert len(got) == len(want)
    for a, b in zip(got, want):
        if kw.get("return_prefix_tokens"):
            torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=1e-5)  # the CLS token
            a, b = a[0], b[0]
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_hf_bert_token_states(tmp_path, shared_dir):
    transformers = pytest.importorskip("transformers")
    folder = os.path.join(shared_dir, "vocab", "bio_clinicalbert")
    hf_cfg = transformers.BertConfig.from_pretrained(folder)
    # Med-ST runs its BERT in text mode, where the cross-attention of the shared config never runs (and
    # transformers builds it only for decoders)
    hf_cfg.add_cross_attention = False
    hf_cfg.output_attentions = False  # asked for by the shared config; irrelevant to the hidden states
    torch.manual_seed(0)
    hf = transformers.BertModel(hf_cfg, add_pooling_layer=False).eval()
    hf.save_pretrained(tmp_path / "bert")  # config.json + model.safetensors, as a user's local BERT folder
    text = text_config_from_hf(folder)
    assert text["layers"] == 6 and text["hidden"] == 768 and text["vocab_size"] == 28996
    tok = medst_fast.get_tokenizer(folder)
    enc = tok(["Small right pleural effusion, unchanged.", "No pneumothorax."])
    ids, mask = enc["input_ids"], enc["attention_mask"]
    want = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    # Med-ST's tower has no token-type embedding; with one (as BioClinicalBERT ships it) it is HF's BERT
    with_tt = medst_fast.create_model("medst_tiny", text={**text, "token_type": True}).eval()
    load_hf_bert(with_tt, str(tmp_path / "bert"))
    got = with_tt.text.forward_hidden(ids, mask)
    keep = mask.bool()  # padded positions are never read downstream
    torch.testing.assert_close(got[keep], want[keep], atol=2e-5, rtol=2e-5)
    # without it, the load drops exactly that row: HF with its token-type row zeroed gives the same states
    plain = medst_fast.create_model("medst_tiny", text=text).eval()
    notes = load_hf_bert(plain, str(tmp_path / "bert"))
    assert any("token-type" in n for n in notes)
    hf.embeddings.token_type_embeddings.weight.zero_()
    want0 = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(plain.text.forward_hidden(ids, mask)[keep], want0[keep], atol=2e-5, rtol=2e-5)
    assert (want0[keep] - want[keep]).abs().max() > 1e-3  # the two comparisons are not the same one
