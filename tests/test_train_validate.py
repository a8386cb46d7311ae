"""A trainer that reports: validation loss and image-to-report R@1/R@5 (checked against a plain recomputation),
best/ by validation loss, elapsed/ETA, progress without a terminal, the training-curve PNG and
``python -m medst_fast.plot``, ``--report-to`` back-ends and the extras they need."""
import csv
import json
import os
import re
import subprocess
import sys
import types

import pytest
import torch

import medst_fast
from medst_fast.pretrain import main
from medst_fast.train import run_dir as R
from medst_fast.train import step as step_mod
from medst_fast import weights as W
from medst_fast.train.args import parse_args
from medst_fast.train.validate import above_chance_p, describe, recall_at_k

from conftest import move_to_valid

SMALL = ["--model-override", "vision.img_size=32", "--model-override", "text.max_length=32"]
_FORWARD = step_mod.PretrainModule.forward


@pytest.fixture(scope="module")
def val_index(tmp_path_factory, copy_index):
    """The session's tiny synthetic MIMIC-CXR index, copied; its last 3 training series become the 'valid' split."""
    from medst_fast.data.index import SeriesIndex

    path = copy_index(tmp_path_factory.mktemp("val") / "copy")
    idx = SeriesIndex.load(path)
    move_to_valid(idx, 3)
    idx.save(path)
    return path


def _argv(out, data, vocab, *extra):
    return ["--data", data, "--vocab", vocab, "--out", str(out), "--workers", "0", "--batch-series", "2",
            "--log-every", "1", "--progress", "off", "--seed", "3", *SMALL, *extra]


