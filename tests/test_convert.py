"""Drop-in loading (official Med-ST / MGCA / timm / HF BERT layouts) and save_pretrained round trips.

The official checkpoint layout is built from modules (timm's ViT, transformers' BERT, the official heads and
attention modules under the official code's attribute names), never from the converter's own table."""
import os
import pickle

import numpy as np
import pytest
import torch

import medst_fast
from medst_fast.convert import (convert_medst_checkpoint, load_checkpoint, load_hf_bert, load_official_checkpoint,
                                load_timm_vit, read_state_dict)
from medst_fast.hub import from_pretrained, save_pretrained

# -- the official layout built from the official code's modules, not from the converter's table ------------------
def _official_from_modules(model, refs=None):
    """The state dict of the official MedST Lightning module at medst_tiny's sizes, with random values, built
    the way the official code builds it: ``img_encoder_q.model`` is a timm-style VisionTransformer whose blocks
    add a lateral expert (``mlp_l``, ``norm2_l``), ``text_encoder_q.model`` a transformers BertModel, the
    projection heads ``GlobalEmbedding``/``LocalEmbedding`` (Linear/Conv1d(k=1), BatchNorm1d, ReLU,
    Linear/Conv1d, BatchNorm1d without affine), the image encoder's unused lateral heads (``*_la``) and four
    nn.MultiheadAttention modules (attribute names from the official medst_module.py and encoder.py)."""
    timm = pytest.importorskip("timm")
    transformers = pytest.importorskip("transformers")
    from torch import nn

    v, t = model.cfg.vision, model.cfg.text
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=v.img_size, patch_size=v.patch_size, in_chans=v.in_chans, embed_dim=v.width, depth=v.depth,
        num_heads=v.heads, mlp_ratio=v.mlp_ratio, qkv_bias=v.qkv_bias, num_classes=0)
    sd = {}
    for k, x in vit.state_dict().items():
        sd["img_encoder_q.model." + k] = x
        if ".mlp." in k or ".norm2." in k:  # the official Block's lateral expert: a second MLP and its norm
            sd["img_encoder_q.model." + k.replace(".mlp.", ".mlp_l.").replace(".norm2.", ".norm2_l.")] = x
    # The official text model is med.py's BertModel (BLIP's copy of transformers' BERT, cross-attention layers
    # included): transformers' names, but its embeddings have no token-type table.
    # (transformers builds cross-attention only for a decoder, whose self-attention is causal: the names come
    # from that one, the reference forward from the same BERT without it)
    bert_cfg = dict(vocab_size=t.vocab_size, hidden_size=t.hidden, num_hidden_layers=t.layers,
                    num_attention_heads=t.heads, intermediate_size=t.intermediate, max_position_embeddings=t.max_position)
    layout = transformers.BertModel(transformers.BertConfig(**bert_cfg, is_decoder=True, add_cross_attention=True))
    sd.update({"text_encoder_q.model." + k: x for k, x in layout.state_dict().items()
               if "token_type_embeddings" not in k})
    bert = transformers.BertModel(transformers.BertConfig(**bert_cfg))
    hidden = model.visual_global_head.head[0].out_features
    out = model.visual_global_head.head[3].out_features

    def head(dim, conv):
        lin = (lambda a, b: nn.Conv1d(a, b, 1)) if conv else nn.Linear
        return nn.Sequential(lin(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), lin(hidden, out),
                             nn.BatchNorm1d(out, affine=False)).state_dict()

    for enc, dim, names in (("img_encoder_q", v.width, ("global_embed", "local_embed", "global_embed_la",
                                                         "local_embed_la")),
                            ("text_encoder_q", t.hidden, ("global_embed", "local_embed"))):
        for name in names:
            sd.update({f"{enc}.{name}.head.{k}": x for k, x in head(dim, "local" in name).items()})
    for name in ("patch_local_atten_layer", "word_local_atten_layer", "word_element_wise_multi_head",
                 "patch_element_wise_multi_head"):
        sd.update({f"{name}.{k}": x for k, x in nn.MultiheadAttention(out, 1).state_dict().items()})
    g = torch.Generator().manual_seed(0)  # distinct values everywhere, so a tensor loaded into the wrong place shows
    sd = {k: (x.clone() if not x.is_floating_point() else
              0.5 + torch.rand(x.shape, generator=g) if k.endswith("running_var") else  # a variance is positive
              0.05 * torch.randn(x.shape, generator=g)) for k, x in sd.items()}
    if refs is not None:  # timm's ViT and transformers' BERT holding the official tensors: the reference forwards
        vit.load_state_dict({k: sd["img_encoder_q.model." + k] for k in vit.state_dict()})
        bert_sd = {k: sd.get("text_encoder_q.model." + k) for k in bert.state_dict()}
        bert_sd["embeddings.token_type_embeddings.weight"] = torch.zeros_like(bert.embeddings.token_type_embeddings.weight)
        bert.load_state_dict(bert_sd)  # (a zero token-type row adds nothing, as med.py's embeddings do)
        refs.update(vit=vit.eval(), bert=bert.eval())
    return sd


