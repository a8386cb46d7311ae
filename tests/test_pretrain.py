"""End-to-end trainer runs: --data, exports, faults (NaN, SIGTERM), AMP, flags. (The README command, the
synthetic quick start, is run by tests/test_train_quickstart.py.)"""
import json
import os
import signal

import pytest
import torch

import medst_fast
from medst_fast.pretrain import main
from medst_fast.train import step as step_mod
from medst_fast import weights as W

SMALL = ["--model-override", "vision.img_size=32", "--model-override", "text.max_length=32"]


def _argv(out, vocab, *extra):
    return ["--dataset-type", "random", "--random-series", "8", "--vocab", vocab, "--out", str(out), "--workers", "0",
            "--batch-series", "2", "--log-every", "1", *SMALL, *extra]


@pytest.fixture(scope="module")
def small_synthetic(tmp_path_factory):
    """An 8-patient synthetic set as the trainer builds it (index + vocab), in its own cache."""
    from medst_fast.train.data import ensure_synthetic

    return ensure_synthetic(str(tmp_path_factory.mktemp("cache")), 8)


@pytest.mark.parametrize("kind", ["index", "manifest"])
def test_data_flag(small_synthetic, tmp_path, kind):
    """--data with a prepared index folder or a generic manifest CSV (+ --vocab); the paper's recipe applies
    (the synthetic quick start's own defaults are for the run without --data)."""
    from medst_fast.data.index import SeriesIndex

    data, vocab = small_synthetic
    if kind == "manifest":
        idx = SeriesIndex.load(data)
        lines = ["patient_id,order,view,file,report"]
        for st in idx.studies:
            if st.split == "train":
                lines.append(f"{st.subject_id},{st.order},PA,{idx.path(st.frontal_path)},{st.text}")
        data = str(tmp_path / "manifest.csv")
        open(data, "w").write("\n".join(lines) + "\n")
    res = main(["--data", data, "--vocab", vocab, "--out", str(tmp_path / "r"), "--workers", "0",
                "--batch-series", "4", "--max-steps", "2", "--no-export", "--log-every", "1"])
    assert res.step == 2 and res.last_loss == res.last_loss
    args = json.loads((tmp_path / "r" / "args.json").read_text())
    assert (args["lr"], args["clip_grad"], args["model_override"], args["quick_start"]) == (4e-5, None, [], {})
    if kind == "manifest":
        assert (tmp_path / "r" / "manifest_index" / "meta.json").is_file()


def test_reuses_synthetic_cache(tmp_path, monkeypatch):
    from medst_fast.train import data

    calls = []
    monkeypatch.setattr(data, "synthetic_root", lambda c, p, s: str(tmp_path / "syn"))
    os.makedirs(tmp_path / "syn" / "index")
    (tmp_path / "syn" / "COMPLETE").write_text("ok\n")
    import medst_fast.data.synth as synth

    monkeypatch.setattr(synth, "generate", lambda *a, **k: calls.append(1))
    idx, vocab = data.ensure_synthetic(str(tmp_path), 40)
    assert calls == [] and idx == str(tmp_path / "syn" / "index") and vocab == str(tmp_path / "syn" / "vocab.txt")


def _inject(monkeypatch, on_call):
    """Wrap PretrainModule.forward: on_call(n) may return a factor for the loss (e.g. nan) or act (signal)."""
    orig = step_mod.PretrainModule.forward
    count = {"n": 0}

    def fwd(self, batch):
        count["n"] += 1
        total, parts = orig(self, batch)
        f = on_call(count["n"])
        return (total * f, parts) if f is not None else (total, parts)

    monkeypatch.setattr(step_mod.PretrainModule, "forward", fwd)




@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_checkpoint_and_exits(tmp_path, vocab_path, monkeypatch, sig):
    before = signal.getsignal(sig)
    _inject(monkeypatch, lambda n: os.kill(os.getpid(), sig) if n == 2 else None)
    res = main(_argv(tmp_path / "r", vocab_path, "--max-steps", "6", "--save-every", "100"))
    assert res.interrupted == int(sig) and res.step == 2 and res.export_dir is None
    assert res.last_checkpoint == W.ckpt_path(str(tmp_path / "r"), 2) and os.path.isfile(res.last_checkpoint)
    assert signal.getsignal(sig) == before  # handlers restored
    res = main(_argv(tmp_path / "r", vocab_path, "--max-steps", "6", "--resume", "auto", "--no-export"))
    assert res.step == 6 and res.interrupted is None


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_on_cpu(tmp_path, vocab_path, amp):
    # fp16: GradScaler starts at 2**16 and halves its scale on each overflow; here the first 9 steps overflow
    steps = "12" if amp == "fp16" else "2"
    res = main(_argv(tmp_path / "r", vocab_path, "--max-steps", steps, "--amp", amp, "--no-export"))
    st = W.load_checkpoint(res.last_checkpoint)
    assert res.bad_steps == 0 and res.last_loss == res.last_loss
    assert bool(st["scaler"]) == (amp == "fp16")  # GradScaler only for fp16
    assert all(v.dtype != torch.bfloat16 for v in st["model"].values())  # master weights stay fp32


def test_fp16_run_that_never_got_past_the_loss_scale_names_it(tmp_path, vocab_path):
    """Two fp16 steps, both GradScaler overflows: no update, so no trained model; the error says why."""
    from medst_fast.train.faults import NoUpdates

    with pytest.raises(NoUpdates, match=r"none of the run's 2 steps made an update.*2 fp16 gradient overflow"):
        main(_argv(tmp_path / "r", vocab_path, "--max-steps", "2", "--amp", "fp16", "--no-export"))


def test_grad_checkpointing_same_result(tmp_path, vocab_path):
    a = main(_argv(tmp_path / "a", vocab_path, "--max-steps", "2", "--no-export"))
    b = main(_argv(tmp_path / "b", vocab_path, "--max-steps", "2", "--no-export", "--grad-checkpointing"))
    wa, wb = W.load_checkpoint(a.last_checkpoint)["model"], W.load_checkpoint(b.last_checkpoint)["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)


def test_init_from_export_and_lr_zero_keeps_weights(tmp_path, vocab_path, tiny_run):
    export = os.path.join(tiny_run, "final")  # the session's finished run (same model sizes); only read here
    init = os.path.join(export, "model.safetensors")
    b = main(_argv(tmp_path / "b", vocab_path, "--max-steps", "1", "--init", init, "--lr", "0", "--min-lr", "0",
                   "--seed", "7", "--no-export"))
    wa = medst_fast.from_pretrained(export).state_dict()
    wb = W.load_checkpoint(b.last_checkpoint)["model"]
    for k, v in wa.items():
        if "running_" in k or "num_batches" in k:
            continue  # BatchNorm statistics do move in a training step
        assert torch.equal(v, wb[k]), k


def test_missing_vocab_with_data_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDST_FAST_VOCAB", raising=False)
    os.makedirs(tmp_path / "idx")
    with pytest.raises(SystemExit, match="--vocab is required"):
        main(["--data", str(tmp_path / "idx"), "--out", str(tmp_path / "r")])