def _metrics(out):
    with open(os.path.join(str(out), "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


# -- retrieval metric -------------------------------------------------------------------------------------------
def test_recall_at_k_counts_the_reports_ranked_above_the_own_one():
    # img = I, so the similarity of study i to report j is sim[i, j] below (txt = sim.T). Study 0: its own
    # report first; 1: two other reports above its own; 2: its own report ties with an identical one, which
    # must not push it down; 3: its own report (0.8) above the only other candidate (0.6)
    sim = torch.tensor([[1.0, 0, 0, 0.6], [0.5, 0.1, 0.5, 0], [0, 0.9, 0.9, 0], [0.6, 0, 0, 0.8]])
    img, txt = torch.eye(4), sim.T.contiguous()
    r = recall_at_k(img, txt, (1, 2, 3))
    assert r == {1: 0.75, 2: 0.75, 3: 1.0}
    shuffled = recall_at_k(img[[2, 0, 3, 1]], txt[[2, 0, 3, 1]], (1, 2, 3))
    assert shuffled == r  # a property of the pairs, not of their order
    nan = txt.clone()
    nan[1, 0] = float("nan")
    assert all(v != v for v in recall_at_k(img, nan, (1, 5)).values())  # NaN, never a silent hit
    with pytest.raises(ValueError, match="two \\(N, E\\) tensors of one shape"):
        recall_at_k(img, txt[:3])


def test_above_chance_p_is_the_binomial_tail_of_random_ranking():
    # against torch's own Binomial (log-pmf summed over the tail), not the formula restated
    for n, k, hits in ((28, 5, 10), (28, 1, 2), (9, 1, 1), (100, 5, 5), (9, 5, 9)):
        b = torch.distributions.Binomial(n, probs=torch.tensor(k / n, dtype=torch.float64))
        tail = b.log_prob(torch.arange(hits, n + 1, dtype=torch.float64)).exp().sum().item()
        assert abs(above_chance_p(hits / n, n, k) - tail) < 1e-12, (n, k, hits)
    assert above_chance_p(0.0, 28, 1) == 1.0  # no hit: the whole distribution
    assert above_chance_p(1.0, 4, 5) == 1.0 and above_chance_p(1.0, 5, 5) == 1.0  # k >= n: every ranking hits
    # a chance-level result on few studies is called so; a clear one names the recall that passed
    v = dict(val_loss=1.0, batches=1, skipped=0)
    assert "not distinguishable from chance" in describe(dict(v, studies=9, val_r1=1 / 9, val_r5=5 / 9))
    line = describe(dict(v, studies=28, val_r1=1 / 28, val_r5=10 / 28))
    assert "above chance: R@5)" in line and "binomial p 0.64 / 0.019" in line


# -- validation in the trainer -----------------------------------------------------------------------------------
def _plain_validation(run, data, vocab):
    """The validation numbers recomputed the obvious way from the final export: PIL dataset, centre crops,
    index order, batches of 2 series, the training loss per batch, ranks of the own report by sorting."""
    from medst_fast.data.dataset import SeriesDataset, collate_series
    from medst_fast.losses import MedSTLoss

    from medst_fast.text.tokenizer import MedSTTokenizer

    model = medst_fast.from_pretrained(os.path.join(run, "final")).eval()
    tok = MedSTTokenizer(vocab, max_length=model.cfg.text.max_length)
    ds = SeriesDataset(data, "valid", tok, img_size=32, train=False)
    loss_fn = MedSTLoss(model.cfg.loss, model.cfg.faithful)
    losses, img, txt = [], [], []
    with torch.no_grad():
        for b in range(len(ds) // 2):
            batch = collate_series([ds[2 * b], ds[2 * b + 1]])
            out = model(batch)
            losses.append(float(loss_fn(out, model).total))
            img.append(out.img_global)
            txt.append(out.txt_global)
    img, txt = torch.cat(img), torch.cat(txt)
    sim = img @ txt.T
    ranks = [int((torch.argsort(sim[i], descending=True) == i).nonzero()) for i in range(len(sim))]
    n = len(ranks)
    return sum(losses) / len(losses), sum(r < 1 for r in ranks) / n, sum(r < 5 for r in ranks) / n, n


def test_validation_is_logged_recorded_and_exported_as_best(tmp_path, val_index, vocab_path):
    out = tmp_path / "r"
    res = main(_argv(out, val_index, vocab_path, "--max-steps", "4", "--eval-every", "2", "--save-every", "2",
                     "--keep", "5"))
    rows = _metrics(out)
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]
    for r in rows:  # the validation columns on the rows of the steps that validated, empty elsewhere
        assert (r["val_loss"] != "") == (r["step"] in ("2", "4")) and (r["val_r1"] != "") == (r["val_loss"] != "")
    loss, r1, r5, n = _plain_validation(str(out), val_index, vocab_path)  # the last validation saw the final weights
    last = rows[-1]
    assert float(last["val_loss"]) == pytest.approx(loss, rel=1e-5)
    assert (float(last["val_r1"]), float(last["val_r5"])) == pytest.approx((r1, r5))
    assert res.val["val_loss"] == pytest.approx(loss, rel=1e-5) and res.val["studies"] == n >= 2
    # best/: the export of the step with the lowest validation loss, with the vocab, like final/
    vals = {int(r["step"]): float(r["val_loss"]) for r in rows if r["val_loss"]}
    best_step = min(vals, key=vals.get)
    info = json.loads((out / "best" / "best.json").read_text())
    assert info["step"] == best_step and info["val_loss"] == pytest.approx(vals[best_step])
    assert res.best_dir == str(out / "best") and (out / "best" / "vocab.txt").read_bytes() == (out / "final" / "vocab.txt").read_bytes()
    best = medst_fast.from_pretrained(str(out / "best")).state_dict()
    saved = W.load_checkpoint(W.ckpt_path(str(out), best_step))
    assert saved["best_val_loss"] == pytest.approx(vals[best_step])
    for k, v in best.items():
        assert torch.equal(v, saved["model"][k]), k
    text = (out / "train.log").read_text()
    assert "validation at step 2: loss" in text and "image-to-report R@1" in text and "(chance" in text
    assert re.search(r"step 4/4 .* elapsed \d+:\d\d:\d\d ETA 0:00:00", text)
    assert float(last["eta_s"]) == 0 and float(rows[0]["eta_s"]) > 0
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(R.RunFolderError, match="already holds a run"):  # best/ belongs to the run
        main(_argv(out, val_index, vocab_path, "--max-steps", "1"))


def test_validation_default_is_once_per_epoch_and_zero_means_the_end(tmp_path, val_index, vocab_path):
    main(_argv(tmp_path / "a", val_index, vocab_path, "--epochs", "2", "--log-every", "10"))  # 5 steps per epoch
    assert [r["step"] for r in _metrics(tmp_path / "a") if r["val_loss"]] == ["5", "10"]
    res = main(_argv(tmp_path / "b", val_index, vocab_path, "--max-steps", "3", "--eval-every", "0", "--no-export"))
    assert [r["step"] for r in _metrics(tmp_path / "b") if r["val_loss"]] == ["3"]
    assert res.val is not None and res.best_dir is None and not (tmp_path / "b" / "best").exists()  # --no-export
    text = (tmp_path / "b" / "train.log").read_text()
    assert "validation: 2 of the 3 series of the 'valid' split (2 per batch and rank, centre crops), at the end" in text
    assert text.count("loader: ") == 1  # the validation loader does not repeat the line


def test_random_data_has_no_validation_and_says_so(tmp_path, vocab_path):
    argv = ["--dataset-type", "random", "--random-series", "4", "--vocab", vocab_path, "--out", str(tmp_path / "r"),
            "--workers", "0", "--batch-series", "2", "--max-steps", "1", "--no-export", *SMALL]
    res = main(argv)
    assert res.val is None and res.best_dir is None
    assert "validation: off (--dataset-type random has no 'valid' split)" in (tmp_path / "r" / "train.log").read_text()
    assert _metrics(tmp_path / "r")[0]["val_loss"] == ""


def test_two_ranks_validate_together(tmp_path, val_index, vocab_path):
    """torchrun, 2 ranks: each validates its share, the numbers cover both shares, one best/ export."""
    from medst_fast.data.index import SeriesIndex

    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "medst_fast.pretrain", *_argv(out, val_index, vocab_path, "--batch-series", "1", "--max-steps", "2",
                                         "--eval-every", "1")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = _metrics(out)
    assert [r["step"] for r in rows if r["val_loss"]] == ["1", "2"]
    idx = SeriesIndex.load(val_index)
    n = len(idx.series["valid"][0]) + len(idx.series["valid"][1])  # series 0 on rank 0, series 1 on rank 1
    assert f"over {n} studies in 2 batch(es)" in (out / "train.log").read_text()
    assert json.loads((out / "best" / "best.json").read_text())["studies"] == n


# -- progress, plot, report back-ends -------------------------------------------------------------------------
def _random_argv(out, vocab, *extra):
    return ["--dataset-type", "random", "--random-series", "8", "--vocab", vocab, "--out", str(out), "--workers", "0",
            "--batch-series", "2", "--no-export", *SMALL, *extra]


def test_progress_without_a_terminal_is_a_log_line_at_a_set_rate(tmp_path, vocab_path):
    main(_random_argv(tmp_path / "a", vocab_path, "--max-steps", "3", "--log-every", "100", "--progress-interval", "0"))
    text = (tmp_path / "a" / "train.log").read_text()
    assert len(re.findall(r"progress: step [123]/3 \(\d+%\) ep 1/8 last batch: loss .* temporal .* elapsed \d+:\d\d:\d\d ETA", text)) == 3
    main(_random_argv(tmp_path / "b", vocab_path, "--max-steps", "3", "--log-every", "100"))  # 30 s by default
    assert "progress:" not in (tmp_path / "b" / "train.log").read_text()


def test_progress_bar_on_keeps_log_lines_in_the_log_file(tmp_path, vocab_path, capsys):
    main(_random_argv(tmp_path / "r", vocab_path, "--max-steps", "2", "--log-every", "1", "--progress", "on"))
    err = capsys.readouterr().err
    assert "pretrain:" in err  # tqdm's bar (desc "pretrain")
    text = (tmp_path / "r" / "train.log").read_text()
    assert "step 1/2 epoch 1/8" in text and "step 2/2 epoch 1/8" in text  # not only on the console


def _metrics_file(d):
    os.makedirs(d, exist_ok=True)
    cols = ["step", "epoch", "loss", "ita", "local", "temporal", "lr", "input_ms", "compute_ms", "studies_per_s",
            "val_loss", "val_r1", "val_r5"]
    lines = [",".join(cols)]
    for s in range(1, 7):
        val = f"{3.0 - s * 0.1},{0.1 * s},{0.2 * s}" if s % 3 == 0 else ",,"
        lines.append(f"{s},1,{5 - s * 0.5},{2.0},{1.0},{2 - s * 0.2},{1e-5 * s},{3},{40},{10},{val}")
    (d / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_plot_cli_writes_a_png(tmp_path):
    _metrics_file(tmp_path / "run")
    r = subprocess.run([sys.executable, "-m", "medst_fast.plot", str(tmp_path / "run")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    png = tmp_path / "run" / "training_curves.png"
    assert r.stdout.strip() == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = subprocess.run([sys.executable, "-m", "medst_fast.plot", str(tmp_path / "nothing")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and "nothing/metrics.csv: no metrics.csv" in r.stderr


def test_plot_without_matplotlib_names_the_extra(tmp_path):
    _metrics_file(tmp_path / "run")
    code = ("import sys; sys.modules['matplotlib'] = None; from medst_fast.plot import main; "
            f"sys.exit(main([{str(tmp_path / 'run')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["medst_fast.plot: error: plotting needs matplotlib, the optional extra "
                                             "[plot]: pip install medst_fast[plot]"]


def test_trainer_without_matplotlib_says_so_and_finishes(tmp_path, vocab_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)
    res = main(_random_argv(tmp_path / "r", vocab_path, "--max-steps", "1"))
    assert res.step == 1 and not (tmp_path / "r" / "training_curves.png").exists()
    assert "no training_curves.png: plotting needs matplotlib" in (tmp_path / "r" / "train.log").read_text()


@pytest.mark.parametrize("backend,module", [("wandb", "wandb"), ("tensorboard", "torch.utils.tensorboard")])
def test_report_to_a_missing_extra_is_a_clear_error(tmp_path, vocab_path, monkeypatch, backend, module):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(SystemExit, match=re.escape(f"--report-to {backend} needs the '{backend}' package") +
                       ".*" + re.escape(f"pip install medst_fast[{backend}]")):
        main(_random_argv(tmp_path / "r", vocab_path, "--max-steps", "1", "--report-to", f"csv,{backend}"))
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_report_to_unknown_backend_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--report-to", "csv,mlflow"])
    assert "unknown backend(s) ['mlflow']; supported: csv, tensorboard, wandb" in capsys.readouterr().err


def test_report_to_wandb_logs_every_row_and_resumes_the_same_run(tmp_path, vocab_path, monkeypatch):
    calls = []

    class Run:
        def log(self, data, step):
            calls.append(("log", step, dict(data)))

        def finish(self):
            calls.append(("finish",))

    def init(**kw):
        calls.append(("init", kw))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    out = tmp_path / "r"
    main(_random_argv(out, vocab_path, "--max-steps", "2", "--log-every", "1", "--report-to", "wandb"))
    init_kw = calls[0][1]
    assert init_kw["id"] == (out / "wandb-id.txt").read_text().strip() and init_kw["resume"] == "allow"
    assert init_kw["config"]["lr"] == 4e-5 and init_kw["dir"] == str(out)
    logs = [c for c in calls if c[0] == "log"]
    assert [c[1] for c in logs] == [1, 2] and "train/loss" in logs[0][2] and calls[-1] == ("finish",)
    calls.clear()
    main(_random_argv(out, vocab_path, "--max-steps", "3", "--report-to", "wandb", "--resume", "auto",
                      "--allow-changed-args"))
    assert calls[0][1]["id"] == init_kw["id"] and [c[1] for c in calls if c[0] == "log"] == [3]


# -- collapsed embeddings are called out ---------------------------------------------------------------------
def test_the_collapse_warning():
    # the cosine itself: tests/test_similarity.py
    from medst_fast.train.validate import collapse_warning

    assert collapse_warning(0.2, 0.5, (40, 0.9 ** 40)) is None
    w = collapse_warning(0.97, 0.5, (40, 0.9 ** 40))
    assert "image 0.970" in w and "report" not in w.split("cosine:")[1].split(")")[0] and "1.5%" in w
    assert "40 updates" in w and "BatchNorm" not in collapse_warning(0.2, 0.99, (5000, 0.9 ** 5000))


def test_collapsed_validation_embeddings_are_warned_about(tmp_path, val_index, vocab_path, caplog):
    """Two steps from scratch: the heads' BatchNorm statistics are mostly their start, the eval embeddings alike."""
    res = main(_argv(tmp_path / "r", val_index, vocab_path, "--max-steps", "2", "--eval-every", "0"))
    v = res.val
    assert 0.9 < max(v["img_cos"], v["txt_cos"]) <= 1.0 + 1e-9
    assert any("validation embeddings are nearly identical" in r.getMessage() and "2 updates" in r.getMessage()
               and "81.0%" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_recall_panel_draws_the_chance_levels(tmp_path, monkeypatch):
    """The curves' recall panel carries dashed chance lines at 1/n and 5/n, n read from the run's train.log."""
    pytest.importorskip("matplotlib")
    from medst_fast import plot

    (tmp_path / "metrics.csv").write_text("step,loss,val_r1,val_r5\n10,3.0,,\n20,2.5,0.1,0.4\n")
    (tmp_path / "train.log").write_text(
        "2026-01-01 00:00:00 INFO validation at step 20: loss 2.0, image-to-report R@1 0.100 R@5 0.400 (chance "
        "0.036 / 0.179, ...) over 28 studies in 1 batch(es)\n")
    assert plot.validation_studies(str(tmp_path)) == 28
    drawn, orig = [], plot._chance_lines
    monkeypatch.setattr(plot, "_chance_lines", lambda ax, n: (drawn.append(n), orig(ax, n)))
    plot.plot_run(str(tmp_path))
    assert drawn == [28] and (tmp_path / "training_curves.png").stat().st_size > 0
    assert plot.validation_studies(str(tmp_path / "missing")) is None  # no log: the panel has no chance lines


def test_the_collapse_warning_is_said_once_a_run(caplog):
    """The long warning once; later collapsed validations get a one-line note, not the paragraph again."""
    import logging

    from medst_fast.train.validate import Validator

    v = Validator(loader=None, n_series=0, batch_series=1)
    with caplog.at_level(logging.INFO, logger="medst_fast"):
        for _ in range(3):
            v._say_collapse("validation embeddings are nearly identical (long text)", 0.99, 0.98)
        v._say_collapse(None, 0.2, 0.3)
    msgs = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [lv for lv, _ in msgs] == ["WARNING", "INFO", "INFO"]
    assert "long text" in msgs[0][1] and "still nearly identical" in msgs[1][1] and "0.990" in msgs[1][1]


def test_the_validation_line_reader_reads_what_the_trainer_writes():
    """plot.validations (used by the curves and scripts/quickstart_defaults.py) parses describe()'s line."""
    from medst_fast import plot

    v = {"val_loss": 2.5, "val_r1": 0.125, "val_r5": 0.375, "studies": 24, "batches": 3, "skipped": 1}
    line = f"2026-01-01 00:00:00 INFO validation at step 40: {describe(v)} (1.2 s); best so far"
    assert plot.validations(line + "\n" + line.replace("step 40", "step 80")) == [(40, 0.125, 0.375, 24),
                                                                                  (80, 0.125, 0.375, 24)]
    nan = dict(v, val_loss=float("nan"))  # a NOT FINITE line has no numbers to plot
    assert plot.validations(f"INFO validation at step 9: {describe(nan)}") == []
