"""BERT text encoder on SDPA, with word-piece -> word pooling on the device (docs/method.md §2.2).

Parameter names follow Hugging Face ``BertModel`` so a local BioClinicalBERT directory loads by name.
The official encoder is BLIP's ``med.py`` BERT in text mode: no token-type embedding, CLS of the last
layer as the report feature, word pieces summed into words (slot 0 = [CLS], [SEP] a word of its own,
empty slots zero), 111 word slots after dropping CLS. Faithful mode also reproduces which words the official
merge never emits on a report that fills every position (``official_walk_slots``, docs/method.md §6.1.3).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import TextCfg
from .layers import sdpa


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: TextCfg):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position, cfg.hidden)
        if cfg.token_type:
            self.token_type_embeddings = nn.Embedding(2, cfg.hidden)
        self.LayerNorm = nn.LayerNorm(cfg.hidden, eps=cfg.ln_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        if hasattr(self, "token_type_embeddings"):
            x = x + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: TextCfg):
        super().__init__()
        self.heads = cfg.heads
        self.query = nn.Linear(cfg.hidden, cfg.hidden)
        self.key = nn.Linear(cfg.hidden, cfg.hidden)
        self.value = nn.Linear(cfg.hidden, cfg.hidden)
        self.dropout_p = cfg.attn_dropout

    def forward(self, x, attn_mask):
        B, L, D = x.shape
        h = self.heads

        def split(t):
            return t.view(B, L, h, D // h).transpose(1, 2)

        o = sdpa(split(self.query(x)), split(self.key(x)), split(self.value(x)), attn_mask,
                 dropout_p=self.dropout_p if self.training else 0.0)
        return o.transpose(1, 2).reshape(B, L, D)


class BertDenseLN(nn.Module):
    """dense -> dropout -> LayerNorm(residual + .), HF's BertSelfOutput / BertOutput."""

    def __init__(self, d_in: int, cfg: TextCfg):
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.hidden)
        self.LayerNorm = nn.LayerNorm(cfg.hidden, eps=cfg.ln_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x, residual):
        return self.LayerNorm(residual + self.dropout(self.dense(x)))


class BertAttention(nn.Module):
    def __init__(self, cfg: TextCfg):
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertDenseLN(cfg.hidden, cfg)

    def forward(self, x, attn_mask):
        return self.output(self.self(x, attn_mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: TextCfg):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden, cfg.intermediate)

    def forward(self, x):
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, cfg: TextCfg):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertDenseLN(cfg.intermediate, cfg)

    def forward(self, x, attn_mask):
        x = self.attention(x, attn_mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: TextCfg):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(cfg) for _ in range(cfg.layers)])


def merge_word_pieces(h: torch.Tensor, word_slots: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sum token features into word slots with one segment sum on the device.

    Args:
        h: (B, L, D) token features. word_slots: (B, L) long, slot per token, -1 for padding.
    Returns:
        merged (B, L, D) with slot s of sample b = sum of its tokens (zero where unused), and
        filled (B, L) bool, True for slots that received a token.
    """
    B, L, D = h.shape
    valid = word_slots >= 0
    offs = torch.arange(B, device=h.device)[:, None] * L
    # Padding tokens are routed to a dump row (index B*L) that is dropped afterwards: no boolean
    # indexing, so no host sync and static shapes for torch.compile.
    flat = torch.where(valid, word_slots + offs, torch.full_like(word_slots, B * L)).reshape(-1)
    merged = h.new_zeros(B * L + 1, D).index_add_(0, flat, h.reshape(-1, D))[:-1].view(B, L, D)
    filled = torch.zeros(B * L + 1, dtype=torch.bool, device=h.device)
    filled[flat] = True
    return merged, filled[:-1].view(B, L)


def official_walk_slots(word_slots: torch.Tensor) -> torch.Tensor:
    """The word slots the official merge actually fills: -1 for every token whose word it never emits.

    The official ``aggregate_tokens`` walks the L token ids zipped with the CLS attention over positions
    1..L-1, so it visits tokens 0..L-2 only. A word is emitted when the walk reaches the start of the next
    word or [SEP]. On a report that fills all L positions ([SEP] at L-1) the walk ends inside the last
    word: that word and [SEP] get no slot (they stay zero and count as PAD). A shorter report reaches its
    [SEP] and loses nothing. With slots increasing along the sequence, that is: when the last position
    holds a token, drop every slot >= the largest slot among tokens 0..L-2. Pure tensor ops (no host sync).

    Args:
        word_slots: (B, L) long, as the tokenizer writes them (-1 for padding).
    Returns:
        (B, L) long with the never-emitted tokens set to -1.
    """
    full = word_slots[:, -1] >= 0
    in_progress = word_slots[:, :-1].amax(dim=1)  # the word the walk is still assembling when it stops
    lost = full[:, None] & (word_slots >= in_progress[:, None])
    return torch.where(lost, torch.full_like(word_slots, -1), word_slots)


class TextBert(nn.Module):
    def __init__(self, cfg: TextCfg, faithful_positions: bool = False, faithful_words: Optional[bool] = None):
        super().__init__()
        self.cfg = cfg
        # Official quirk (docs/method.md §6.1.4): token_type_ids land in the position_ids slot, so every
        # token reads position row 0. Kept only in faithful mode.
        self.faithful_positions = faithful_positions
        # Official quirk (docs/method.md §6.1.3): the word merge never emits the last word and [SEP] of a report that
        # fills every position. Follows faithful_positions unless set, so MedSTConfig.faithful drives both.
        self.faithful_words = faithful_positions if faithful_words is None else faithful_words
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        self.grad_checkpointing = False
        self.init_weights()

    def init_weights(self):
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_hidden(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, L = input_ids.shape
        if L > self.cfg.max_position:
            raise ValueError(f"sequence of {L} tokens exceeds max_position {self.cfg.max_position}")
        if self.faithful_positions:
            pos = torch.zeros(L, dtype=torch.long, device=input_ids.device)
        else:
            pos = torch.arange(L, device=input_ids.device)
        x = self.embeddings(input_ids, pos[None].expand(B, L))
        mask = None
        if attention_mask is not None:
            mask = attention_mask.to(torch.bool)[:, None, None, :]
        for layer in self.encoder.layer:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask)
        return x

    def forward(self, input_ids, attention_mask=None, word_slots=None):
        """Returns (CLS (B, D), words (B, L-1, D) or None, word_mask (B, L-1) or None)."""
        h = self.forward_hidden(input_ids, attention_mask)
        if word_slots is None:
            return h[:, 0], None, None
        if self.faithful_words:
            word_slots = official_walk_slots(word_slots)
        merged, filled = merge_word_pieces(h, word_slots)
        return h[:, 0], merged[:, 1:], filled[:, 1:]