# Where the official code keeps each part medst_fast loads (its attribute names), and the name timm, transformers
# or the official head gives the tensor inside it.
_OFFICIAL_PARTS = {"visual.": "img_encoder_q.model.", "text.": "text_encoder_q.model.",
                   "visual_global_head.": "img_encoder_q.global_embed.",
                   "visual_local_head.": "img_encoder_q.local_embed.",
                   "text_global_head.": "text_encoder_q.global_embed.",
                   "text_local_head.": "text_encoder_q.local_embed.",
                   "word_weighting.": "word_element_wise_multi_head.",
                   "patch_weighting.": "patch_element_wise_multi_head."}


def _inputs(model, tok):
    S = model.cfg.vision.img_size
    g = torch.Generator().manual_seed(3)
    enc = tok(["small right effusion", "no acute process", "edema worse", "new consolidation"])
    return dict(frontal=torch.randn(4, 1, S, S, generator=g), lateral=torch.randn(4, 1, S, S, generator=g),
                has_lateral=torch.tensor([True, False, True, False]), n_full_series=1, **enc)


def _same_outputs(a, b, batch):
    a.eval(), b.eval()
    with torch.no_grad():
        oa, ob = a(batch), b(batch)
    for f in ("img_global", "txt_global", "patch_local", "word_local"):
        torch.testing.assert_close(getattr(oa, f), getattr(ob, f), atol=0, rtol=0)


@pytest.mark.parametrize("faithful", [False, True])
def test_a_checkpoint_built_from_the_official_modules_loads_every_tensor(tmp_path, vocab_path, faithful):
    model = medst_fast.create_model("medst_tiny", faithful=faithful)
    refs = {}
    sd = _official_from_modules(model, refs)
    notes = convert_medst_checkpoint(sd)[1]
    assert any("never used" in n for n in notes) and any("cross-attention" in n for n in notes)
    path = tmp_path / "medst.ckpt"
    torch.save({"state_dict": sd, "epoch": 3}, path)  # the Lightning wrapper
    loaded = medst_fast.create_model("medst_tiny", faithful=faithful, pretrained=str(path))  # strict
    for k, x in loaded.state_dict().items():
        ours = next(a for a in _OFFICIAL_PARTS if k.startswith(a))
        src = sd[_OFFICIAL_PARTS[ours] + k[len(ours):]]
        assert torch.equal(x, src.reshape(x.shape)), k
    # the loaded towers compute what timm's ViT (the frontal expert) and transformers' BERT compute
    loaded.eval()
    S = model.cfg.vision.img_size
    x = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.visual.forward_features(x), refs["vit"].forward_features(x),
                                   atol=1e-5, rtol=1e-5)
        if not faithful:  # faithful mode reproduces an official quirk in the text positions (not plain BERT's)
            enc = medst_fast.get_tokenizer(vocab_path)(["small right effusion", "no acute process"])
            ids, mask = enc["input_ids"], enc["attention_mask"]
            keep = mask.bool()
            want = refs["bert"](input_ids=ids, attention_mask=mask).last_hidden_state
            torch.testing.assert_close(loaded.text.forward_hidden(ids, mask)[keep], want[keep], atol=2e-5, rtol=2e-5)
        # the whole model's forward on fixed inputs is deterministic
        b = _inputs(loaded, medst_fast.get_tokenizer(vocab_path))
        o1, o2 = loaded(b), loaded(b)
    assert torch.equal(o1.patch_local, o2.patch_local) and torch.equal(o1.txt_global, o2.txt_global)


