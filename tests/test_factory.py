"""The drop-in workflow: create_model_and_transforms, the user-facing image transforms, self-contained model
folders (vocab + preprocessing), encoder-only exports, checkpoints that carry their config, optional extras."""
import json
import os
import sys

import numpy as np
import pytest
import torch

import medst_fast
from medst_fast import factory
from medst_fast.data import transforms as T
from medst_fast.data.images import load_gray
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _loader_index import write_dicom  # noqa: E402


def _grey(h=120, w=100, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)




# -- transforms ---------------------------------------------------------------------------------------------
def test_create_model_and_transforms_shape_and_definition():
    model, train_tf, eval_tf = medst_fast.create_model_and_transforms("medst_tiny")
    assert not model.training and eval_tf.img_size == 96 and train_tf.train and not eval_tf.train
    a = _grey()
    # eval = the project's one definition, centre crop
    torch.testing.assert_close(eval_tf(a), T.eval_transform(a, 96), atol=0, rtol=0)
    # train = the trainer's ImageTransform, same random draws for the same generator
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    torch.testing.assert_close(train_tf(a, g1), T.ImageTransform(96, train=True)(a, g2), atol=0, rtol=0)
    # and the random crop really moves: some seed gives another crop than the centre
    crops = {tuple(train_tf(a, torch.Generator().manual_seed(s)).flatten()[:50].tolist()) for s in range(6)}
    assert len(crops) > 1
    with torch.no_grad():
        assert model.encode_image(eval_tf(a)[None]).shape == (1, 32)


def test_transform_inputs_path_pil_array_dicom(tmp_path):
    from PIL import Image

    _, _, ev = medst_fast.create_model_and_transforms("medst_tiny")
    a = _grey(130, 90)
    png = tmp_path / "x.png"
    Image.fromarray(a).save(png)
    want = T.eval_transform(a, 96)
    for src in (str(png), png, Image.open(png), a, torch.from_numpy(a), a[..., None]):
        torch.testing.assert_close(ev(src), want, atol=0, rtol=0)
    # colour input follows PIL's luma conversion, as load_gray does for an RGB file
    rgb = np.stack([a, np.roll(a, 3, 0), np.roll(a, 5, 1)], -1)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    torch.testing.assert_close(ev(rgb), T.eval_transform(np.asarray(load_gray(str(tmp_path / "c.png"))), 96))
    # 16-bit arrays are scaled by their maximum (as 16-bit PNGs are read)
    a16 = a.astype(np.uint16) * 16
    Image.fromarray(a16).save(tmp_path / "d.png")
    torch.testing.assert_close(ev(a16), ev(str(tmp_path / "d.png")), atol=0, rtol=0)
    # DICOM, with and without its extension (detected by the DICM marker); MONOCHROME1 inverted
    write_dicom(tmp_path / "e.dcm", a16, mono1=True)
    write_dicom(tmp_path / "noext", a16, mono1=True)
    d = ev(str(tmp_path / "e.dcm"))
    torch.testing.assert_close(ev(str(tmp_path / "noext")), d, atol=0, rtol=0)
    assert (d - ev(a16)).abs().max() > 0.5  # inverted, not the MONOCHROME2 image
    for bad in (a.astype(np.float32), np.zeros((4, 4, 2), np.uint8), torch.zeros(8, 8), [1, 2]):
        with pytest.raises(TypeError):
            ev(bad)
    with pytest.raises(FileNotFoundError, match="nothing.png"):
        ev(str(tmp_path / "nothing.png"))


