"""The quick start: ``python -m medst_fast.pretrain`` with all defaults (CPU, the built-in synthetic set,
medst_tiny) runs the whole pipeline and visibly learns (its final validation beats chance), its own defaults
apply only where they should, and a core install (no [train] extra) gets one line naming the extra."""
import json
import os
import subprocess
import sys

import pytest
import torch

import medst_fast
from medst_fast.plot import validations
from medst_fast import weights as W
from medst_fast.train import quickstart as qs
from medst_fast.train.data import SYNTHETIC_VERSION
from medst_fast.train.validate import above_chance_p

# Run in a child: blocking a module in this process would leak into other tests' imports.
_BLOCKED = """
import sys
sys.modules[{module!r}] = None  # what a missing package looks like to `import`
sys.argv = ["python -m medst_fast.pretrain", "--out", {out!r}]
from medst_fast.pretrain import _cli
sys.exit(_cli())
"""


def test_missing_train_extra_is_one_line_naming_it(tmp_path):
    """`python -m medst_fast.pretrain` without Pillow: exit code 1 and one line, in a fresh interpreter."""
    code = _BLOCKED.format(module="PIL", out=str(tmp_path / "run"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert lines == ["medst_fast.pretrain: error: python -m medst_fast.pretrain needs pillow, not installed: "
                     "pip install 'medst_fast[train]'"], r.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # refused before a run folder or any data was made


@pytest.mark.parametrize("module", ["pandas", "tqdm"])
def test_main_and_cli_check_the_extra_first(monkeypatch, capsys, tmp_path, module):
    """The library entry point raises the ImportError (before parsing, so even --help); _cli prints it."""
    from medst_fast import pretrain

    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=rf"needs {module}, not installed: pip install 'medst_fast\[train\]'"):
        pretrain.main(["--help"])
    monkeypatch.setattr(sys, "argv", ["medst_fast.pretrain", "--out", str(tmp_path / "run")])
    assert pretrain._cli() == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(f"needs {module}, not installed: pip install 'medst_fast[train]'")
    assert not (tmp_path / "run").exists()


# -- the synthetic quick start's own defaults (train/quickstart.py), resolved without training ---------------
def _resolved(argv, cuda=False):
    from medst_fast.train.args import parse_args, resolve

    return resolve(parse_args(argv), cuda_available=cuda)


def test_quick_start_defaults_apply_only_to_the_synthetic_cpu_tiny_run(tmp_path):
    """No --data on the CPU: the quick start's values, recorded; --data, a GPU or another model: the paper's."""
    a = _resolved([])
    assert {k: getattr(a, k) for k in qs.FLAGS} == qs.FLAGS and qs.FLAGS["lr"] != 4e-5
    assert (a.lr, a.clip_grad, a.synthetic_patients, a.epochs) == (1e-3, 1.0, 400, 8)
    assert a.model_override == ["text.hidden_dropout=0.0", "text.attn_dropout=0.0"]
    assert a.quick_start == {**qs.FLAGS, "model_override": a.model_override}
    assert not hasattr(a, "quick_start_settings")  # parse_args' bookkeeping does not reach args.json
    data = tmp_path / "idx"
    data.mkdir()
    paper = [_resolved(["--data", str(data)]), _resolved([], cuda=True), _resolved(["--model", "medst_vit_b16"]),
             _resolved(["--dataset-type", "random"])]
    for b in paper:
        assert (b.lr, b.clip_grad, b.epochs, b.model_override, b.quick_start) == (4e-5, None, 8, [], {})


def test_flags_the_user_gives_are_kept(tmp_path):
    """Command line and --config win, per flag; a user's dropout override (field or section) is not doubled."""
    a = _resolved(["--lr", "4e-5", "--model-override", "text.attn_dropout=0.1"])
    assert a.lr == 4e-5 and a.clip_grad == 1.0 and "lr" not in a.quick_start
    assert a.model_override == ["text.attn_dropout=0.1", "text.hidden_dropout=0.0"]
    a = _resolved(["--model-override", 'text={"hidden_dropout": 0.2}'])
    assert a.model_override == ['text={"hidden_dropout": 0.2}', "text.attn_dropout=0.0"]
    cfg = tmp_path / "c.json"
    cfg.write_text('{"epochs": 3, "clip-grad": 5, "model_override": []}')
    a = _resolved(["--config", str(cfg)])
    assert (a.epochs, a.clip_grad, a.model_override) == (3, 5.0, ["text.hidden_dropout=0.0", "text.attn_dropout=0.0"])
    assert set(a.quick_start) == {"synthetic_patients", "lr", "model_override"}
    cfg.write_text('{"clip_grad": null}')  # how --help says to turn the quick start's clipping off
    a = _resolved(["--config", str(cfg)])
    assert a.clip_grad is None and a.lr == qs.FLAGS["lr"] and "clip_grad" not in a.quick_start
    # a Namespace built in code (not parse_args) means every value as written
    from medst_fast.train.args import build_parser, resolve

    b = resolve(build_parser().parse_args([]), cuda_available=False)
    assert (b.lr, b.clip_grad, b.quick_start) == (4e-5, None, {})


def test_a_resumed_run_keeps_its_own_values(tmp_path):
    """On a resume the run's args.json wins over the quick start, even where it holds the paper's default (a
    flag given then as --lr 4e-5), and the run's record of what the quick start applied is carried on."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "args.json").write_text(json.dumps({
        "lr": 4e-5, "clip_grad": 1.0, "epochs": 16, "synthetic_patients": 200,
        "model_override": ["text.hidden_dropout=0.0", "text.attn_dropout=0.0"],
        "quick_start": {"clip_grad": 1.0, "epochs": 16}}))
    a = _resolved(["--resume", "auto", "--out", str(run)])
    assert (a.lr, a.clip_grad, a.epochs) == (4e-5, 1.0, 16)
    assert a.model_override == ["text.hidden_dropout=0.0", "text.attn_dropout=0.0"]
    assert a.quick_start == {"clip_grad": 1.0, "epochs": 16}


def test_a_resume_that_gives_model_override_again_keeps_the_quick_start_dropout(tmp_path):
    """--model-override given again on a resume replaces the run's list: the quick start's dropout overrides the
    run was made with are kept, or the resumed model would not match its checkpoint."""
    run = tmp_path / "run"
    run.mkdir()
    qs_over = ["text.hidden_dropout=0.0", "text.attn_dropout=0.0"]
    (run / "args.json").write_text(json.dumps({
        "lr": 1e-3, "clip_grad": 1.0, "model_override": ["vision.img_size=32"] + qs_over,
        "quick_start": {"clip_grad": 1.0, "lr": 1e-3, "model_override": qs_over}}))
    a = _resolved(["--resume", "auto", "--out", str(run), "--model-override", "vision.img_size=32"])
    assert a.model_override == ["vision.img_size=32"] + qs_over
    a = _resolved(["--resume", "auto", "--out", str(run), "--model-override", "text.attn_dropout=0.1"])
    assert a.model_override == ["text.attn_dropout=0.1", "text.hidden_dropout=0.0"]  # the user's field wins


def test_help_names_the_quick_start_defaults(capsys):
    from medst_fast.train.args import build_parser

    build_parser().print_help()
    out = " ".join(capsys.readouterr().out.split())  # argparse rewraps the text
    assert "Quick start: with no --data, on the CPU, with medst_tiny" in out
    assert "--lr 0.001" in out and "--clip-grad 1.0" in out and "text dropout 0" in out
    assert "paper's recipe, used with --data or on a GPU" in out


# -- the README command itself ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    """`python -m medst_fast.pretrain` with all defaults, in a fresh folder with an empty cache."""
    tmp_path = tmp_path_factory.mktemp("readme")
    # One thread: the run's floating-point reductions are then those of the measured seeds
    # (benchmarks/results/quickstart_defaults.md) whatever the core count, and on a shared 2-core machine two
    # intra-op threads competing with other jobs made a step 20x slower than one.
    env = dict(os.environ, MEDST_FAST_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    env.pop("MEDST_FAST_VOCAB", None)
    r = subprocess.run([sys.executable, "-m", "medst_fast.pretrain"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=3000)
    assert r.returncode == 0, r.stderr[-4000:]
    (run,) = list((tmp_path / "runs").iterdir())
    return tmp_path, run, r.stderr


def test_the_quick_start_beats_chance(readme_run):
    """Seeded: the default run's final validation R@5 is above chance at p < 0.05 (the trainer's one-sided
    binomial test), recomputed here from the logged numbers as well as read from the trainer's verdict."""
    _, run, err = readme_run
    vals = validations(err)
    args = json.loads((run / "args.json").read_text())
    step, r1, r5, n = vals[-1]
    assert step == max(v[0] for v in vals) and n >= 20, vals  # the end-of-run check, enough studies to test
    assert r5 > 5 / n and above_chance_p(r5, n, 5) < 0.05, (vals, args["quick_start"])
    assert "above chance: " in [ln for ln in err.splitlines() if f"validation at step {step}:" in ln][0]


