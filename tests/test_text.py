"""Report cleaning, tokenizer word slots, device word-piece merging and the BERT encoder."""
import math

import pytest
import torch

from medst_fast.config import TextCfg
from medst_fast.models.text_bert import TextBert, merge_word_pieces, official_walk_slots
from medst_fast.text import MedSTTokenizer, clean_report, split_sections


def test_clean_report_official_rules():
    text, n = clean_report("1. Small left pleural effusion. 2. No pneumothorax.", "Heart size is normal. Ok.")
    # impression first, enumerations and periods split sentences, one-token sentences ("ok") dropped
    assert text == "small left pleural effusion no pneumothorax heart size is normal"
    assert n == 10
    t2, _ = clean_report("Lungs are clear. Café au lait.", None)
    assert t2 == "lungs are clear caf au lait"  # non-ASCII characters dropped
    t3, _ = clean_report("A b. C d.", None, joiner="")
    assert t3 == "a bc d"  # the official evaluation join bug, on request
    assert clean_report(None, None) == ("", 0)


def test_split_sections():
    rep = "  FINAL REPORT\n EXAMINATION: CHEST\n\nFINDINGS: Small effusion.\n\nIMPRESSION: Effusion, improving.\n"
    s = split_sections(rep)
    assert s["FINDINGS"] == "Small effusion."
    assert s["IMPRESSION"] == "Effusion, improving."


def corrected_slots(tokens):
    """The default grouping: '##' continues a word, the first [SEP] is a word of its own, always emitted."""
    slots, slot, started = [], -1, False
    for t in tokens:
        if t == "[SEP]" and slot >= 0 and not started:
            slot += 1
            slots.append(slot)
            started = True
        elif started or t == "[PAD]":
            slots.append(-1)
        elif t.startswith("##"):
            slots.append(slot)
        else:
            slot += 1
            slots.append(slot)
    return slots


def official_aggregate(h, tokens):
    """The official ``aggregate_tokens`` for one report, written as its Python loop.

    It zips the L token features and ids with the last layer's CLS attention over positions 1..L-1 (L-1
    entries), so it can visit tokens 0..L-2 only. Returns (words (L-1, D), filled (L-1,)) after dropping
    the CLS slot, zero-padded as the official code pads.
    """
    L, D = h.shape
    cls_attention = [0.0] * (L - 1)  # only its length matters to the walk
    words, bank = [], []
    for emb, tok, _ in zip(h, tokens, cls_attention):
        if tok == "[SEP]":
            words.append(torch.stack(bank).sum(0))
            words.append(emb)
            break
        if not tok.startswith("##"):
            if bank:
                words.append(torch.stack(bank).sum(0))
            bank = [emb]
        else:
            bank.append(emb)
    out = torch.cat([torch.stack(words), h.new_zeros(L - len(words), D)])
    filled = torch.arange(L) < len(words)
    return out[1:], filled[1:]


def test_tokenizer_slots_give_every_word_a_slot(vocab_path):
    tok = MedSTTokenizer(vocab_path)
    texts = ["small pleural effusion unchangedness x_y since prior", "", "a " * 200]
    enc = tok(texts)
    assert enc["input_ids"].shape == (3, 112)
    for b in range(3):
        toks = tok.convert_ids_to_tokens(enc["input_ids"][b].tolist())
        assert enc["word_slots"][b].tolist() == corrected_slots(toks)
    assert enc["attention_mask"][2].all()  # truncated to 112 with [SEP] last
    assert tok.convert_ids_to_tokens([enc["input_ids"][2, -1]]) == ["[SEP]"]


def corrected_aggregate(h, tokens):
    """The default merge written as a loop over ``corrected_slots``: every word and [SEP] get a slot."""
    L, D = h.shape
    out, filled = [h.new_zeros(D) for _ in range(L)], [False] * L
    for t, s in enumerate(corrected_slots(tokens)):
        if s >= 0:
            out[s] = out[s] + h[t]
            filled[s] = True
    return torch.stack(out)[1:], torch.tensor(filled)[1:]


_TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "small", "left", "pleural", "eff", "##usion",
               "un", "##change", "##d", "no", "pneumo", "##thorax", "a"]


