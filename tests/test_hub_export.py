"""A save_pretrained folder is verified as a whole: config.json, preprocessor_config.json and vocab.txt are
covered by digests recorded in model.safetensors, and damaged or foreign content is one error naming the file."""
import json
import logging
import os

import pytest
import torch

import medst_fast
from medst_fast import hub
from medst_fast.convert import load_checkpoint

_TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "small", "left", "pleural", "eff", "##usion", "no"]


@pytest.fixture
def vocab(tmp_path):
    p = tmp_path / "vocab.txt"
    p.write_text("\n".join(_TINY_VOCAB) + "\n")
    return p


@pytest.fixture
def folder(tmp_path, vocab):
    m = medst_fast.create_model("medst_tiny").eval()
    return hub.save_pretrained(m, tmp_path / "exp", vocab=vocab), m


def _edit_json(path, fn):
    d = json.loads(open(path).read())
    fn(d)
    with open(path, "w") as f:
        json.dump(d, f, indent=2, sort_keys=True)


def test_one_changed_config_value_is_an_error_naming_the_file(folder):
    path, m = folder
    x = torch.randn(2, 1, 96, 96)
    cfg = os.path.join(path, "config.json")
    # a valid config, one number changed: without the digest this loads and moves the embeddings
    _edit_json(cfg, lambda d: d["vision"].update(ln_eps=1e-2))
    changed = m.cfg.replace(**{"vision.ln_eps": 1e-2})
    m2 = medst_fast.models.MedST(changed).eval()
    m2.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert (m2.encode_image(x) - m.encode_image(x)).abs().max() > 1e-3  # what a silent load would give
    with pytest.raises(ValueError, match=f"{cfg}: changed after the export was written"):
        hub.from_pretrained(path)


@pytest.mark.parametrize("name", ["preprocessor_config.json", "vocab.txt"])
def test_every_side_file_is_covered(folder, name):
    path, _ = folder
    p = os.path.join(path, name)
    with open(p, "a") as f:
        f.write("\n" if name.endswith(".json") else "extra\n")  # still valid JSON / still a vocabulary
    with pytest.raises(ValueError, match=f"{p}: changed after the export was written"):
        hub.from_pretrained(path)
    if name == "vocab.txt":  # the tokenizer of the folder checks the same record
        with pytest.raises(ValueError, match=f"{p}: changed after"):
            medst_fast.get_tokenizer(path)


def test_a_recorded_file_that_is_gone_is_an_error(folder):
    path, _ = folder
    os.unlink(os.path.join(path, "vocab.txt"))
    with pytest.raises(ValueError, match="vocab.txt: missing, but model.safetensors records it"):
        hub.from_pretrained(path)


def test_an_old_export_without_digests_loads_with_one_warning(folder, caplog, tmp_path):
    path, m = folder
    from safetensors.torch import load_file, save_file

    sd = load_file(os.path.join(path, "model.safetensors"))
    save_file(sd, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt", hub.HASH_KEY: hub.tensor_digest(sd)})
    with caplog.at_level(logging.WARNING, logger="medst_fast"):
        m2 = hub.from_pretrained(path).eval()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "not verified" in warnings[0] and "config.json" in warnings[0]
    x = torch.randn(1, 1, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(m2.encode_image(x), m.encode_image(x), atol=0, rtol=0)
    # without any digest (another tool wrote it): still one warning, now naming the weights as well
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medst_fast"):
        hub.from_pretrained(path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "nor the weights" in warnings[0]


def test_resaving_without_vocab_leaves_no_stale_unverified_vocab(folder, caplog):
    path, m = folder
    m.vocab_file = None
    hub.save_pretrained(m, path, components=["visual", "visual_global_head"])
    assert not os.path.exists(os.path.join(path, "vocab.txt"))
    with caplog.at_level(logging.WARNING, logger="medst_fast"):
        hub.from_pretrained(path)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_an_empty_config_json_names_the_file(folder):
    path, _ = folder
    cfg = os.path.join(path, "config.json")
    with open(cfg, "w") as f:
        f.write("{}")
    with pytest.raises(ValueError, match=rf"{cfg}: missing field\(s\) \['vision', 'text', 'head'\]"):
        hub.from_pretrained(path)


def test_a_tensor_of_the_wrong_shape_names_file_and_key(folder):
    path, _ = folder
    from safetensors.torch import load_file, save_file

    w = os.path.join(path, "model.safetensors")
    sd = load_file(w)
    sd["visual.pos_embed"] = torch.zeros(1, 5, 64)
    meta = hub.safetensors_metadata(w)
    meta[hub.HASH_KEY] = hub.tensor_digest(sd)  # consistently written, just not for this config
    save_file(sd, w, metadata=meta)
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'visual.pos_embed' has shape \(1, 5, 64\) but "
                                         r".*config.json gives \(1, 37, 64\)"):
        hub.from_pretrained(path)


def test_init_accepts_a_save_pretrained_folder(folder):
    path, m = folder
    fresh = medst_fast.create_model("medst_tiny").eval()
    load_checkpoint(fresh, path)  # what the trainer's --init calls
    for k, v in m.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    # a damaged folder is refused through the same path, naming the file
    _edit_json(os.path.join(path, "config.json"), lambda d: d["vision"].update(ln_eps=1e-2))
    with pytest.raises(ValueError, match="config.json: changed after"):
        load_checkpoint(fresh, path)


def test_init_refuses_an_encoder_only_folder(tmp_path):
    m = medst_fast.create_model("medst_tiny")
    enc = hub.save_pretrained(m, tmp_path / "enc", components=["visual", "visual_global_head"])
    with pytest.raises(ValueError, match="partial export"):
        load_checkpoint(medst_fast.create_model("medst_tiny"), enc)
    with pytest.raises(FileNotFoundError, match="a folder without model.safetensors"):
        load_checkpoint(m, str(tmp_path))
