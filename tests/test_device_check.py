"""benchmarks/device_check.sh --dry-run: every stage of the GPU check runs on the CPU at tiny shapes through the
same code, so a stale baseline or a broken stage is caught before a GPU sees it."""
import csv
import os
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "device_check.sh")
STAGES = ["setup", "env", "warmup", "cuda_tests", "train_step", "ops", "e2e", "compile", "gemm_sweep", "loader"]
ROWS = {"train_step": {"train_step"}, "ops": {"local_align_fwd_bwd", "move_ffn_fwd_bwd", "move_ffn_gemm_config"},
        "loader": {"loader 256px cache"}}


def test_unknown_argument_is_a_usage_error(tmp_path):
    r = subprocess.run(["bash", SCRIPT, "--dryrun"], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, OUT=str(tmp_path)))
    assert r.returncode == 2 and "usage: bash benchmarks/device_check.sh [--dry-run]" in r.stderr
    assert "--dryrun" in r.stderr


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_check")
    # PYTHON: the stages run this interpreter (the one running the tests), whatever `python` is on PATH
    r = subprocess.run(["bash", SCRIPT, "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=3000,
                       env=dict(os.environ, OUT=str(out), PYTHON=sys.executable))
    return out, r


def test_dry_run_passes_every_stage(dry_run):
    out, r = dry_run
    summary = (out / "summary.txt").read_text()
    assert r.returncode == 0, summary + r.stderr[-3000:]
    status = {ln.split()[0]: ln for ln in summary.splitlines() if ln and not ln.startswith((" ", "device_check"))}
    for stage in STAGES:
        assert stage in status, (stage, summary)
        assert status[stage].split()[1] == "ok", status[stage]
    assert "0 stage(s) not ok" in summary


def test_dry_run_names_what_needs_cuda(dry_run):
    out, _ = dry_run
    summary = (out / "summary.txt").read_text()
    for what in ("Triton compilation", "inductor compilation", "medst_vit_b16 --loader nvjpeg", "GPU decode"):
        assert f"SKIP (needs CUDA): " in summary and what in summary, what
    assert "needs a CUDA device" in summary  # the correctness stage's skipped tests, by reason


def test_dry_run_writes_the_outputs_the_device_tool_brings_back(dry_run):
    out, _ = dry_run
    files = sorted(os.listdir(out))
    # at most 8 files come back, none in sub-folders
    assert {"summary.txt", "bench.csv", "env.txt", "logs.tar.gz"} <= set(files) and len(files) <= 8
    assert not [f for f in files if (out / f).is_dir()]
    with tarfile.open(out / "logs.tar.gz") as t:
        logs = {os.path.basename(n) for n in t.getnames()}
    assert {f"{s}.log" for s in STAGES} <= logs
    with open(out / "bench.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    names = {r["name"] for r in rows}
    for stage, want in ROWS.items():
        assert want <= names, (stage, want - names)
    assert {r["bench"] for r in rows} >= {"train_step", "ops", "loader"}
    # every row names its precision and says it is not a performance number (CPU, tiny shapes)
    assert all(r["performance_number"] == "false" and "not a performance number" in r["note"] for r in rows)
    assert all(r["baseline_precision"] and r["ours_precision"] for r in rows)
    assert any("frontal-only" in r["name"] for r in rows)
    assert any(r["baseline"] == "official-style eager" for r in rows)
    env = (out / "env.txt").read_text()
    assert "torch:" in env and "triton:" in env and "numpy:" in env and "nvcc:" in env