# -- self-contained folders ----------------------------------------------------------------------------------
def test_folder_holds_vocab_and_preprocessing(tmp_path, vocab_path):
    m = medst_fast.create_model("medst_tiny").eval()
    medst_fast.save_pretrained(m, tmp_path / "m", vocab=vocab_path)
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors", "preprocessor_config.json",
                                                  "vocab.txt"]
    pre = json.loads((tmp_path / "m" / "preprocessor_config.json").read_text())
    assert pre["image_size"] == 96 and pre["resize_side"] == T.resize_side(96) == 110
    assert (pre["mean"], pre["std"], pre["pixel_scale"]) == (0.5, 0.5, 255.0)
    loaded, _, ev = medst_fast.create_model_and_transforms(None, pretrained=tmp_path / "m")
    assert loaded.vocab_file == str(tmp_path / "m" / "vocab.txt")
    # the folder alone gives the tokenizer (max_length from its config) and the same text embeddings
    tok = medst_fast.get_tokenizer(tmp_path / "m")
    assert tok.max_length == m.cfg.text.max_length
    ref_tok = medst_fast.get_tokenizer(vocab_path)
    texts = ["small left effusion", "no pneumothorax"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(**tok(texts)), m.encode_text(**ref_tok(texts)), atol=0, rtol=0)
    # re-saving a loaded model carries its vocabulary without being told
    medst_fast.save_pretrained(loaded, tmp_path / "again")
    assert (tmp_path / "again" / "vocab.txt").read_bytes() == open(vocab_path, "rb").read()
    # a preprocessing this version cannot reproduce is an error naming the file and field
    pre["resize_side"] = 128
    (tmp_path / "m" / "preprocessor_config.json").write_text(json.dumps(pre))
    with pytest.raises(ValueError, match=r"preprocessor_config.json: field 'resize_side' is 128"):
        medst_fast.create_model_and_transforms(None, pretrained=tmp_path / "m")


def test_get_tokenizer_has_one_definition(vocab_path, tmp_path):
    from medst_fast import factory, text
    from medst_fast.text import tokenizer

    assert medst_fast.get_tokenizer is factory.get_tokenizer
    assert not hasattr(tokenizer, "get_tokenizer") and not hasattr(text, "get_tokenizer")  # no second copy
    assert medst_fast.get_tokenizer(os.path.dirname(vocab_path)).vocab_size == 28996  # an HF folder too
    assert medst_fast.get_tokenizer(vocab_path, max_length=20)(["a b"])["input_ids"].shape == (1, 20)
    with pytest.raises(FileNotFoundError, match="no vocab.txt"):
        medst_fast.get_tokenizer(tmp_path)


def test_encoder_only_folder_builds_encoder_only_model(tmp_path, vocab_path):
    full = medst_fast.create_model("medst_tiny").eval()
    medst_fast.save_pretrained(full, tmp_path / "enc", components=["visual", "visual_global_head"], vocab=vocab_path)
    assert not (tmp_path / "enc" / "vocab.txt").exists()  # no text tower, so no tokenizer belongs with it
    enc = medst_fast.from_pretrained(tmp_path / "enc").eval()
    x = torch.randn(2, 1, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(enc.encode_image(x), full.encode_image(x), atol=0, rtol=0)
    assert not any(k.startswith("text.") for k in enc.state_dict())  # no random text weights at all
    tok = medst_fast.get_tokenizer(vocab_path)
    with pytest.raises(RuntimeError, match=r"enc holds only \['visual', 'visual_global_head'\].*no 'text'"):
        enc.encode_text(**tok(["effusion"]))
    with pytest.raises(FileNotFoundError, match="image-encoder export"):
        medst_fast.get_tokenizer(tmp_path / "enc")
    # saved again, it stays an encoder-only folder
    medst_fast.save_pretrained(enc, tmp_path / "enc2")
    assert json.loads((tmp_path / "enc2" / "config.json").read_text())["components"] == ["visual", "visual_global_head"]


def test_checkpoint_with_its_own_config_rebuilds_the_trained_model(tmp_path):
    from medst_fast import weights as W

    src = medst_fast.create_model("medst_tiny", text={"vocab_size": 321}).eval()
    state = {"format": W.FORMAT_VERSION, "model": src.state_dict(), "optimizer": {}, "step": 3, "epoch": 0,
             "step_in_epoch": 3, "rng": [], "config": src.cfg.to_dict()}
    run = tmp_path / "run"
    path = W.save_checkpoint(state, str(run), 3, keep=2)  # the trainer's writer: .pt + .sha256
    for name in (None, "medst_tiny"):  # the checkpoint's config wins over the registered one
        m = medst_fast.create_model(name, pretrained=path).eval()
        assert m.cfg.text.vocab_size == 321
        assert torch.equal(m.text.embeddings.word_embeddings.weight, src.text.embeddings.word_embeddings.weight)
    # flipped bytes are caught by the trainer's hash before anything loads
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(W.CheckpointError, match="corrupted"):
        medst_fast.create_model(None, pretrained=path)
    # a plain state dict of another vocabulary size: a clear shape-mismatch error, not a raw one
    torch.save(src.state_dict(), tmp_path / "w.pt")
    with pytest.raises(ValueError, match=r"shape mismatch: \['text.embeddings.word_embeddings.weight: \(321, 64\)"):
        medst_fast.create_model("medst_tiny", pretrained=str(tmp_path / "w.pt"))
    with pytest.raises(ValueError, match="carries no model config; give a model name"):
        medst_fast.create_model(None, pretrained=str(tmp_path / "w.pt"))


def test_safetensors_file_is_hash_checked(tmp_path):
    from medst_fast.convert import read_state_dict

    m = medst_fast.create_model("medst_tiny")
    medst_fast.save_pretrained(m, tmp_path / "m")
    w = tmp_path / "m" / "model.safetensors"
    assert set(read_state_dict(str(w))) == set(m.state_dict())
    data = bytearray(w.read_bytes())
    data[-5] ^= 0x55  # inside the last tensor's bytes
    w.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="content hash mismatch"):
        read_state_dict(str(w))