def test_readme_main_command(readme_run):
    """Defaults on CPU: synthetic data, medst_tiny, the quick start's values (recorded and logged once),
    metrics, validation with chance levels every epoch, checkpoints and both exports."""
    tmp_path, run, err = readme_run
    args = json.loads((run / "args.json").read_text())
    assert (args["model"], args["amp"], args["device"], args["dataset_type"]) == ("medst_tiny", "none", "cpu", "synthetic")
    assert {k: args[k] for k in qs.FLAGS} == qs.FLAGS and args["quick_start"]["lr"] == qs.FLAGS["lr"]
    assert args["model_override"] == ["text.hidden_dropout=0.0", "text.attn_dropout=0.0"]
    assert sum("quick start (synthetic set, CPU, medst_tiny from scratch): using" in ln for ln in err.splitlines()) == 1
    rows = (run / "metrics.csv").read_text().strip().splitlines()
    assert rows[0].startswith("step,epoch,loss,ita,local,temporal,lr,studies_per_s")
    last = dict(zip(rows[0].split(","), rows[-1].split(",")))
    epochs = args["epochs"]
    assert int(last["epoch"]) == epochs and all(float(last[k]) == float(last[k]) for k in ("loss", "ita", "local", "temporal"))
    assert "studies/s" in err and "lr" in err and "ETA" in err and "waiting for data" in err
    # reassuring: the validation numbers (with chance levels) every epoch, the best model exported, the curves
    val = [dict(zip(rows[0].split(","), x.split(","))) for x in rows[1:]]
    val = [v for v in val if v["val_loss"]]
    assert [int(v["epoch"]) for v in val] == list(range(1, epochs + 1)) and all(float(v["val_loss"]) > 0 for v in val)
    v_lines = [ln for ln in err.splitlines() if "validation at step" in ln]
    assert len(v_lines) == epochs and all("binomial p" in ln and "chance" in ln.split("binomial p")[1] for ln in v_lines)
    # and the run ends by naming the command that evaluates it on the synthetic evaluation sets
    (nxt,) = [ln for ln in err.splitlines() if "python -m medst_fast.eval all --checkpoint " in ln]
    assert os.path.join(run.name, "final") in nxt
    assert (run / "best" / "vocab.txt").is_file() and (run / "training_curves.png").is_file()

    model = medst_fast.from_pretrained(str(run / "final")).eval()  # the full export, with its vocab
    assert model.cfg.text.hidden_dropout == 0.0 and model.cfg.text.attn_dropout == 0.0
    tok = medst_fast.get_tokenizer(str(run / "final" / "vocab.txt"))
    ckpt = W.load_checkpoint(W.list_checkpoints(str(run))[-1])
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["model"][k]), k
    with torch.no_grad():
        e = model.encode_text(**{k: v for k, v in tok(["no acute process"]).items() if k != "word_slots"})
    assert e.shape == (1, model.cfg.head.embed_dim)
    enc = medst_fast.from_pretrained(str(run / "final_encoder")).eval()  # image encoder only
    x = torch.zeros(2, 1, enc.cfg.vision.img_size, enc.cfg.vision.img_size)
    with torch.no_grad():
        torch.testing.assert_close(enc.encode_image(x), model.encode_image(x))
    (syn,) = [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("synthetic-")]
    assert (syn / "COMPLETE").is_file() and (syn / "vocab.txt").is_file()
    assert syn.name.startswith(f"synthetic-v{SYNTHETIC_VERSION}-p{qs.FLAGS['synthetic_patients']}-")


def test_help_shows_the_recipe_defaults():
    """`pretrain --help` names the paper's default of every recipe flag (not only of those that had a help text)."""
    from medst_fast.train.args import build_parser

    text = " ".join(build_parser().format_help().split())
    for flag, default in (("--lr LR", "4e-05"), ("--min-lr MIN_LR", "1e-08"), ("--epochs EPOCHS", "8"),
                          ("--wd WD", "0.05"), ("--beta1 BETA1", "0.9"), ("--beta2 BETA2", "0.999"),
                          ("--eps EPS", "1e-08"), ("--lambda-ita LAMBDA_ITA", "1.0"),
                          ("--lambda-local LAMBDA_LOCAL", "1.0"), ("--lambda-temporal LAMBDA_TEMPORAL", "1.0"),
                          ("--seed SEED", "42")):
        after = text.rsplit(flag, 1)[1].split(" --", 1)[0]  # the options list, after the usage line
        assert f"(default: {default})" in after, (flag, after)