@pytest.fixture
def tiny_tokenizer(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(_TINY_VOCAB) + "\n")
    return lambda n: MedSTTokenizer(tmp_path / "vocab.txt", max_length=n)


# short (reaches [SEP]); exactly full with a one-piece last word; truncated inside a multi-piece word;
# truncated right after a word start; a report one token shorter than the limit (nothing lost)
_REPORTS = ["small left effusion", "small left pleural unchanged no effusion a",
            "no pneumothorax unchanged effusion pneumothorax pneumothorax", "unchanged small left a pleural a no",
            "small pleural a no a"]


@pytest.mark.parametrize("n", [8, 9, 12])
def test_faithful_merge_matches_the_official_walk(tiny_tokenizer, n):
    """Faithful mode reproduces the official loop (111 of 112 entries visited); the default keeps every word."""
    tok = tiny_tokenizer(n)
    enc = tok(_REPORTS)
    assert enc["attention_mask"][:, -1].any() and not enc["attention_mask"][:, -1].all()  # both cases present
    cfg = TextCfg(vocab_size=len(_TINY_VOCAB), hidden=8, layers=1, heads=2, intermediate=16, max_length=n)
    for faithful in (True, False):
        m = TextBert(cfg, faithful_positions=faithful).eval()
        h = m.forward_hidden(enc["input_ids"], enc["attention_mask"]).detach().double().requires_grad_(True)
        merged, filled = merge_word_pieces(h, official_walk_slots(enc["word_slots"]) if faithful else enc["word_slots"])
        got, got_f = merged[:, 1:], filled[:, 1:]
        for b in range(len(_REPORTS)):
            toks = tok.convert_ids_to_tokens(enc["input_ids"][b].tolist())
            if faithful:
                ref, ref_f = official_aggregate(h[b], toks)
            else:
                ref, ref_f = corrected_aggregate(h[b], toks)
            torch.testing.assert_close(got[b], ref, atol=1e-12, rtol=1e-12)
            assert torch.equal(got_f[b], ref_f)
            g = torch.randn_like(ref)
            ga, = torch.autograd.grad(got[b], h, g, retain_graph=True)
            gb, = torch.autograd.grad(ref, h, g, retain_graph=True)
            torch.testing.assert_close(ga, gb, atol=1e-12, rtol=1e-12)
        # the tower applies the same rule from its faithful switch, on the device, without a host sync
        _, words, wmask = m(enc["input_ids"], enc["attention_mask"], enc["word_slots"])
        torch.testing.assert_close(words.double(), got.detach(), atol=1e-6, rtol=1e-6)  # fp32 sums vs fp64
        assert torch.equal(wmask, got_f)
    full = enc["attention_mask"][:, -1].bool()
    lost = (enc["word_slots"] >= 0) & (official_walk_slots(enc["word_slots"]) < 0)
    assert lost[full].any(dim=1).all() and not lost[~full].any()  # only reports that fill every position lose words


def test_model_faithful_switch_reaches_the_word_merge():
    import medst_fast

    assert medst_fast.create_model("medst_tiny", faithful=True).text.faithful_words is True
    assert medst_fast.create_model("medst_tiny").text.faithful_words is False


def test_faithful_merge_at_the_real_length(vocab_path):
    """112 tokens, the official max_length: a truncated report loses its last word and [SEP], others nothing."""
    tok = MedSTTokenizer(vocab_path)
    enc = tok(["a " * 200, "small pleural effusion unchangedness " * 40, "no pneumothorax"])
    h = torch.randn(3, 112, 6, dtype=torch.float64)
    merged, filled = merge_word_pieces(h, official_walk_slots(enc["word_slots"]))
    for b in range(3):
        ref, ref_f = official_aggregate(h[b], tok.convert_ids_to_tokens(enc["input_ids"][b].tolist()))
        torch.testing.assert_close(merged[b, 1:], ref, atol=1e-12, rtol=1e-12)
        assert torch.equal(filled[b, 1:], ref_f)
    n_default = enc["word_slots"].amax(1).tolist()  # slots the default grouping fills (CLS excluded)
    # exactly two slots are lost on a truncated report (the word in progress and [SEP]), none otherwise
    assert filled[:, 1:].sum(1).tolist() == [n_default[0] - 2, n_default[1] - 2, n_default[2]]


