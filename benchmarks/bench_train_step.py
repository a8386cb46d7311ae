"""One full Med-ST training step (forward, backward, AdamW update): medst_fast against two baselines, each in
the same run, on the same weights, batch, device and precision.

    pytest benchmarks/bench_train_step.py --benchmark [--bench-csv PATH] [--bench-quick]

- ``medst_fast``: the trainer's own StepRunner + PretrainModule, fused kernels (Triton where available),
  packed two-view sequences (absent laterals skipped), device word-piece merging, fused AdamW on CUDA.
- (a) ``official-style eager``: the PyTorch reference ops, word pieces merged by a per-token Python loop with
  ``.item()`` (MGCA/Med-ST ``aggregate_tokens``), the PAD mask built on the CPU from token strings and copied
  to the device, plain AdamW. (The official also runs fp32 with autograd anomaly detection on; both are
  left out here, which favours the baseline: the precision is the same on both sides.)
- (b) ``plain PyTorch autocast``: the same MedST model and loss with kernels backend "torch" and no packing
  (padded laterals), plain AdamW: what autocast alone gives.
Precision: bf16 autocast on CUDA, fp32 on the CPU, for every side of every speed-up row. On CUDA an extra
row ``train_step precision`` compares medst_fast fp32 with medst_fast bf16. ``BENCH_COMPILE=1`` adds a row
for torch.compile of medst_fast (baseline: medst_fast eager).
Data loading is excluded (the batch is already on the device). Studies/s counts studies (rows); the note
gives MFU (253 GFLOP per study, ViT-B Med-ST forward+backward, over the GPU's dense bf16 peak).
On CPU the shapes are tiny (medst_tiny, 2 series) and the rows say they are not performance numbers.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from _common import bench, peak_gib, quick, row

import medst_fast
from medst_fast.kernels._utils import get_backend, set_backend
from medst_fast.losses import MedSTLoss
from medst_fast.models.medst import MedSTOutput
from medst_fast.text.tokenizer import MedSTTokenizer
from medst_fast.train.data import RandomSeriesDataset, build_wordpiece_vocab, collate_pretokenized
from medst_fast.train.loop import PretrainModule, StepRunner, batch_to, freeze_unused

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
MODEL = os.environ.get("BENCH_MODEL", "medst_vit_b16" if CUDA else "medst_tiny")
SERIES = int(os.environ.get("BENCH_SERIES", "2" if (quick() or not CUDA) else "10"))
AMP = "bf16" if CUDA else "none"  # the precision of every speed-up row
GFLOP_PER_STUDY = 253.0  # ViT-B Med-ST, forward + backward
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}
SHARED_VOCAB = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "vocab", "bio_clinicalbert", "vocab.txt")


def official_aggregate(h: torch.Tensor, ids: torch.Tensor, tok: MedSTTokenizer):
    """Per-sample, per-token Python merge of word pieces (the official ``aggregate_tokens`` pattern).

    Returns words (B, L-1, D) and the word-present mask built from token strings on the CPU."""
    B, L, D = h.shape
    rows, masks = [], []
    for b in range(B):
        words, strs, cur, cur_s = [], [], [], ""
        for t in range(L):
            s = tok.convert_ids_to_tokens([ids[b, t].item()])[0]  # host sync per token, as the official
            if s == "[SEP]":
                if cur:
                    words.append(torch.stack(cur).sum(0))
                    strs.append(cur_s)
                words.append(h[b, t])
                strs.append(s)
                break
            if not s.startswith("##"):
                if cur:
                    words.append(torch.stack(cur).sum(0))
                    strs.append(cur_s)
                cur, cur_s = [h[b, t]], s
            else:
                cur.append(h[b, t])
                cur_s += s[2:]
        pad = L - len(words)
        rows.append(torch.cat([torch.stack(words), h.new_zeros(pad, D)]) if pad else torch.stack(words))
        masks.append(strs + ["[PAD]"] * pad)
    merged = torch.stack(rows)
    # CPU-built mask from strings, then a host-to-device copy (official: sents[:, 1:] == "[PAD]")
    word_mask = torch.tensor([[s != "[PAD]" for s in m[1:]] for m in masks]).to(h.device)
    return merged[:, 1:], word_mask


class OfficialStyle(nn.Module):
    def __init__(self, model, tok):
        super().__init__()
        self.model, self.tok = model, tok
        self.loss_fn = MedSTLoss(model.cfg.loss, model.cfg.faithful)

    def forward(self, batch):
        m = self.model
        cls, patches = m.visual(batch["frontal"], batch["lateral"], batch["has_lateral"])
        P = m.cfg.vision.num_patches
        pmask = torch.ones(patches.shape[:2], dtype=torch.bool, device=patches.device)
        pmask[:, P:] = batch["has_lateral"][:, None]
        h = m.text.forward_hidden(batch["input_ids"], batch["attention_mask"])
        words, wmask = official_aggregate(h, batch["input_ids"], self.tok)
        pm, wm = (None, None) if m.cfg.faithful else (pmask, wmask)
        out = MedSTOutput(F.normalize(m.visual_global_head(cls), dim=-1), F.normalize(m.text_global_head(h[:, 0]), dim=-1),
                          F.normalize(m.visual_local_head(patches, pm), dim=-1), F.normalize(m.text_local_head(words, wm), dim=-1),
                          pmask, wmask, int(batch["n_full_series"]), cls)
        lo = self.loss_fn(out, m)
        return lo.total, torch.stack([lo.ita, lo.local, lo.temporal]).float()


def _batch(tok, img_size):
    ds = RandomSeriesDataset(8 * SERIES, tok, img_size, seed=0)
    full = [i for i in range(len(ds)) if ds[i]["frontal"].shape[0] == 4][:SERIES]
    return batch_to(collate_pretokenized([ds[i] for i in full]), DEV)


def _tokenizer(tmp_path_factory):
    if os.path.isfile(SHARED_VOCAB):
        return MedSTTokenizer(SHARED_VOCAB)
    d = tmp_path_factory.mktemp("vocab")
    return MedSTTokenizer(build_wordpiece_vocab(RandomSeriesDataset(64, None, 8).texts(), str(d)))


def _precision(amp: str) -> str:
    return "fp32" if amp == "none" else amp


def test_train_step(bench_results, tmp_path_factory):
    tok = _tokenizer(tmp_path_factory)
    torch.manual_seed(0)
    base = medst_fast.create_model(MODEL, text={"vocab_size": tok.vocab_size})
    freeze_unused(base)
    batch = _batch(tok, base.cfg.vision.img_size)
    B = batch["frontal"].shape[0]
    fast_backend = get_backend()

    def make(impl, amp=AMP):
        """(runner, kernels backend) of one implementation, on a copy of the same weights."""
        model = medst_fast.create_model(MODEL, text={"vocab_size": tok.vocab_size}).to(DEV)
        model.load_state_dict(base.state_dict())
        freeze_unused(model)
        params = [p for p in model.parameters() if p.requires_grad]
        loss = MedSTLoss(model.cfg.loss, model.cfg.faithful)
        if impl == "official-style eager":
            opt = torch.optim.AdamW(params, lr=4e-5, weight_decay=0.05)
            return StepRunner(OfficialStyle(model, tok).to(DEV), opt, DEV, amp), "torch"
        if impl == "plain PyTorch autocast":
            model.packed = False  # padded laterals, as a plain implementation computes them
            opt = torch.optim.AdamW(params, lr=4e-5, weight_decay=0.05)
            return StepRunner(PretrainModule(model, loss), opt, DEV, amp), "torch"
        opt = torch.optim.AdamW(params, lr=4e-5, weight_decay=0.05, fused=CUDA)
        mod = PretrainModule(model, loss)
        if impl == "medst_fast+compile":
            mod = torch.compile(mod)
        return StepRunner(mod, opt, DEV, amp), fast_backend

    # Every baseline must compute the same loss: checked once in fp32, eval mode (no dropout, BN running stats).
    with torch.no_grad():
        fb = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in batch.items()}
        set_backend("torch")
        fast, _ = make("medst_fast", "none")
        fast.module.eval()
        want = fast.module(fb)[0]
        for impl in ("official-style eager", "plain PyTorch autocast"):
            ref, _ = make(impl, "none")
            ref.module.eval()
            torch.testing.assert_close(ref.module(fb)[0], want, rtol=1e-4, atol=1e-4)
        del fast, ref
    set_backend(fast_backend)

    def measure(impl, amp=AMP):
        runner, backend = make(impl, amp)
        set_backend(backend)
        runner.module.train()

        def step():
            runner.forward_backward([batch])
            runner.optimizer_step(4e-5)

        try:
            t = bench(step, warmup=3, rep=20)
            peak = peak_gib(step)
        finally:
            set_backend(fast_backend)
        sps = B / (t["ms"] / 1e3)
        return t["ms"], sps, peak

    shape = f"{SERIES} series, {B} studies, {base.cfg.vision.img_size}px, L{batch['input_ids'].shape[1]}"
    ours = measure("medst_fast")
    rows = []
    for impl in ("official-style eager", "plain PyTorch autocast"):
        other = measure(impl)
        rows.append(row("train_step", "train_step", shape, "studies/s", impl, other[1], "medst_fast", ours[1],
                        _precision(AMP), note=_note(other, ours)))
    if CUDA:  # what bf16 alone is worth, separately from the speed-ups above
        fp32 = measure("medst_fast", "none")
        rows.append(row("train_step", "train_step precision", shape, "studies/s", "medst_fast", fp32[1], "medst_fast",
                        ours[1], "fp32", _precision(AMP), note=_note(fp32, ours)))
    if os.environ.get("BENCH_COMPILE") == "1":
        comp = measure("medst_fast+compile")
        rows.append(row("train_step", "train_step compile", shape, "studies/s", "medst_fast", ours[1],
                        "medst_fast+compile", comp[1], _precision(AMP), note=_note(ours, comp)))
    bench_results.add(rows)
    assert all(r["ours_value"] > 0 and r["baseline_value"] > 0 for r in rows)


def _note(baseline, ours) -> str:
    """ms per step and peak GiB of both sides, and MFU where the GPU's peak is known (ViT-B only)."""
    parts = [f"ms/step {baseline[0]:.4g} vs {ours[0]:.4g}"]
    if CUDA:
        parts.append(f"peak GiB {baseline[2]:.3g} vs {ours[2]:.3g}")
        peak = next((v for k, v in PEAK_BF16.items() if k in torch.cuda.get_device_name()), None)
        if peak and MODEL == "medst_vit_b16":
            mfu = [GFLOP_PER_STUDY * 1e9 * sps / peak for sps in (baseline[1], ours[1])]
            parts.append(f"MFU {mfu[0]:.2%} vs {mfu[1]:.2%}")
    return "; ".join(parts)