def test_mgca_checkpoint_keeps_new_modules_initialised():
    dst = medst_fast.create_model("medst_tiny")
    sd = {k: v for k, v in _official_from_modules(dst).items()
          if ".mlp_l." not in k and ".norm2_l." not in k and "element_wise" not in k}
    before = dst.visual.blocks[0].mlp_l.fc1.weight.clone()
    load_official_checkpoint(dst, sd, kind="mgca")
    assert torch.equal(dst.visual.blocks[0].mlp.fc1.weight, sd["img_encoder_q.model.blocks.0.mlp.fc1.weight"])
    assert torch.equal(dst.visual.blocks[0].mlp_l.fc1.weight, before)
    with pytest.raises(ValueError, match=r"missing: \[.*mlp_l"):
        load_official_checkpoint(medst_fast.create_model("medst_tiny"), sd, kind="medst")


def test_bad_checkpoint_lists_missing_and_unexpected():
    sd = _official_from_modules(medst_fast.create_model("medst_tiny"))
    sd.pop("img_encoder_q.model.norm.weight")
    sd["img_encoder_q.model.bogus"] = torch.zeros(1)
    with pytest.raises(ValueError) as e:
        load_official_checkpoint(medst_fast.create_model("medst_tiny"), sd)
    assert "visual.norm.weight" in str(e.value) and "visual.bogus" in str(e.value)


def test_timm_vit_state_dict_loads():
    src = medst_fast.create_model("medst_tiny")
    sd = {k[len("visual."):]: v for k, v in src.state_dict().items() if k.startswith("visual.") and "_l." not in k}
    sd["head.weight"] = torch.zeros(1000, src.cfg.vision.width)
    sd["head.bias"] = torch.zeros(1000)
    dst = medst_fast.create_model("medst_tiny")
    notes = load_timm_vit(dst, {"model": sd}["model"])
    assert notes and "classifier" in notes[0]
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(dst.eval().visual(x)[0], src.eval().visual(x)[0])


def test_hf_bert_directory_loads_first_layers(tmp_path):
    from safetensors.torch import save_file

    big = medst_fast.create_model("medst_tiny", text={"layers": 4, "token_type": True})
    hf = {}
    for k, v in big.state_dict().items():
        if k.startswith("text."):
            k = "bert." + k[5:]
            if "LayerNorm.weight" in k:
                k = k.replace("LayerNorm.weight", "LayerNorm.gamma")
            hf[k] = v.clone()
    hf["cls.predictions.bias"] = torch.zeros(3)
    hf["bert.pooler.dense.weight"] = torch.zeros(2, 2)
    save_file(hf, str(tmp_path / "model.safetensors"))
    small = medst_fast.create_model("medst_tiny")  # 2 layers, no token-type embedding
    notes = load_hf_bert(small, str(tmp_path))
    assert any("layers >= 2" in n for n in notes) and any("token-type" in n for n in notes)
    assert torch.equal(small.text.encoder.layer[1].output.dense.weight, big.text.encoder.layer[1].output.dense.weight)
    assert torch.equal(small.text.embeddings.LayerNorm.weight, big.text.embeddings.LayerNorm.weight)


