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
Sizes: 40 and 160 studies (series of 4), half of them with a lateral. Timing: CUDA events, 3 warm-up and 10
timed steps (median in the row; min, max and n in the note). Data loading is excluded (the batch is already
on the device). Studies/s counts studies; the note gives ms/step, peak GiB and MFU: the step's matmul flops
(counted from the config, tokens that exist) over the dense bf16 matmul rate measured in the same run.
Another row times a batch of frontal-only studies against one of two-view studies (the lateral's cost).
On CPU the shapes are tiny (medst_tiny, 4 studies) and the rows say they are not performance numbers.
"""
import os
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F

import pytest

from _common import bench, matmul_peak_tflops, peak_gib, quick, row, spread

import medst_fast
from medst_fast.kernels._utils import get_backend, has_triton, set_backend
from medst_fast.losses import MedSTLoss
from medst_fast.models.medst import MedSTOutput
from medst_fast.text.tokenizer import MedSTTokenizer
from medst_fast.train.data import RandomSeriesDataset, build_wordpiece_vocab, collate_pretokenized
from medst_fast.train.step import PretrainModule, StepRunner, batch_to, freeze_unused

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
MODEL = os.environ.get("BENCH_MODEL", "medst_vit_b16" if CUDA else "medst_tiny")
STUDIES = (40, 160) if CUDA and not quick() else (4,)
AMP = "bf16" if CUDA else "none"  # the precision of every speed-up row
WARMUP, TIMED = 3, 10
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
        # the four loss terms the trainer's step records (StepRunner: ita, local, temporal, cross_local)
        return lo.total, torch.stack([lo.ita, lo.local, lo.temporal, lo.cross_local]).float()


def _batch(tok, img_size, studies, laterals="half"):
    """``studies`` studies in full series of 4 (one temporal cycle each); ``laterals``: "half" (every second
    study has one), "none" or "all"."""
    ds = RandomSeriesDataset(8 * studies, tok, img_size, seed=0)
    full = (it for it in (ds[i] for i in range(len(ds))) if it["frontal"].shape[0] == 4)  # lazily: ~60 % are
    items = [next(full) for _ in range(studies // 4)]
    g = torch.Generator().manual_seed(1)
    for k, it in enumerate(items):
        has = torch.tensor([laterals == "all" or (laterals == "half" and (4 * k + t) % 2 == 0) for t in range(4)])
        it["has_lateral"] = has
        it["lateral"] = (torch.rand(it["frontal"].shape, generator=g) * 2 - 1) * has[:, None, None, None]
    return batch_to(collate_pretokenized(items), DEV)


def step_gflop(cfg, n_frontal_only, n_two_view, text_len, batch) -> float:
    """Matmul GFLOP of one training step (forward + backward = 3x forward) over the tokens that exist: ViT
    blocks on each study's packed sequence (197 frontal tokens, + 196 lateral ones), patch embedding, the
    text encoder on ``text_len`` tokens. Heads and losses are left out (well under 1 %)."""
    v, t = cfg.vision, cfg.text
    P = v.num_patches

    def blocks(n, d, hidden, depth):  # per sequence of n tokens: qkv + proj + fc1 + fc2, and QK^T + AV
        return depth * (2 * n * (4 * d * d + 2 * d * hidden) + 2 * 2 * n * n * d)

    hv = int(v.width * v.mlp_ratio)
    vis = n_frontal_only * blocks(P + 1, v.width, hv, v.depth) + n_two_view * blocks(2 * P + 1, v.width, hv, v.depth)
    vis += (n_frontal_only + 2 * n_two_view) * 2 * P * v.width * v.in_chans * v.patch_size ** 2
    txt = batch * blocks(text_len, t.hidden, t.intermediate, t.layers)
    return 3 * (vis + txt) / 1e9


def _tokenizer(tmp_path_factory=None):
    """The shared BioClinicalBERT vocabulary when present (MEDST_SHARED_DIR or ../shared), else a small one
    built from the random reports."""
    shared = os.environ.get("MEDST_SHARED_DIR")
    vocab = os.path.join(shared, "vocab", "bio_clinicalbert", "vocab.txt") if shared else SHARED_VOCAB
    if os.path.isfile(vocab):
        return MedSTTokenizer(vocab)
    d = tmp_path_factory.mktemp("vocab") if tmp_path_factory is not None else tempfile.mkdtemp(prefix="medst_vocab_")
    return MedSTTokenizer(build_wordpiece_vocab(RandomSeriesDataset(64, None, 8).texts(), str(d)))


def _precision(amp: str) -> str:
    return "fp32" if amp == "none" else amp


_PEAK = {}


def _peak() -> dict:
    """The dense matmul rate of this device, measured once per run (the MFU denominator)."""
    if not _PEAK:
        _PEAK.update(matmul_peak_tflops())
    return _PEAK


@pytest.mark.parametrize("studies", STUDIES)
def test_train_step(bench_results, tmp_path_factory, studies):
    tok = _tokenizer(tmp_path_factory)
    torch.manual_seed(0)
    base = medst_fast.create_model(MODEL, text={"vocab_size": tok.vocab_size})
    freeze_unused(base)
    batch = _batch(tok, base.cfg.vision.img_size, studies)
    B = batch["frontal"].shape[0]
    L = batch["input_ids"].shape[1]
    n_lat = int(batch["has_lateral"].sum())
    gflop = step_gflop(base.cfg, B - n_lat, n_lat, L, B)
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

    if studies == STUDIES[0]:  # the same code runs at the other sizes
        _check_same_loss(make, batch)
    set_backend(fast_backend)

    def measure(impl, amp=AMP, b=batch, flop=gflop):
        """(ms dict, studies/s, peak GiB, MFU) of one implementation's step; None when it ran out of memory."""
        runner, backend = make(impl, amp)
        set_backend(backend)
        runner.module.train()

        def step():
            runner.forward_backward([b])
            runner.optimizer_step(4e-5)

        try:
            t = bench(step, warmup=WARMUP, rep=TIMED)
            peak = peak_gib(step)
        except torch.cuda.OutOfMemoryError as e:  # a baseline that does not fit is a finding, not a crash
            print(f"OOM: {impl} at {B} studies ({amp}): {str(e).splitlines()[0]}")
            return None
        finally:
            set_backend(fast_backend)
            del runner
            if CUDA:
                torch.cuda.empty_cache()
        sps = b["frontal"].shape[0] / (t["ms"] / 1e3)
        mfu = flop * 1e9 / (t["ms"] * 1e-3) / (_peak()["tflops"] * 1e12)
        return t, sps, peak, mfu

    shape = f"{B} studies ({n_lat} with lateral), {base.cfg.vision.img_size}px, L{L}"
    fused = "Triton" if CUDA and has_triton() and fast_backend == "triton" else "PyTorch references (no CUDA)"
    ran = (f"ran: autocast {AMP}; medst_fast kernels backend {fast_backend} ({fused}), baselines backend torch"
           if AMP != "none" else f"ran: fp32, no autocast; medst_fast kernels backend {fast_backend} ({fused})")
    ours = measure("medst_fast")
    assert ours is not None, "medst_fast's own step ran out of memory"
    rows = []
    for impl in ("official-style eager", "plain PyTorch autocast"):
        other = measure(impl)
        if other is not None:
            rows.append(row("train_step", "train_step", shape, "studies/s", impl, other[1], "medst_fast", ours[1],
                            _precision(AMP), note=_note(other, ours, gflop) + "; " + ran))
    if CUDA and studies == STUDIES[0]:  # what bf16 alone is worth, separately from the speed-ups above
        fp32 = measure("medst_fast", "none")
        if fp32 is not None:
            rows.append(row("train_step", "train_step precision", shape, "studies/s", "medst_fast", fp32[1],
                            "medst_fast", ours[1], "fp32", _precision(AMP), note=_note(fp32, ours, gflop)))
    if studies == STUDIES[0]:
        rows += [r for r in [_lateral_cost_row(measure, tok, base, studies)] if r is not None]
    if os.environ.get("BENCH_COMPILE") == "1" and (comp := measure("medst_fast+compile")) is not None:
        rows.append(row("train_step", "train_step compile", shape, "studies/s", "medst_fast", ours[1],
                        "medst_fast+compile", comp[1], _precision(AMP), note=_note(ours, comp, gflop)))
    bench_results.add(rows)
    assert all(r["ours_value"] > 0 and r["baseline_value"] > 0 for r in rows)


def _check_same_loss(make, batch):
    """Every baseline computes the same loss as medst_fast: fp32, eval mode (no dropout, BN running stats),
    kernels backend "torch" (the fused ops' references)."""
    with torch.no_grad():
        fb = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in batch.items()}
        set_backend("torch")
        fast, _ = make("medst_fast", "none")
        fast.module.eval()
        want = fast.module(fb)[0]
        del fast
        for impl in ("official-style eager", "plain PyTorch autocast"):
            ref, _ = make(impl, "none")
            ref.module.eval()
            torch.testing.assert_close(ref.module(fb)[0], want, rtol=1e-4, atol=1e-4)
            del ref


