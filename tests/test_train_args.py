"""train/args.py and the checks before a run starts: every flag, config file and input gets one clear line
(exit 2 from the CLI), and nothing is written for an input the run cannot use."""
import json
import os
import sys

import pytest
import torch

import medst_fast
from medst_fast.pretrain import main
from medst_fast.train import step as step_mod
from medst_fast.train.args import parse_args

SMALL = ["--model-override", "vision.img_size=32", "--model-override", "text.max_length=32"]


def _argv(out, vocab, *extra):
    return ["--dataset-type", "random", "--random-series", "8", "--vocab", vocab, "--out", str(out), "--workers", "0",
            "--batch-series", "2", "--log-every", "1", *SMALL, *extra]


# -- flags and config files are type- and range-checked --------------------------------------------------
@pytest.mark.parametrize("argv,msg", [
    (["--clip-grad", "-1"], "--clip-grad must be a finite number > 0"),
    (["--clip-grad", "0"], "--clip-grad must be a finite number > 0"),
    (["--lr", "-1"], "--lr must be a finite number >= 0"),
    (["--lr", "nan"], "--lr must be a finite number >= 0"),
    (["--lr", "inf"], "--lr must be a finite number >= 0"),
    (["--beta1", "2"], "--beta1 must be in"),
    (["--beta2", "-0.1"], "--beta2 must be in"),
    (["--eps", "0"], "--eps must be a finite number > 0"),
    (["--wd", "-0.1"], "--wd must be a finite number >= 0"),
    (["--lr", "1e-5", "--min-lr", "1e-4"], "--min-lr 0.0001 is above --lr"),
    (["--lambda-local", "-1"], "--lambda-local must be"),
    (["--keep", "0"], "--keep must be >= 1"),
    (["--overwrite", "--resume", "x.pt"], "--overwrite starts a fresh run"),
    (["--seed", "-1"], "--seed must be >= 0"),  # was numpy's "expected non-negative integer" traceback
])
def test_bad_flags_are_refused(argv, msg, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert msg in capsys.readouterr().err


@pytest.mark.parametrize("field,value,msg", [
    ("faithful", "false", "field 'faithful' (--faithful): expected true or false, got 'false'"),
    ("amp", "fp8", "field 'amp' (--amp): expected one of ['bf16', 'fp16', 'none'], got 'fp8'"),
    ("device", "tpu", "field 'device' (--device): expected one of ['cpu', 'cuda'], got 'tpu'"),
    ("max_steps", 2.5, "field 'max_steps' (--max-steps): expected an integer, got 2.5"),
    ("batch-series", True, "field 'batch_series' (--batch-series): expected an integer, got True"),
    ("lr", "1e-4", "field 'lr' (--lr): expected a number, got '1e-4'"),
    ("model_override", "vision.img_size=32", "field 'model_override' (--model-override): expected a list of strings"),
    ("learning_rate", 1, "unknown field 'learning_rate'"),
])
def test_config_file_fields_are_checked(tmp_path, field, value, msg):
    p = tmp_path / "run.json"
    p.write_text(json.dumps({field: value}))
    with pytest.raises(SystemExit) as e:
        parse_args(["--config", str(p)])
    assert str(p) in str(e.value) and msg in str(e.value)


def test_config_file_values_still_range_checked(tmp_path, capsys):
    p = tmp_path / "run.json"
    p.write_text(json.dumps({"clip_grad": -1}))
    with pytest.raises(SystemExit):
        parse_args(["--config", str(p)])
    assert "--clip-grad must be" in capsys.readouterr().err
    p.write_text(json.dumps({"faithful": True, "max_steps": 3, "lr": 1}))
    a = parse_args(["--config", str(p)])
    assert a.faithful is True and a.max_steps == 3 and a.lr == 1.0 and isinstance(a.lr, float)


def test_model_config_json_fields_are_checked(tmp_path):
    m = medst_fast.create_model("medst_tiny")
    medst_fast.save_pretrained(m, tmp_path / "exp")
    cfg_path = tmp_path / "exp" / "config.json"
    good = json.loads(cfg_path.read_text())
    for patch, msg in (({"faithful": "false"}, "field 'faithful': expected true or false, got 'false'"),
                       ({"vision": dict(good["vision"], img_size="96")}, "field 'vision.img_size': expected an integer"),
                       ({"text": dict(good["text"], hidden_dropout=1.5)}, "field 'text.hidden_dropout': must be in [0, 1)"),
                       ({"vision": dict(good["vision"], widht=3)}, "vision: unknown fields ['widht']"),
                       ({"colour": 1}, "unknown fields ['colour']")):
        cfg_path.write_text(json.dumps(dict(good, **patch)))
        with pytest.raises(ValueError) as e:
            medst_fast.from_pretrained(tmp_path / "exp")
        assert str(cfg_path) in str(e.value) and msg in str(e.value)
    bad = tmp_path / "named.json"
    bad.write_text(json.dumps(dict(good, faithful="false")))
    with pytest.raises(ValueError, match="named.json: field 'faithful'"):
        medst_fast.add_model_config(bad)


def test_model_override_values_are_checked(tmp_path, vocab_path):
    for override, msg in (('faithful="false"', "field 'faithful': expected true or false"),
                          ("vision.img_size=2.5", "field 'vision.img_size': expected an integer"),
                          ("loss.tau_global=0", "field 'loss.tau_global': must be > 0")):
        with pytest.raises(SystemExit, match="--model-override: " + msg.replace("(", "\\(")):
            main(_argv(tmp_path / override.split("=")[0], vocab_path, "--max-steps", "1", "--model-override", override))


# -- one line, exit 2, nothing written, for an input the run cannot use ---------------------------------------------
def _cli_run(monkeypatch, capsys, argv):
    """``python -m medst_fast.pretrain argv`` in this process: (exit status, stderr)."""
    from medst_fast.pretrain import _cli

    monkeypatch.setattr(sys, "argv", ["medst_fast.pretrain", *argv])
    rc = _cli()
    return rc, capsys.readouterr().err


def _image_folder(root):
    from PIL import Image

    os.makedirs(root / "p10" / "s1")
    Image.new("L", (16, 16)).save(root / "p10" / "s1" / "view1.jpg")
    return str(root)


def _not_a_vocab(path):
    from PIL import Image

    Image.new("L", (16, 16)).save(path)  # a JPEG given as --vocab
    return str(path)


@pytest.mark.parametrize("case,msg", [
    ("vocab", "--vocab {tmp}/no-vocab.txt: no such file"),
    ("vocab_not_text", "--vocab: {tmp}/scan.jpg"),
    ("max_length", "--model-override text.max_length=1: a report needs at least 3 tokens"),
    ("raw_images", "--data {tmp}/raw holds images, not a prepared index (studies.csv, series.json, meta.json "
                   "missing). Prepare it first: python -m medst_fast.data.prepare manifest"),
])
def test_input_errors_are_one_line_exit_2_and_leave_no_run_folder(tmp_path, vocab_path, monkeypatch, capsys, case, msg):
    out = tmp_path / "r"
    argv = {"vocab": _argv(out, str(tmp_path / "no-vocab.txt")),
            "vocab_not_text": _argv(out, _not_a_vocab(tmp_path / "scan.jpg")),
            "max_length": _argv(out, vocab_path, "--model-override", "text.max_length=1"),
            "raw_images": ["--data", _image_folder(tmp_path / "raw"), "--vocab", vocab_path, "--out", str(out)]}[case]
    rc, err = _cli_run(monkeypatch, capsys, argv)
    assert rc == 2 and "Traceback" not in err, err
    assert err.strip() == "medst_fast.pretrain: error: " + err.strip().split("error: ", 1)[1]  # one line
    assert len(err.strip().splitlines()) == 1 and msg.format(tmp=tmp_path) in err, err
    assert not out.exists()  # checked before the run folder was claimed


def test_out_of_memory_is_one_line_naming_the_flags_that_lower_memory(tmp_path, vocab_path, monkeypatch, capsys):
    def oom(self, batches):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total)\nmore")

    monkeypatch.setattr(step_mod.StepRunner, "forward_backward", oom)
    rc, err = _cli_run(monkeypatch, capsys, _argv(tmp_path / "r", vocab_path, "--max-steps", "2", "--no-export"))
    assert rc == 1 and "Traceback" not in err, err
    err = err.strip().splitlines()[-1]  # the log lines of the run's start come before it
    assert err.startswith("medst_fast.pretrain: error: out of memory"), err
    for part in ("out of memory in step 1 (CUDA out of memory. Tried to allocate 20.00 GiB", "--batch-series (now 2;",
                 "--accum-steps, now 1", "--amp bf16 (now none)", "--grad-checkpointing"):
        assert part in err, (part, err)