def test_save_pretrained_round_trip(tmp_path, vocab_path):
    tok = medst_fast.get_tokenizer(vocab_path)
    m = medst_fast.create_model("medst_tiny")
    # make BatchNorm running stats non-trivial so they must round-trip too
    m.train()
    with torch.no_grad():
        m(_inputs(m, tok))
    save_pretrained(m, tmp_path / "exp")
    assert sorted(os.listdir(tmp_path / "exp")) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    m2 = from_pretrained(tmp_path / "exp")
    _same_outputs(m, m2, _inputs(m, tok))
    m3 = medst_fast.create_model("medst_tiny", pretrained=str(tmp_path / "exp"))
    _same_outputs(m, m3, _inputs(m, tok))
    # encoder-only export loads into a model whose image path matches
    save_pretrained(m, tmp_path / "enc", components=["visual", "visual_global_head"])
    enc = from_pretrained(tmp_path / "enc").eval()
    x = torch.randn(2, 1, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(enc.encode_image(x), m.eval().encode_image(x), atol=0, rtol=0)


def test_truncated_weights_give_clear_error(tmp_path):
    m = medst_fast.create_model("medst_tiny")
    save_pretrained(m, tmp_path / "exp")
    w = tmp_path / "exp" / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        from_pretrained(tmp_path / "exp")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickled_code_is_refused(tmp_path):
    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump({"state_dict": {"a": _Evil()}}, f)
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        read_state_dict(str(p))
    with pytest.raises(ValueError, match="unrecognised checkpoint layout"):
        torch.save({"foo.bar": torch.zeros(1)}, tmp_path / "odd.pt")
        load_checkpoint(medst_fast.create_model("medst_tiny"), str(tmp_path / "odd.pt"))


def test_config_json_round_trip_and_overrides(tmp_path):
    cfg = medst_fast.get_model_config("medst_vit_b16")
    assert cfg.vision.width == 768 and cfg.text.layers == 6 and cfg.head.embed_dim == 128
    cfg.to_json(tmp_path / "c.json")
    assert medst_fast.MedSTConfig.from_json(tmp_path / "c.json") == cfg
    c2 = cfg.replace(faithful=True, **{"vision.depth": 2}, text={"layers": 1})
    assert c2.faithful and c2.vision.depth == 2 and c2.text.layers == 1 and cfg.vision.depth == 12
    with pytest.raises(ValueError, match="unknown"):
        cfg.replace(vision={"nope": 1})
    (tmp_path / "bad.json").write_text('{"vision": {"widht": 3}}')
    with pytest.raises(ValueError, match="bad.json"):
        medst_fast.add_model_config(tmp_path / "bad.json")
    assert {"medst_tiny", "medst_vit_b16"} <= set(medst_fast.list_models())


def test_readme_drop_in_snippet(tmp_path, vocab_path):
    """The README's drop-in block, with medst_tiny and files made here."""
    from PIL import Image

    medst_fast.save_pretrained(medst_fast.create_model("medst_tiny"), tmp_path / "m", vocab=vocab_path)
    model, train_tf, eval_tf = medst_fast.create_model_and_transforms(None, pretrained=str(tmp_path / "m"))
    tok = medst_fast.get_tokenizer(tmp_path / "m")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (130, 110), dtype=np.uint8)).save(tmp_path / "scan.png")
    img = eval_tf(str(tmp_path / "scan.png"))[None]
    assert img.shape == (1, 1, 96, 96)
    with torch.no_grad():
        z_img, z_txt = model.encode_image(img), model.encode_text(**tok(["small left effusion", "no pneumothorax"]))
        assert z_img.shape == (1, 32) and z_txt.shape == (2, 32)
        torch.testing.assert_close(z_img.norm(dim=-1), torch.ones(1))
        assert model.image_features(img).shape == (1, 64)
    medst_fast.save_pretrained(model, tmp_path / "out", tokenizer=tok)
    assert (tmp_path / "out" / "vocab.txt").is_file()
