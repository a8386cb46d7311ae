"""A vocab.txt is checked where it is read: not a vocabulary, duplicate tokens, or more tokens than the model's
embedding table are each one error naming the file (and the duplicates, or both sizes)."""
import io

import numpy as np
import pytest

import medst_fast
from medst_fast.eval.common import load_tokenizer
from medst_fast.text.tokenizer import MedSTTokenizer, read_vocab

_TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "small", "left", "pleural", "eff", "##usion", "no"]


def _write(path, tokens):
    path.write_text("\n".join(tokens) + "\n")
    return path


def test_duplicate_tokens_are_named(tmp_path):
    p = _write(tmp_path / "vocab.txt", _TINY_VOCAB + ["small", "no "])  # trailing space: the reader strips it
    with pytest.raises(ValueError, match=r"vocab.txt: 2 duplicate token\(s\): 'small' \(lines 6 and 12\), "
                                         r"'no' \(lines 11 and 13\)"):
        MedSTTokenizer(p, max_length=8)


def test_a_clean_vocab_keeps_its_line_numbers_as_ids(tmp_path):
    p = _write(tmp_path / "vocab.txt", _TINY_VOCAB)
    tok = MedSTTokenizer(p, max_length=8)
    assert read_vocab(p) == _TINY_VOCAB and tok.vocab_size == len(_TINY_VOCAB)
    assert tok(["small effusion"])["input_ids"][0, :5].tolist() == [2, 5, 8, 9, 3]


def test_a_jpeg_or_csv_given_as_vocab_is_not_a_vocabulary(tmp_path):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)).save(buf, "JPEG")
    jpg = tmp_path / "scan.jpg"
    jpg.write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match=r"scan.jpg: not a vocabulary \(not UTF-8 text"):
        MedSTTokenizer(jpg)
    csv = tmp_path / "studies.csv"
    csv.write_text("patient,study,report\np1,s1,small effusion\n")
    with pytest.raises(ValueError, match=r"studies.csv: not a WordPiece vocabulary \(2 lines, without the special "
                                         r"tokens \['\[PAD\]', '\[UNK\]', '\[CLS\]', '\[SEP\]'\]\)"):
        medst_fast.get_tokenizer(csv)


def test_a_vocab_larger_than_the_embedding_table_names_both_sizes(tmp_path):
    big = _write(tmp_path / "vocab.txt", _TINY_VOCAB + [f"w{i}" for i in range(40)])  # 51 tokens
    m = medst_fast.create_model("medst_tiny", text={"vocab_size": 32})
    with pytest.raises(ValueError, match=r"vocab.txt: 51 tokens, but the model has a text embedding table of 32 rows"):
        load_tokenizer(str(big), m)  # where eval and embed meet the model
    with pytest.raises(ValueError, match="51 tokens, but the model has a text embedding table of 32 rows"):
        medst_fast.save_pretrained(m, tmp_path / "exp", vocab=big)
    assert not (tmp_path / "exp").exists()
    # a folder whose vocab.txt was swapped for a larger one (written without digests): refused on load
    medst_fast.save_pretrained(m, tmp_path / "old")
    from safetensors.torch import load_file, save_file

    w = tmp_path / "old" / "model.safetensors"
    save_file(load_file(w), w, metadata={"format": "pt"})
    (tmp_path / "old" / "vocab.txt").write_bytes(big.read_bytes())
    with pytest.raises(ValueError, match=r"51 tokens, but .*config.json has a text embedding table of 32 rows"):
        medst_fast.from_pretrained(tmp_path / "old")
    with pytest.raises(ValueError, match=r"51 tokens, but .*config.json has a text embedding table of 32 rows"):
        medst_fast.get_tokenizer(tmp_path / "old")