def test_tokenizer_missing_vocab_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab"):
        MedSTTokenizer(tmp_path / "nope.txt")


def test_merge_word_pieces_against_loop():
    B, L, D = 3, 9, 5
    h = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    slots = torch.tensor([[0, 1, 1, 2, 3, 3, 3, 4, -1],
                          [0, 1, 2, -1, -1, -1, -1, -1, -1],
                          [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    merged, filled = merge_word_pieces(h, slots)
    ref = torch.zeros(B, L, D, dtype=torch.float64)
    ref_f = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        for t in range(L):
            s = int(slots[b, t])
            if s >= 0:
                ref[b, s] = ref[b, s] + h[b, t]
                ref_f[b, s] = True
    torch.testing.assert_close(merged, ref)
    assert torch.equal(filled, ref_f)
    g = torch.randn_like(merged)
    ga, = torch.autograd.grad(merged, h, g)
    gb, = torch.autograd.grad(ref, h, g)
    torch.testing.assert_close(ga, gb)


def _ln(x, m):
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + m.eps) * m.weight + m.bias


def bert_reference(model: TextBert, ids, mask, positions):
    """Post-LN BERT written out with einsum (eval mode: no dropout)."""
    e = model.embeddings
    x = _ln(e.word_embeddings.weight[ids] + e.position_embeddings.weight[positions], e.LayerNorm)
    B, L, D = x.shape
    H = model.cfg.heads
    for layer in model.encoder.layer:
        a = layer.attention.self

        def proj(lin):
            return (torch.einsum("bld,ed->ble", x, lin.weight) + lin.bias).view(B, L, H, D // H)

        q, k, v = proj(a.query), proj(a.key), proj(a.value)
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D // H)
        s = s.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
        o = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v).reshape(B, L, D)
        ao = layer.attention.output
        x = _ln(x + torch.einsum("bld,ed->ble", o, ao.dense.weight) + ao.dense.bias, ao.LayerNorm)
        h = torch.einsum("bld,ed->ble", x, layer.intermediate.dense.weight) + layer.intermediate.dense.bias
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        oo = layer.output
        x = _ln(x + torch.einsum("ble,de->bld", h, oo.dense.weight) + oo.dense.bias, oo.LayerNorm)
    return x


@pytest.mark.parametrize("faithful", [False, True])
def test_bert_matches_reference(faithful):
    cfg = TextCfg(vocab_size=50, hidden=16, layers=2, heads=4, intermediate=32, max_length=10)
    torch.set_default_dtype(torch.float64)
    try:
        m = TextBert(cfg, faithful_positions=faithful).eval()
        ids = torch.randint(1, 50, (3, 10))
        mask = torch.ones(3, 10, dtype=torch.long)
        mask[1, 6:] = 0
        mask[2, 2:] = 0
        pos = torch.zeros(3, 10, dtype=torch.long) if faithful else torch.arange(10).expand(3, 10)
        out = m.forward_hidden(ids, mask)
        ref = bert_reference(m, ids, mask, pos)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
        g = torch.randn_like(out)
        params = list(m.parameters())
        for a, b in zip(torch.autograd.grad(out, params, g, allow_unused=True),
                        torch.autograd.grad(ref, params, g, allow_unused=True)):
            if a is None or b is None:
                continue
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
    finally:
        torch.set_default_dtype(torch.float32)


def test_faithful_positions_only_row_zero_learns():
    cfg = TextCfg(vocab_size=50, hidden=16, layers=1, heads=2, intermediate=32)
    for faithful, expect_rows in [(True, [0]), (False, list(range(8)))]:
        m = TextBert(cfg, faithful_positions=faithful)
        out = m.forward_hidden(torch.randint(1, 50, (2, 8)), torch.ones(2, 8, dtype=torch.long))
        out.square().sum().backward()
        rows = (m.embeddings.position_embeddings.weight.grad.abs().sum(1) > 0).nonzero().flatten().tolist()
        assert rows == expect_rows