def _lateral_cost_row(measure, tok, base, studies):
    """medst_fast's step on ``studies`` frontal-only studies against ``studies`` two-view ones: ms per study.
    ratio = two-view / frontal-only time (the packed path skips absent laterals, so > 1.8 is the goal)."""
    S = base.cfg.vision.img_size
    sides = {}
    for kind in ("all", "none"):
        b = _batch(tok, S, studies, laterals=kind)
        n = b["frontal"].shape[0]
        flop = step_gflop(base.cfg, 0 if kind == "all" else n, n if kind == "all" else 0, b["input_ids"].shape[1], n)
        sides[kind] = measure("medst_fast", b=b, flop=flop)
    two, one = sides["all"], sides["none"]
    if two is None or one is None:
        return None
    per = lambda m: m[0]["ms"] / studies  # noqa: E731
    return row("train_step", "frontal-only vs two-view study", f"{studies} studies per batch, {S}px", "ms",
               "two-view study", per(two), "frontal-only study", per(one), _precision(AMP),
               note=f"frontal-only costs {per(one) / per(two):.1%} of two-view; " + _note(two, one))


def _note(baseline, ours, gflop=None) -> str:
    """ms per step (median, min-max, n), peak GiB and MFU of both sides; the GFLOP and the matmul peak used."""
    pk = _peak()
    parts = [f"step {spread(baseline[0])} vs {spread(ours[0])}", f"MFU {baseline[3]:.1%} vs {ours[3]:.1%} of the "
             f"measured {pk['dtype']} matmul peak {pk['tflops']:.4g} TFLOP/s"]
    if gflop is not None:
        parts.append(f"{gflop:.4g} GFLOP/step")
    if CUDA:
        parts.append(f"peak GiB {baseline[2]:.3g} vs {ours[2]:.3g}")
    return "; ".join(parts)
