"""Drop-in loading (official Med-ST / MGCA / timm / HF BERT layouts) and save_pretrained round trips."""
import os
import pickle

import numpy as np
import pytest
import torch

import medst_fast
from medst_fast.convert import (convert_medst_checkpoint, load_checkpoint, load_hf_bert, load_official_checkpoint,
                                load_timm_vit, read_state_dict)
from medst_fast.hub import from_pretrained, save_pretrained

REVERSE = [
    ("visual_global_head.", "img_encoder_q.global_embed."),
    ("visual_local_head.", "img_encoder_q.local_embed."),
    ("visual.", "img_encoder_q.model."),
    ("text_global_head.", "text_encoder_q.global_embed."),
    ("text_local_head.", "text_encoder_q.local_embed."),
    ("text.", "text_encoder_q.model."),
    ("word_weighting.", "word_element_wise_multi_head."),
    ("patch_weighting.", "patch_element_wise_multi_head."),
]


def official_layout(model):
    """A state dict laid out as the official Lightning module names and shapes it (plus its unused tensors)."""
    sd = {}
    for k, v in model.state_dict().items():
        for a, b in REVERSE:
            if k.startswith(a):
                nk = b + k[len(a):]
                break
        if "local_embed.head." in nk and nk.endswith("weight") and v.dim() == 2:
            v = v[..., None]  # Conv1d(k=1) kernels
        sd[nk] = v.clone()
    D = model.cfg.vision.width
    sd["img_encoder_q.global_embed_la.head.0.weight"] = torch.zeros(8, D)
    sd["img_encoder_q.local_embed_la.head.0.weight"] = torch.zeros(8, D, 1)
    sd["text_encoder_q.model.encoder.layer.0.crossattention.self.query.weight"] = torch.zeros(4, 4)
    sd["text_encoder_q.model.pooler.dense.weight"] = torch.zeros(4, 4)
    sd["text_encoder_q.model.embeddings.position_ids"] = torch.arange(512)[None]
    sd["patch_local_atten_layer.in_proj_weight"] = torch.zeros(3, 3)
    return sd


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
def test_official_checkpoint_converts_and_loads(tmp_path, vocab_path, faithful):
    tok = medst_fast.get_tokenizer(vocab_path)
    src = medst_fast.create_model("medst_tiny", faithful=faithful)
    sd = official_layout(src)
    conv, notes = convert_medst_checkpoint(sd)
    assert any("never used" in n for n in notes) and any("cross-attention" in n for n in notes)
    path = tmp_path / "medst.ckpt"
    torch.save({"state_dict": sd, "epoch": 3}, path)  # the Lightning wrapper
    dst = medst_fast.create_model("medst_tiny", faithful=faithful, pretrained=str(path))
    _same_outputs(src, dst, _inputs(src, tok))
    # the faithful forward on fixed inputs is deterministic
    b = _inputs(src, tok)
    with torch.no_grad():
        o1, o2 = dst(b), dst(b)
    assert torch.equal(o1.patch_local, o2.patch_local) and torch.equal(o1.txt_global, o2.txt_global)


def test_mgca_checkpoint_keeps_new_modules_initialised():
    src = medst_fast.create_model("medst_tiny")
    sd = {k: v for k, v in official_layout(src).items()
          if ".mlp_l." not in k and ".norm2_l." not in k and "element_wise" not in k}
    dst = medst_fast.create_model("medst_tiny")
    before = dst.visual.blocks[0].mlp_l.fc1.weight.clone()
    load_official_checkpoint(dst, sd, kind="mgca")
    assert torch.equal(dst.visual.blocks[0].mlp.fc1.weight, src.visual.blocks[0].mlp.fc1.weight)
    assert torch.equal(dst.visual.blocks[0].mlp_l.fc1.weight, before)
    with pytest.raises(ValueError, match=r"missing: \[.*mlp_l"):
        load_official_checkpoint(medst_fast.create_model("medst_tiny"), sd, kind="medst")


def test_bad_checkpoint_lists_missing_and_unexpected():
    src = medst_fast.create_model("medst_tiny")
    sd = official_layout(src)
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
