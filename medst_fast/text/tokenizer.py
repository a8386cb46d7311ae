"""WordPiece tokenizer from a local vocab.txt (no hub), with per-token word slots.

Med-ST sums the word pieces of each word into one word embedding (official ``aggregate_tokens``, a Python
loop with ``.item()`` per token). Here the tokenizer emits, for every token, the slot its word occupies:
slot 0 is [CLS], words follow in order, [SEP] takes the slot after the last word, PAD tokens get -1. The
text encoder then merges with one ``index_add_`` on the device. Pieces starting with "##" continue the
previous word in both schemes, so on every report shorter than ``max_length`` the slots agree with the
official merge token for token. On a report that fills all ``max_length`` positions they do not: the
official walk stops one token early and never emits the last word and [SEP]. These slots give both their
slot (the corrected default); faithful mode drops them in the text tower
(``medst_fast.models.text_bert.official_walk_slots``), so the tokenizer output is the same in both modes.
"""
from __future__ import annotations

import os
from typing import Dict, List, Sequence, Union

import torch

_DEFAULT_MAX = 112


class MedSTTokenizer:
    def __init__(self, vocab_path: Union[str, os.PathLike], max_length: int = _DEFAULT_MAX, lowercase: bool = True):
        try:
            from tokenizers import BertWordPieceTokenizer
        except ImportError as e:  # pragma: no cover - exercised only without the optional dependency
            raise ImportError("MedSTTokenizer needs the 'tokenizers' package: pip install tokenizers") from e
        vocab_path = os.fspath(vocab_path)
        if os.path.isdir(vocab_path):
            vocab_path = os.path.join(vocab_path, "vocab.txt")
        if not os.path.isfile(vocab_path):
            raise FileNotFoundError(f"tokenizer vocabulary not found: {vocab_path}")
        n_tokens = len(read_vocab(vocab_path))
        self.vocab_path = vocab_path
        self.max_length = max_length
        self._tok = BertWordPieceTokenizer(vocab_path, lowercase=lowercase)
        self._tok.enable_truncation(max_length)
        self._tok.enable_padding(length=max_length, pad_id=self._tok.token_to_id("[PAD]"), pad_token="[PAD]")
        self.pad_token_id = self._tok.token_to_id("[PAD]")
        self.cls_token_id = self._tok.token_to_id("[CLS]")
        self.sep_token_id = self._tok.token_to_id("[SEP]")
        self.vocab_size = self._tok.get_vocab_size()
        if self.vocab_size != n_tokens:  # read_vocab refuses duplicates, so this would be a reader mismatch
            raise ValueError(f"{vocab_path}: {n_tokens} lines but the WordPiece reader found {self.vocab_size} "
                             "distinct tokens; the file is not a one-token-per-line vocabulary")

    def __call__(self, texts: Union[str, Sequence[str]]) -> Dict[str, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        encs = self._tok.encode_batch(list(texts))
        n = len(encs)
        ids = torch.empty(n, self.max_length, dtype=torch.long)
        mask = torch.empty(n, self.max_length, dtype=torch.long)
        slots = torch.full((n, self.max_length), -1, dtype=torch.long)
        for b, e in enumerate(encs):
            ids[b] = torch.tensor(e.ids, dtype=torch.long)
            mask[b] = torch.tensor(e.attention_mask, dtype=torch.long)
            slots[b] = torch.tensor(word_slots(e.word_ids, e.ids, self.sep_token_id, self.cls_token_id))
        return {"input_ids": ids, "attention_mask": mask, "word_slots": slots}

    def convert_ids_to_tokens(self, ids: List[int]) -> List[str]:
        return [self._tok.id_to_token(int(i)) for i in ids]


# WordPiece needs these; a file without them is not a BERT vocabulary (a CSV, a report, a label list).
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


def read_vocab(path: Union[str, os.PathLike]) -> List[str]:
    """The tokens of a vocab.txt (line i is id i), checked: UTF-8 text, the special tokens, no duplicates.

    The WordPiece reader maps a repeated token to its last line, so a duplicate silently re-numbers the
    vocabulary (other ids for the same text) and leaves ids past the count of distinct tokens, which then
    index past the model's embedding table. Tokens are compared as that reader keeps them (trailing
    whitespace dropped).
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a vocabulary (not UTF-8 text: byte {e.start} is {raw[e.start:e.start + 1]!r}; "
                         "an image or binary file?); give the vocab.txt the model was trained with") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    tokens = [ln.rstrip() for ln in lines]
    missing = [t for t in SPECIAL_TOKENS if t not in tokens]
    if missing:
        raise ValueError(f"{path}: not a WordPiece vocabulary ({len(tokens)} lines, without the special tokens "
                         f"{missing}); give the vocab.txt the model was trained with (one token per line)")
    first: Dict[str, int] = {}
    dups = []
    for i, t in enumerate(tokens, 1):
        if t in first:
            dups.append(f"{t!r} (lines {first[t]} and {i})")
        else:
            first[t] = i
    if dups:
        more = " ..." if len(dups) > 5 else ""
        raise ValueError(f"{path}: {len(dups)} duplicate token(s): {', '.join(dups[:5])}{more}; "
                         "a repeated token re-numbers the vocabulary and gives ids past the model's embedding "
                         "table: remove the repeats or use the vocab.txt the model was trained with")
    return tokens


def check_vocab_fits(vocab_size: int, table_size: int, vocab_path: str, model_source: str) -> None:
    """A vocabulary larger than the model's embedding table gives ids past its end (an IndexError at best)."""
    if vocab_size > table_size:
        raise ValueError(f"{vocab_path}: {vocab_size} tokens, but {model_source} has a text embedding table of "
                         f"{table_size} rows (text.vocab_size); this vocabulary does not belong to this model")


def word_slots(word_ids: List, ids: List[int], sep_id: int, cls_id: int) -> List[int]:
    """Map each token to its word slot: CLS 0, word w -> 1 + w, first SEP -> next slot, the rest -1."""
    out, last = [], 0
    for w, t in zip(word_ids, ids):
        if w is not None:
            last = 1 + w
            out.append(last)
        elif t == cls_id and not out:
            out.append(0)
        elif t == sep_id and last >= 0:
            out.append(last + 1)
            last = -1  # anything after the first [SEP] is padding
        else:
            out.append(-1)
    return out


VOCAB_FILE = "vocab.txt"
