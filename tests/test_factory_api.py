"""open_clip / timm / HF habits: the model name must agree with the weights, get_tokenizer takes what
create_model takes, and embed takes a single image file."""
import json

import numpy as np
import pytest
import torch

import medst_fast


def _trainer_run(tmp_path, vocab_path):
    """A run folder as the trainer leaves it: checkpoints/ckpt-*.pt (+ .sha256), args.json naming the vocab."""
    from medst_fast import weights as W

    src = medst_fast.create_model("medst_tiny", text={"max_length": 40}).eval()
    state = {"format": W.FORMAT_VERSION, "model": src.state_dict(), "optimizer": {}, "step": 3, "epoch": 0,
             "step_in_epoch": 3, "rng": [], "config": src.cfg.to_dict()}
    run = tmp_path / "run"
    path = W.save_checkpoint(state, str(run), 3, keep=2)  # writes run/checkpoints/
    (run / "args.json").write_text(json.dumps({"vocab": vocab_path}))
    return src, path


def test_a_name_that_disagrees_with_the_folder_is_refused(tmp_path, vocab_path):
    tiny = medst_fast.create_model("medst_tiny").eval()
    medst_fast.save_pretrained(tiny, tmp_path / "final", vocab=vocab_path)
    with pytest.raises(ValueError, match=r"another architecture than 'medst_vit_b16' \(vision.img_size 224 != 96.*"
                                         r"pass name=None"):
        medst_fast.create_model_and_transforms("medst_vit_b16", pretrained=tmp_path / "final")
    with pytest.raises(ValueError, match="pass name=None"):
        medst_fast.create_model("medst_vit_b16", pretrained=tmp_path / "final")
    # the matching name and None both give the folder's model
    for name in ("medst_tiny", None):
        m, _, ev = medst_fast.create_model_and_transforms(name, pretrained=tmp_path / "final")
        assert m.cfg.vision.width == 64 and ev(np.zeros((50, 40), np.uint8)).shape == (1, 96, 96)
        assert torch.equal(m.visual.patch_embed.proj.weight, tiny.visual.patch_embed.proj.weight)


def test_none_is_accepted_for_a_trainer_checkpoint_and_a_wrong_name_refused(tmp_path, vocab_path):
    src, path = _trainer_run(tmp_path, vocab_path)
    m, _, _ = medst_fast.create_model_and_transforms(None, pretrained=path)
    assert m.cfg.text.max_length == 40  # the checkpoint's own config, not a registered one
    assert torch.equal(m.text.embeddings.word_embeddings.weight, src.text.embeddings.word_embeddings.weight)
    with pytest.raises(ValueError, match=r"another architecture than 'medst_vit_b16'.*pass name=None"):
        medst_fast.create_model_and_transforms("medst_vit_b16", pretrained=path)
    with pytest.raises(ValueError, match="give a model name, or pretrained="):
        medst_fast.create_model_and_transforms(None)


def test_architecture_diff_ignores_vocab_and_dropout():
    from medst_fast.factory import architecture_diff, get_model_config

    tiny = get_model_config("medst_tiny")
    assert architecture_diff(tiny, tiny.replace(text={"vocab_size": 321, "hidden_dropout": 0.0})) == []
    assert architecture_diff(tiny, tiny.replace(vision={"depth": 3})) == ["vision.depth 2 != 3"]


def test_get_tokenizer_takes_a_checkpoint_a_folder_and_refuses_a_name(tmp_path, vocab_path):
    _, path = _trainer_run(tmp_path, vocab_path)
    tok = medst_fast.get_tokenizer(path)  # the run's vocabulary, the checkpoint's max_length
    assert tok.vocab_path == vocab_path and tok.max_length == 40
    ref = medst_fast.get_tokenizer(vocab_path, max_length=40)
    assert torch.equal(tok(["small left effusion"])["input_ids"], ref(["small left effusion"])["input_ids"])
    with pytest.raises(ValueError, match=r"medst_tiny is a model config name and no vocabulary is bundled.*"
                                         r"pass a model folder"):
        medst_fast.get_tokenizer("medst_tiny")
    with pytest.raises(FileNotFoundError, match="give a model folder, a trainer checkpoint, or a vocab.txt"):
        medst_fast.get_tokenizer("no_such_model")
    # weights without a vocabulary anywhere near: one line saying so, not WordPiece's "invalid UTF-8"
    lone = tmp_path / "lone" / "w.pt"
    lone.parent.mkdir()
    torch.save({"a": torch.zeros(2)}, lone)
    with pytest.raises(FileNotFoundError, match="a weights file, and no vocab.txt beside it"):
        medst_fast.get_tokenizer(lone)
    # a binary file given as the vocabulary is named as such
    (tmp_path / "img.txt").write_bytes(b"\xff\xd8\xff\xe0 jpeg bytes")
    with pytest.raises(ValueError, match="not a vocabulary \\(not UTF-8 text"):
        medst_fast.get_tokenizer(tmp_path / "img.txt")


@pytest.mark.parametrize("name", ["scan.jpg", "scan.PNG", "scan_no_extension"])
def test_embed_one_image_file(tmp_path, vocab_path, name):
    from PIL import Image

    from medst_fast.embed import list_images, main

    m = medst_fast.create_model("medst_tiny").eval()
    medst_fast.save_pretrained(m, tmp_path / "m", vocab=vocab_path)
    a = np.random.default_rng(0).integers(0, 256, (90, 80), dtype=np.uint8)
    p = tmp_path / name
    if name.endswith("no_extension"):  # a DICOM known by its preamble, as RSNA ships them
        pydicom = pytest.importorskip("pydicom")
        from pydicom.dataset import FileDataset, FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian, generate_uid

        meta = FileMetaDataset()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.MediaStorageSOPClassUID = generate_uid()
        meta.MediaStorageSOPInstanceUID = generate_uid()
        ds = FileDataset(str(p), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.Rows, ds.Columns = a.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = a.tobytes()
        ds.save_as(str(p), enforce_file_format=True) if "enforce_file_format" in ds.save_as.__code__.co_varnames \
            else ds.save_as(str(p), write_like_original=False)
    else:
        Image.fromarray(a).save(p, format="PNG" if name.lower().endswith("png") else "JPEG", quality=100)
    assert list_images(str(p)) == [str(p)]
    out = tmp_path / "e.npy"
    main(["--checkpoint", str(tmp_path / "m"), "--images", str(p), "--out", str(out), "--workers", "0"])
    emb = np.load(out)
    assert emb.shape == (1, m.cfg.head.embed_dim)
    _, _, ev = medst_fast.create_model_and_transforms(None, pretrained=tmp_path / "m")
    with torch.no_grad():
        ref = m.encode_image(ev(str(p))[None]).numpy()
    np.testing.assert_allclose(emb, ref, atol=1e-5, rtol=1e-5)