def test_missing_optional_package_names_the_extra(monkeypatch):
    with pytest.raises(ImportError, match=r"reading x needs the optional package 'scikit-learn'.*"
                                          r"pip install 'medst_fast\[eval\]'"):
        monkeypatch.setitem(__import__("sys").modules, "sklearn", None)  # as if not installed
        factory.optional_import("sklearn", "reading x")
    monkeypatch.setitem(__import__("sys").modules, "PIL", None)
    with pytest.raises(ImportError, match=r"pillow.*pip install 'medst_fast\[train\]'"):
        factory.check_extra("train")
    with pytest.raises(ImportError, match=r"pip install 'medst_fast\[eval\]'"):
        medst_fast.create_model_and_transforms("medst_tiny")[2]("some.png")


# -- locking towers (open_clip's lock_image_tower / lock_text_tower) ------------------------------------------
def _trainable(module):
    return {n for n, p in module.named_parameters() if p.requires_grad}


def test_lock_image_tower_groups_and_bn_stats(vocab_path):
    m = medst_fast.create_model("medst_tiny")
    text_before = _trainable(m.text)
    m.lock_image_tower()
    assert not _trainable(m.visual) and not _trainable(m.visual_global_head) and not _trainable(m.visual_local_head)
    assert _trainable(m.text) == text_before and _trainable(m.text_global_head)  # the text tower is untouched
    m.lock_image_tower(unlocked_groups=1)  # only the projection heads train (LiT-style)
    assert not _trainable(m.visual) and _trainable(m.visual_global_head) and _trainable(m.visual_local_head)
    m.lock_image_tower(unlocked_groups=2)  # + the last block and the final LayerNorm
    assert _trainable(m.visual) == {n for n, _ in m.visual.named_parameters() if n.startswith(("blocks.1.", "norm."))}
    m.lock_image_tower(unlocked_groups=4)  # every group (tiny: embeddings, block 0, block 1 + norm, heads)
    assert _trainable(m.visual) == {n for n, _ in m.visual.named_parameters()}
    with pytest.raises(ValueError, match="unlocked_groups"):
        m.lock_image_tower(unlocked_groups=5)
    # freeze_bn_stats: the locked heads' BatchNorm keeps its running statistics in a training forward
    m.lock_image_tower(freeze_bn_stats=True)
    m.train()
    bn = m.visual_global_head.head[1]
    before = (bn.running_mean.clone(), bn.running_var.clone())
    tok = medst_fast.get_tokenizer(vocab_path)
    S = 96
    batch = dict(frontal=torch.randn(4, 1, S, S), n_full_series=1,
                 **tok(["a", "b c", "d", "e f g"]))
    with torch.no_grad():
        m(batch)
    assert not bn.training and torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert m.text_global_head.head[1].training  # the text tower's BatchNorm still updates
    assert set(m.state_dict()) == set(medst_fast.create_model("medst_tiny").state_dict())


