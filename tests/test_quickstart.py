"""The quick start's reassurances: a core install (no [train] extra) gets one line naming the extra."""
import json
import subprocess
import sys

import pytest

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
    from medst_fast.train import quickstart as qs

    a = _resolved([])
    assert (a.lr, a.clip_grad, a.epochs, a.synthetic_patients) == (
        qs.FLAGS["lr"], qs.FLAGS["clip_grad"], qs.FLAGS["epochs"], qs.FLAGS["synthetic_patients"])
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


def test_help_names_the_quick_start_defaults(capsys):
    from medst_fast.train.args import build_parser

    build_parser().print_help()
    out = " ".join(capsys.readouterr().out.split())  # argparse rewraps the text
    assert "Quick start: with no --data, on the CPU, with medst_tiny" in out
    assert "--lr 0.001" in out and "--clip-grad 1.0" in out and "text dropout 0" in out
    assert "paper's recipe, used with --data or on a GPU" in out
