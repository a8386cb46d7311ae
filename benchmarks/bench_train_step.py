"""One full Med-ST training step (forward, backward, AdamW update): medst_fast vs an official-style eager path.

    pytest benchmarks/bench_train_step.py --benchmark -s

Both paths run the same model weights, batch and device in the same process:
- ``medst_fast``: the trainer's own StepRunner + PretrainModule, bf16 autocast on CUDA, fused kernels
  (Triton where available), device word-piece merging, fused AdamW. ``medst_fast+compile`` adds
  torch.compile when BENCH_COMPILE=1.
- ``official-style``: fp32, the PyTorch reference ops, word pieces merged by a per-token Python loop with
  ``.item()`` (MGCA/Med-ST ``aggregate_tokens``), the PAD mask built on the CPU from token strings and
  copied to the device, plain AdamW. (The official also enables autograd anomaly detection; it is left
  off here, which favours the baseline.)
Data loading is excluded (the batch is already on the device). Studies/s counts studies (rows); MFU uses
253 GFLOP per study (ViT-B Med-ST forward+backward) over the GPU's dense bf16 peak, for both paths.
On CPU the shapes are tiny (medst_tiny, 2 series) and the rows are marked as not performance numbers.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from _common import append_rows, bench, env_info, peak_gib, print_table

import medst_fast
from medst_fast.kernels import get_backend, set_backend
from medst_fast.losses import MedSTLoss
from medst_fast.models.medst import MedSTOutput
from medst_fast.text.tokenizer import MedSTTokenizer
from medst_fast.train.data import RandomSeriesDataset, build_wordpiece_vocab, collate_pretokenized
from medst_fast.train.loop import PretrainModule, StepRunner, batch_to, freeze_unused

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
MODEL = os.environ.get("BENCH_MODEL", "medst_vit_b16" if CUDA else "medst_tiny")
SERIES = int(os.environ.get("BENCH_SERIES", "10" if CUDA else "2"))
GFLOP_PER_STUDY = 253.0  # ViT-B Med-ST, forward + backward
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}
SHARED_VOCAB = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "vocab", "bio_clinicalbert", "vocab.txt")
COLS = ["impl", "model", "shape", "ms", "ms_p20", "ms_p80", "studies_per_s", "mfu", "speedup", "peak_gib", "gpu_name"]


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


def test_train_step(bench_csv, tmp_path_factory):
    if not CUDA:
        print("\n[bench_train_step] no CUDA device: medst_tiny at tiny shapes on CPU; not performance numbers")
    tok = _tokenizer(tmp_path_factory)
    torch.manual_seed(0)
    base = medst_fast.create_model(MODEL, text={"vocab_size": tok.vocab_size})
    freeze_unused(base)
    batch = _batch(tok, base.cfg.vision.img_size)
    B = batch["frontal"].shape[0]
    old_backend = get_backend()

    def make(impl):
        model = medst_fast.create_model(MODEL, text={"vocab_size": tok.vocab_size}).to(DEV)
        model.load_state_dict(base.state_dict())
        freeze_unused(model)
        params = [p for p in model.parameters() if p.requires_grad]
        if impl == "official-style":
            opt = torch.optim.AdamW(params, lr=4e-5, weight_decay=0.05)
            return StepRunner(OfficialStyle(model, tok).to(DEV), opt, DEV, "none"), model
        opt = torch.optim.AdamW(params, lr=4e-5, weight_decay=0.05, fused=CUDA)
        mod = PretrainModule(model, MedSTLoss(model.cfg.loss, model.cfg.faithful))
        if impl.endswith("+compile"):
            mod = torch.compile(mod)
        return StepRunner(mod, opt, DEV, "bf16" if CUDA else "none"), model

    # The baseline must compute the same loss: check once in fp32, eval mode (no dropout, BN running stats).
    set_backend("torch")
    with torch.no_grad():
        ref, _ = make("official-style")
        fast, _ = make("medst_fast")
        ref.module.eval(), fast.module.eval()
        fb = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in batch.items()}
        torch.testing.assert_close(fast.module(fb)[0], ref.module(fb)[0], rtol=1e-4, atol=1e-4)

    impls = ["official-style", "medst_fast"] + (["medst_fast+compile"] if os.environ.get("BENCH_COMPILE") == "1" else [])
    rows = []
    for impl in impls:
        set_backend("torch" if impl == "official-style" else old_backend)
        runner, model = make(impl)
        runner.module.train()

        def step():
            runner.forward_backward([batch])
            runner.optimizer_step(4e-5)

        t = bench(step, warmup=3, rep=20)
        sps = B / (t["ms"] / 1e3)
        gpu = torch.cuda.get_device_name() if CUDA else "cpu"
        peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
        mfu = round(GFLOP_PER_STUDY * 1e9 * sps / peak, 4) if (peak and MODEL == "medst_vit_b16") else ""
        rows.append({"op": "train_step", "impl": impl, "model": MODEL,
                     "shape": f"{SERIES} series, {B} studies, {base.cfg.vision.img_size}px, L{batch['input_ids'].shape[1]}",
                     **{k: round(v, 3) for k, v in t.items()}, "studies_per_s": round(sps, 2), "mfu": mfu,
                     "peak_gib": round(peak_gib(step), 3)})
        del runner, model
    set_backend(old_backend)
    base_ms = rows[0]["ms"]
    env = env_info()
    for r in rows:
        r["speedup"] = round(base_ms / r["ms"], 3)
        r.update(env)
        r["device_note"] = "" if CUDA else "cpu-tiny-not-a-performance-number"
    print()
    print_table(rows, COLS)
    append_rows(bench_csv, rows)
    assert all(r["studies_per_s"] > 0 for r in rows)
