"""medst_fast.train.data.build_wordpiece_vocab: the synthetic set's vocabulary is a function of its reports."""
import subprocess
import sys

from medst_fast.text.tokenizer import MedSTTokenizer
from medst_fast.train.data import build_wordpiece_vocab

REPORTS = ["There is a moderate left pleural effusion.", "No pneumothorax; small right effusion.",
           "Heart size is normal. No focal consolidation.", "Mild pulmonary edema, unchanged."] * 3

_BUILD = ("import sys\nfrom medst_fast.train.data import build_wordpiece_vocab\n"
          "build_wordpiece_vocab(sys.argv[2:], sys.argv[1])\n")


def test_vocab_is_the_same_in_every_process(tmp_path):
    # The tokenizers WordPiece trainer gave a different vocabulary per process on the same reports; the quick
    # start's seed must fix its run, so two processes (two hash seeds) must write the same file.
    files = []
    for i, seed in enumerate(("1", "2")):
        out = tmp_path / f"v{i}"
        subprocess.run([sys.executable, "-c", _BUILD, str(out), *REPORTS], check=True,
                       env={"PYTHONHASHSEED": seed, "PATH": ""})
        files.append((out / "vocab.txt").read_bytes())
    assert files[0] == files[1]


def test_every_word_tokenises_whole_and_nothing_is_unknown(tmp_path):
    tok = MedSTTokenizer(build_wordpiece_vocab(REPORTS, str(tmp_path)))
    unk = tok._tok.token_to_id("[UNK]")
    for text in REPORTS + ["effusions, moderately"]:  # unseen words, seen letters
        enc = tok._tok.encode(text)
        assert unk not in enc.ids, (text, enc.tokens)
    tokens = tok._tok.encode("moderate left pleural effusion").tokens
    assert tokens[1:tokens.index("[SEP]")] == ["moderate", "left", "pleural", "effusion"]  # whole words
    vocab = (tmp_path / "vocab.txt").read_text().splitlines()
    assert vocab[0] == "[PAD]" and len(vocab) == len(set(vocab))


def test_vocab_size_caps_the_whole_words(tmp_path):
    vocab = open(build_wordpiece_vocab(REPORTS, str(tmp_path), vocab_size=60)).read().splitlines()
    assert len(vocab) <= 60 or all(not (len(t) > 1 and not t.startswith(("##", "["))) for t in vocab[60:])
    assert "effusion" in vocab  # the most frequent words come first