def test_lock_text_tower_layers_and_layer_norm():
    m = medst_fast.create_model("medst_tiny")  # 2 BERT layers: groups embeddings, layer 0, layer 1, heads
    m.lock_text_tower()
    assert not _trainable(m.text) and not _trainable(m.text_global_head) and _trainable(m.visual)
    m.lock_text_tower(unlocked_layers=2)
    assert _trainable(m.text) == {n for n, _ in m.text.named_parameters() if n.startswith("encoder.layer.1.")}
    assert _trainable(m.text_local_head)
    m.lock_text_tower(unlocked_layers=0, freeze_layer_norm=False)
    assert _trainable(m.text) == {n for n, _ in m.text.named_parameters() if "LayerNorm" in n}
    # an optimizer step with the image tower locked changes no image weight
    m2 = medst_fast.create_model("medst_tiny").train()
    m2.lock_image_tower()
    v0 = {k: v.clone() for k, v in m2.visual.state_dict().items()}
    opt = torch.optim.SGD([p for p in m2.parameters() if p.requires_grad], lr=1.0)
    m2.text_global_head(m2.text(torch.randint(5, 100, (3, 8)))[0]).sum().backward()
    opt.step()
    assert all(torch.equal(v0[k], v) for k, v in m2.visual.state_dict().items())


# -- packaging ------------------------------------------------------------------------------------------------
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _copy_sources(dst):
    import shutil

    for name in ("setup.py", "MANIFEST.in", "pyproject.toml", "README.md", "CMakeLists.txt"):
        shutil.copy(os.path.join(_REPO, name), dst)
    for d in ("csrc", "kernels", "medst_fast"):
        shutil.copytree(os.path.join(_REPO, d), os.path.join(dst, d),
                        ignore=shutil.ignore_patterns("*.so", "__pycache__"))


def test_sdist_carries_the_extension_sources(tmp_path):
    import subprocess
    import sys
    import tarfile

    src = tmp_path / "src"
    src.mkdir()
    _copy_sources(src)
    env = dict(os.environ, MEDST_FAST_NO_EXT="1")
    r = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=src, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (tar,) = list((tmp_path / "dist").glob("*.tar.gz"))
    names = {n.split("/", 1)[1] for n in tarfile.open(tar).getnames() if "/" in n}
    want = {"CMakeLists.txt", "MANIFEST.in", "setup.py", "medst_fast/model_configs/medst_tiny.json",
            "kernels/move_ffn.py"}
    want |= {f"csrc/{f}" for f in os.listdir(os.path.join(_REPO, "csrc"))}
    assert want <= names, sorted(want - names)


def test_isolated_build_says_the_extension_was_skipped(tmp_path):
    """Under pip's build isolation torch is not importable: the build warns (pip shows backend warnings)."""
    import subprocess
    import sys

    fake = tmp_path / "fake"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("raise ImportError('no torch in this build environment')\n")
    env = dict(os.environ, PYTHONPATH=str(fake))
    env.pop("MEDST_FAST_NO_EXT", None)
    r = subprocess.run([sys.executable, "-W", "always", os.path.join(_REPO, "setup.py"), "--version"], cwd=_REPO,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "UserWarning: medst_fast: the C++/CUDA extension medst_fast._C is not built" in r.stderr
    assert "pip install --no-build-isolation" in r.stderr
