"""2-process DDP (gloo, CPU) against one process: the same loss and the same gradients.

BatchNorm in the projection heads normalises with the statistics of the batch it sees, so a rank's
sub-batch is not normalised as it would be inside one big batch. Two comparisons therefore hold exactly:

* train mode (batch statistics): DDP == one process that runs each rank's sub-batch through the model
  separately (per-rank BatchNorm, like DDP without SyncBatchNorm) and averages the per-rank losses; with
  --gather-with-grad each sub-batch's global embeddings are contrasted against the concatenation of all.
* eval mode (running statistics, no dropout) and equal sub-batches of complete series: DDP with
  --gather-with-grad == one process on the concatenated batch, literally.

Both run through the trainer's own pieces: PretrainModule, StepRunner (incl. no_sync accumulation),
make_gather/gather_with_grad and DDP.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import medst_fast
from medst_fast.losses import MedSTLoss
from medst_fast.text.tokenizer import MedSTTokenizer
from medst_fast.train.data import RandomSeriesDataset, collate_pretokenized
from medst_fast.train.step import PretrainModule, StepRunner, freeze_unused, wrap_module

WORLD = 2
IMG = 32  # small images: 4 patches per view, enough for every code path


def _model(vocab_size):
    torch.manual_seed(0)
    m = medst_fast.create_model("medst_tiny", vision={"img_size": IMG},
                                text={"vocab_size": vocab_size, "hidden_dropout": 0.0, "attn_dropout": 0.0})
    freeze_unused(m)
    return m


def _sub_batches(tok, case):
    """Per-rank micro-batches. 'mixed': series of different lengths (ranks hold different row counts)."""
    ds = RandomSeriesDataset(40, tok, IMG, seed=3)
    if case == "full":
        full = [i for i in range(40) if ds[i]["frontal"].shape[0] == 4][:4]
        return [[collate_pretokenized([ds[full[2 * r]], ds[full[2 * r + 1]]])] for r in range(WORLD)]
    # rank 0: 3 series, rank 1: 2 series, two micro-batches each (accumulation with no_sync)
    return [[collate_pretokenized([ds[i] for i in range(0, 3)]), collate_pretokenized([ds[i] for i in range(3, 6)])],
            [collate_pretokenized([ds[i] for i in range(6, 8)]), collate_pretokenized([ds[i] for i in range(8, 10)])]]


CASES = [("train", "mixed", False), ("train", "mixed", True), ("eval", "full", True)]
# --compile under DDP, as the trainer wraps it (wrap_module: torch.compile over DDP); aot_eager (behind a counting
# backend) keeps the compile short on the CPU while dynamo, incl. its DDPOptimizer, and AOT autograd trace what
# inductor would get.
COMPILED = ("train", "mixed", False)


def _worker(rank, vocab, init_file, out_dir):
    import torch.distributed as dist

    from medst_fast.train.distributed import make_gather

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    tok = MedSTTokenizer(vocab)
    for mode, case, gather in CASES:
        model = _model(tok.vocab_size)
        mod = torch.nn.parallel.DistributedDataParallel(
            PretrainModule(model, MedSTLoss(model.cfg.loss, False, gather=make_gather(gather))))
        mod.train(mode == "train")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        runner = StepRunner(mod, opt, torch.device("cpu"), "none", accum_steps=2)
        stats = runner.forward_backward(_sub_batches(tok, case)[rank])
        dist.all_reduce(stats.loss)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        torch.save({"loss": stats.loss[0] / WORLD, "grads": grads}, os.path.join(out_dir, f"{mode}-{case}-{gather}-{rank}.pt"))
    mode, case, gather = COMPILED
    model = _model(tok.vocab_size)
    graphs = []

    def counting(gm, example_inputs):  # every graph dynamo hands to the backend
        from torch._dynamo.backends.registry import lookup_backend

        graphs.append(len(gm.graph.nodes))
        return lookup_backend("aot_eager")(gm, example_inputs)

    mod = wrap_module(PretrainModule(model, MedSTLoss(model.cfg.loss, False)), True, True, torch.device("cpu"),
                      backend=counting)
    assert isinstance(mod._orig_mod, torch.nn.parallel.DistributedDataParallel), type(mod)
    mod.train(True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    runner = StepRunner(mod, opt, torch.device("cpu"), "none", accum_steps=2)
    stats = runner.forward_backward(_sub_batches(tok, case)[rank])
    dist.all_reduce(stats.loss)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.save({"loss": stats.loss[0] / WORLD, "grads": grads, "graphs": graphs},
               os.path.join(out_dir, f"compiled-{rank}.pt"))
    dist.destroy_process_group()


def _reference(vocab, mode, case, gather):
    # One thread, as in the workers: multithreaded CPU reductions round differently, and at random init the
    # temporal loss's 1/variance term amplifies such rounding to ~1e-4 relative in the gradients.
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _reference_1t(vocab, mode, case, gather)
    finally:
        torch.set_num_threads(n_threads)


def _reference_1t(vocab, mode, case, gather):
    tok = MedSTTokenizer(vocab)
    model = _model(tok.vocab_size)
    model.train(mode == "train")
    subs = _sub_batches(tok, case)
    n_micro = len(subs[0])
    total = 0.0
    if mode == "eval":
        # one process, one batch: the ranks' rows concatenated (all complete series, so the layout holds)
        cat = {k: torch.cat([s[0][k] for s in subs]) for k in ("frontal", "lateral", "has_lateral", "input_ids",
                                                               "attention_mask", "word_slots")}
        cat["n_full_series"] = sum(s[0]["n_full_series"] for s in subs)
        loss = MedSTLoss(model.cfg.loss, False)(model(cat), model).total
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for j in range(n_micro):
        outs = [model(subs[r][j]) for r in range(WORLD)]  # per-rank BatchNorm statistics
        img_all = torch.cat([o.img_global for o in outs])
        txt_all = torch.cat([o.txt_global for o in outs])
        offs = [sum(o.img_global.shape[0] for o in outs[:r]) for r in range(WORLD)]
        losses = []
        for r, o in enumerate(outs):
            g = None
            if gather:
                g = lambda x, r=r, o=o: (img_all if x is o.img_global else txt_all, offs[r])  # noqa: E731
            losses.append(MedSTLoss(model.cfg.loss, False, gather=g)(o, model).total)
        step_loss = torch.stack(losses).mean() / n_micro
        step_loss.backward()
        total = total + step_loss.detach()
    return total, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def ddp_results(vocab_path, tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(vocab_path, str(d / "init"), str(d)), nprocs=WORLD, join=True)
    return d


@pytest.mark.parametrize("mode,case,gather", CASES)
def test_ddp_matches_single_process(ddp_results, vocab_path, mode, case, gather):
    ranks = [torch.load(ddp_results / f"{mode}-{case}-{gather}-{r}.pt", weights_only=True) for r in range(WORLD)]
    ref_loss, ref_grads = _reference(vocab_path, mode, case, gather)
    torch.testing.assert_close(ranks[0]["loss"].float(), ref_loss.float(), rtol=1e-5, atol=1e-6)
    assert set(ranks[0]["grads"]) == set(ref_grads)
    for n, g in ref_grads.items():
        scale = g.abs().max().item() + 1e-12
        for r in range(WORLD):  # DDP leaves identical averaged gradients on every rank
            torch.testing.assert_close(ranks[r]["grads"][n], g, rtol=1e-4, atol=1e-6 + 1e-5 * scale, msg=f"{n} rank {r}")


def test_compiled_ddp_matches_single_process(ddp_results, vocab_path):
    """torch.compile(DDP(module)) with no_sync accumulation: the same loss and averaged gradients."""
    ranks = [torch.load(ddp_results / f"compiled-{r}.pt", weights_only=True) for r in range(WORLD)]
    assert ranks[0]["graphs"] and max(ranks[0]["graphs"]) > 100, ranks[0]["graphs"]  # the model was compiled
    ref_loss, ref_grads = _reference(vocab_path, *COMPILED)
    torch.testing.assert_close(ranks[0]["loss"].float(), ref_loss.float(), rtol=1e-5, atol=1e-6)
    assert set(ranks[0]["grads"]) == set(ref_grads)
    for n, g in ref_grads.items():
        scale = g.abs().max().item() + 1e-12
        for r in range(WORLD):
            torch.testing.assert_close(ranks[r]["grads"][n], g, rtol=1e-4, atol=1e-6 + 1e-5 * scale, msg=f"{n} rank {r}")


def test_compile_with_gather_with_grad_is_refused(tmp_path, vocab_path):
    """The gather needs a host sync inside the compiled step: one clear line before anything is built."""
    from medst_fast.train.args import parse_args
    from medst_fast.train.build import build_run

    argv = ["--dataset-type", "random", "--vocab", vocab_path, "--out", str(tmp_path / "r"), "--workers", "0",
            "--device", "cpu", "--compile", "--gather-with-grad"]
    with pytest.raises(SystemExit, match="--compile cannot be combined with --gather-with-grad"):
        build_run(parse_args(argv))
    assert not (tmp_path / "r").exists()


def test_gather_changes_gradients(ddp_results):
    """The two modes differ, so the comparison above can tell them apart."""
    a = torch.load(ddp_results / "train-mixed-False-0.pt", weights_only=True)
    b = torch.load(ddp_results / "train-mixed-True-0.pt", weights_only=True)
    assert not torch.allclose(a["loss"], b["loss"])
    assert not torch.allclose(a["grads"]["visual_global_head.head.0.weight"], b["grads"]["visual_global_head.head.0.weight"])


def test_torchrun_trainer_two_ranks(tmp_path, vocab_path):
    """The CLI under torchrun: whole series per rank, rank 0 writes, per-rank RNG states in the checkpoint."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "medst_fast.pretrain",
           "--dataset-type", "random", "--vocab", vocab_path, "--out", str(out), "--max-steps", "2", "--batch-series", "2",
           "--workers", "0", "--gather-with-grad", "--log-every", "1", "--no-export"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    from medst_fast.weights import list_checkpoints, load_checkpoint

    ck = list_checkpoints(str(out))
    assert [os.path.basename(p) for p in ck] == ["ckpt-00000002.pt"]
    st = load_checkpoint(ck[-1])
    assert st["args"]["world_size"] == 2 and len(st["rng"]) == 2
    assert not torch.equal(st["rng"][0]["torch"], st["rng"][1]["torch"])  # dropout streams differ per rank
    assert (out / "metrics.csv").read_text().count("\n") == 3
