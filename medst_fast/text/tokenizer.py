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
from typing import Dict, List, Optional, Sequence, Union

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
        self.vocab_path = vocab_path
        self.max_length = max_length
        self._tok = BertWordPieceTokenizer(vocab_path, lowercase=lowercase)
        self._tok.enable_truncation(max_length)
        self._tok.enable_padding(length=max_length, pad_id=self._tok.token_to_id("[PAD]"), pad_token="[PAD]")
        self.pad_token_id = self._tok.token_to_id("[PAD]")
        self.cls_token_id = self._tok.token_to_id("[CLS]")
        self.sep_token_id = self._tok.token_to_id("[SEP]")
        self.vocab_size = self._tok.get_vocab_size()

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


def _folder_max_length(folder: str) -> Optional[int]:
    """text.max_length from a save_pretrained folder's config.json (None when the folder has none of ours)."""
    import json

    p = os.path.join(folder, "config.json")
    if not os.path.isfile(p):
        return None
    try:
        with open(p) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{p}: cannot read ({e})") from None
    text = d.get("text") if isinstance(d, dict) else None  # a Hugging Face config.json has no "text" section
    v = text.get("max_length") if isinstance(text, dict) else None
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def get_tokenizer(name_or_path: Union[str, os.PathLike], max_length: Optional[int] = None) -> MedSTTokenizer:
    """The WordPiece tokenizer of a vocab.txt, of a folder holding one, or of a ``save_pretrained`` folder.

    Args:
        name_or_path: a vocab.txt file; or a folder with vocab.txt (a model saved with its vocabulary, the
            trainer's ``final/``, a Hugging Face BERT folder).
        max_length: tokens per text; default: the saved model's ``text.max_length``, else 112.
    """
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        vocab = os.path.join(path, VOCAB_FILE)
        if not os.path.isfile(vocab):
            has_model = os.path.isfile(os.path.join(path, "model.safetensors"))
            hint = (" (a model folder saved without its vocabulary, e.g. an image-encoder export: use the full "
                    "model folder, or pass the vocab.txt it was trained with)") if has_model else ""
            raise FileNotFoundError(f"{path}: no {VOCAB_FILE} in this folder{hint}")
        if max_length is None:
            max_length = _folder_max_length(path)
        path = vocab
    return MedSTTokenizer(path, max_length=_DEFAULT_MAX if max_length is None else max_length)
